//! A small HTTP/1.1 file server on loopback for QEMU's curl driver: `HEAD`
//! with `Accept-Ranges: bytes` (curl refuses servers without it), `GET`
//! with one byte `Range`, and 404 for anything else.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Serves the files of a directory until dropped.
#[derive(Debug)]
pub struct HttpServer {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `dir` on `127.0.0.1:port` (0: any free port).
    pub fn serve(dir: &Path, port: u16) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (dir, flag, count) = (dir.to_owned(), stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (dir, count) = (dir.clone(), count.clone());
                        std::thread::spawn(move || {
                            let _ = serve_connection(conn, &dir, &count);
                        });
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Ok(HttpServer {
            port,
            stop,
            requests,
            thread: Some(thread),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `file` (a name in the served directory).
    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }

    /// How many requests it has answered.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_connection(conn: TcpStream, dir: &Path, count: &AtomicUsize) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = v.trim().strip_prefix("bytes=").map(str::to_owned);
                }
            }
        }
        count.fetch_add(1, Ordering::Relaxed);
        respond(&mut out, dir, method, target, range.as_deref())?;
    }
}

fn respond(
    out: &mut TcpStream,
    dir: &Path,
    method: &str,
    target: &str,
    range: Option<&str>,
) -> std::io::Result<()> {
    let name = target.trim_start_matches('/');
    let file: Option<PathBuf> = (!name.is_empty() && !name.contains('/') && !name.starts_with('.'))
        .then(|| dir.join(name))
        .filter(|p| p.is_file());
    let Some(file) = file else {
        return out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    };
    let mut f = std::fs::File::open(&file)?;
    let size = f.metadata()?.len();
    let (start, end) = match range.and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: u64 = a.parse().unwrap_or(0);
            let b: u64 = b.parse().unwrap_or(size.saturating_sub(1));
            (a, b.min(size.saturating_sub(1)))
        }
        None => (0, size.saturating_sub(1)),
    };
    let len = if size == 0 { 0 } else { end + 1 - start };
    let status = if range.is_some() {
        format!("206 Partial Content\r\nContent-Range: bytes {start}-{end}/{size}")
    } else {
        "200 OK".to_owned()
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nAccept-Ranges: bytes\r\nContent-Length: {}\r\n\r\n",
        if method == "HEAD" { size } else { len }
    )?;
    if method == "GET" && len > 0 {
        f.seek(SeekFrom::Start(start))?;
        std::io::copy(&mut (&mut f).take(len), out)?;
    }
    Ok(())
}
