//! The client's IP: the peer address, or the right-most untrusted `X-Forwarded-For` hop when
//! the peer is one of our own proxies (`http.trusted_proxies`, addresses or CIDR ranges such
//! as an ingress controller's pod network). Anything else is spoofable.

use std::net::IpAddr;

use actix_web::HttpRequest;
use ipnet::IpNet;

pub fn client_ip(req: &HttpRequest, trusted_proxies: &[IpNet]) -> Option<IpAddr> {
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    let peer = req.peer_addr()?.ip();
    if !trusted(&peer) {
        return Some(peer);
    }
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    forwarded
        .into_iter()
        .rev()
        .find(|hop| !trusted(hop))
        .or(Some(peer))
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn request(peer: &str, forwarded: &str) -> HttpRequest {
        TestRequest::default()
            .peer_addr(format!("{peer}:40000").parse().expect("socket address"))
            .insert_header(("x-forwarded-for", forwarded))
            .to_http_request()
    }

    fn ip(text: &str) -> Option<IpAddr> {
        text.parse().ok()
    }

    #[test]
    fn forwarded_hops_are_believed_only_from_trusted_ranges() {
        let trusted: Vec<IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            IpNet::from(ip("10.0.0.1").unwrap()),
        ];
        // Any ingress pod in the range, or the single address: the client is the right-most
        // untrusted hop (a spoofed left-most hop is ignored).
        let via_pod = request("10.244.7.9", "6.6.6.6, 203.0.113.5, 10.244.3.3");
        assert_eq!(client_ip(&via_pod, &trusted), ip("203.0.113.5"));
        let via_address = request("10.0.0.1", "198.51.100.2");
        assert_eq!(client_ip(&via_address, &trusted), ip("198.51.100.2"));
        // Anyone else's header is not believed.
        let direct = request("203.0.113.9", "1.2.3.4");
        assert_eq!(client_ip(&direct, &trusted), ip("203.0.113.9"));
    }
}
