//! The client's IP: the peer address, or the right-most untrusted `X-Forwarded-For` hop when
//! the peer is one of our own proxies (`http.trusted_proxies`). Anything else is spoofable.

use std::net::IpAddr;

use actix_web::HttpRequest;

pub fn client_ip(req: &HttpRequest, trusted_proxies: &[IpAddr]) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    if !trusted_proxies.contains(&peer) {
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
        .find(|hop| !trusted_proxies.contains(hop))
        .or(Some(peer))
}
