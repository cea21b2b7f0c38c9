//! Holds many keep-alive connections to one API process, the way a crowd of shoppers sitting
//! in a waiting room does: each connection sends a request now and then (a slow trickle) and
//! stays open. Connections come from several 127.0.0.x source addresses, so the ephemeral
//! ports of one address do not cap them. Prints how many were held to the end and the
//! server's resident memory per connection (read from /proc for `--server-pid`).
//!
//!     ulimit -n 20000; conn_load --connections 15000 --server-pid <pid> --hold-secs 60

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: SocketAddr,
    #[arg(long, default_value_t = 15_000)]
    connections: usize,
    /// The API process whose memory is read before and after.
    #[arg(long)]
    server_pid: Option<u32>,
    /// How long every connection is held once all are open.
    #[arg(long, default_value_t = 60)]
    hold_secs: u64,
    /// Each connection sends one request this often (below the server's keep-alive timeout).
    #[arg(long, default_value_t = 20)]
    trickle_secs: u64,
    /// Connections per source address (127.0.0.1, 127.0.0.2, ...).
    #[arg(long, default_value_t = 10_000)]
    per_source: usize,
    #[arg(long, default_value = "/health")]
    path: String,
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn connect(server: SocketAddr, source: Ipv4Addr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    socket.connect(server).await
}

/// Sends one request and reads its answer (the status line and whatever came with it).
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<bool> {
    stream.write_all(request).await?;
    let mut buffer = [0u8; 4096];
    let read = stream.read(&mut buffer).await?;
    Ok(read > 0 && buffer.starts_with(b"HTTP/1.1 200"))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let before = args.server_pid.and_then(rss_kib);
    let request = Arc::new(
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\n\r\n",
            args.path, args.server
        )
        .into_bytes(),
    );
    let (open, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let hold_until = started + Duration::from_secs(args.hold_secs);
    let trickle = Duration::from_secs(args.trickle_secs);
    let mut held = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let source = Ipv4Addr::new(127, 0, 0, 1 + (i / args.per_source) as u8);
        let (request, open, failed) = (request.clone(), open.clone(), failed.clone());
        held.push(tokio::spawn(async move {
            let answered = match connect(args.server, source).await {
                Ok(mut stream) => {
                    open.fetch_add(1, Ordering::Relaxed);
                    // A first request at once (a server closes a connection that sends
                    // nothing), then the trickle, spread so the requests do not all come at
                    // once.
                    let mut alive = exchange(&mut stream, &request).await.unwrap_or(false);
                    let offset = trickle.mul_f64((i % 1000) as f64 / 1000.0);
                    tokio::time::sleep(offset).await;
                    while alive && Instant::now() + trickle < hold_until {
                        tokio::time::sleep(trickle).await;
                        alive = exchange(&mut stream, &request).await.unwrap_or(false);
                    }
                    let remaining = hold_until.saturating_duration_since(Instant::now());
                    tokio::time::sleep(remaining).await;
                    alive && exchange(&mut stream, &request).await.unwrap_or(false)
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    false
                }
            };
            answered
        }));
        if i % 500 == 499 {
            // Let the server accept what is queued before opening more.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "opened {} of {} connections in {:.1}s ({} refused)",
        open.load(Ordering::Relaxed),
        args.connections,
        started.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    // Measured while every connection is open and idle between trickles.
    tokio::time::sleep(Duration::from_secs(args.hold_secs / 2)).await;
    let during = args.server_pid.and_then(rss_kib);
    let mut alive = 0;
    for connection in futures_util::future::join_all(held).await {
        alive += usize::from(connection.unwrap_or(false));
    }
    println!(
        "held {alive} connections for {}s (each answered a request at the end)",
        args.hold_secs
    );
    if let (Some(before), Some(during)) = (before, during) {
        let per_connection = during.saturating_sub(before) as f64 * 1024.0 / alive.max(1) as f64;
        println!(
            "server memory: {} MiB before, {} MiB holding them: {:.1} KiB per connection",
            before / 1024,
            during / 1024,
            per_connection / 1024.0
        );
    }
}
