//! HTTP plumbing shared by every module: problem bodies, extractor configuration, request
//! middleware, client addresses, list paging and the per-IP limiter.

pub mod client_ip;
pub mod extract;
pub mod middleware;
pub mod paging;
pub mod problem;
pub mod rate_limit;

pub use problem::Problem;

use std::net::{TcpListener, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

/// A listening socket on `host:port` whose accept queue holds `backlog` connections.
pub fn listen(host: &str, port: u16, backlog: u32) -> std::io::Result<TcpListener> {
    let address = (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no address for {host}"),
        )
    })?;
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // As std's bind does: a restarted process binds again at once.
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::listen;

    /// More clients than std's backlog (128) connect before the server accepts any: the
    /// kernel completes every handshake instead of dropping SYNs.
    #[test]
    fn the_accept_queue_holds_a_crowd() {
        let listener = listen("127.0.0.1", 0, 1024).expect("listen");
        let address = listener.local_addr().expect("address");
        let crowd: Vec<_> = (0..300)
            .map(|_| TcpStream::connect_timeout(&address, Duration::from_millis(500)))
            .collect();
        let dropped = crowd.iter().filter(|c| c.is_err()).count();
        assert_eq!(dropped, 0, "connections not taken into the queue");
    }
}
