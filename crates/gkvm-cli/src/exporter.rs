//! `gkvm stats --prometheus --listen ADDR`: the node's instance stats over
//! HTTP for a Prometheus server to scrape (`GET /metrics`), read afresh
//! at each scrape, without a daemon of gkvm's beside it otherwise.
//! Scrapes are answered one at a time (a scrape is bounded by the
//! hypervisor's info timeout, a client by [`CLIENT_TIMEOUT`]), so a node
//! is never asked twice at once; it listens until it is stopped.

use std::net::SocketAddr;
use std::time::Duration;

use hv_kvm::KvmHypervisor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{CliResult, Failure};

/// How long a client may take to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of a request's head that is read.
const MAX_HEAD: usize = 8 << 10;

/// Serves `names` (every instance when empty) on `addr` until stopped.
pub(crate) async fn serve(
    hv: KvmHypervisor,
    names: Vec<String>,
    options: hv_kvm::StatsOptions,
    addr: SocketAddr,
) -> CliResult {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::new(1, "exporter", format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure::new(1, "exporter", format!("{addr}: {e}")))?;
    errln!("gkvm: serving Prometheus metrics on http://{bound}/metrics");
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let answered =
            tokio::time::timeout(CLIENT_TIMEOUT * 2, answer(&hv, &names, options, &mut sock)).await;
        if let Ok(Err(e)) = answered {
            tracing::debug!(error = %e, "a scrape failed");
        }
    }
}

/// Reads one request and answers it; the connection then closes.
async fn answer(
    hv: &KvmHypervisor,
    names: &[String],
    options: hv_kvm::StatsOptions,
    sock: &mut tokio::net::TcpStream,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_HEAD {
            return respond(sock, 431, "text/plain", "request head too large\n").await;
        }
        let n = tokio::time::timeout(CLIENT_TIMEOUT, sock.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("client too slow"))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = match hv.stats_with(names, options).await {
                Ok(stats) => crate::render::prometheus_text(&stats),
                Err(e) => {
                    return respond(sock, 503, "text/plain", &format!("{}\n", e.report())).await
                }
            };
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            respond(sock, 200, "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        ("GET" | "HEAD", _) => respond(sock, 404, "text/plain", "gkvm serves /metrics\n").await,
        _ => respond(sock, 405, "text/plain", "GET /metrics\n").await,
    }
}

async fn respond(
    sock: &mut tokio::net::TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tokio::time::timeout(CLIENT_TIMEOUT, async {
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(body.as_bytes()).await?;
        sock.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::other("client too slow"))?
}
