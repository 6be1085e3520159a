//! What a start reads from the node and the network for the argv:
//! addresses of interfaces named by display binds, and CD-ROM images
//! given as URLs (a `HEAD` request before the start, so an image that is
//! not there is an error naming the parameter and the server's answer,
//! not a QEMU that fails halfway).

use std::net::IpAddr;
use std::time::Duration;

use kvm_cmdline::{image_url, HvParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The build inputs of this node for an instance: the configured ones
/// plus the addresses of the interfaces `vnc_bind_address` and
/// `spice_bind` name, looked up now (so a migrated instance listens on
/// its new node's address).
pub(crate) fn build_env_for(base: &kvm_cmdline::BuildEnv, hv: &HvParams) -> kvm_cmdline::BuildEnv {
    let mut env = base.clone();
    for name in [&hv.vnc_bind_address, &hv.spice_bind] {
        if !name.is_empty() && !name.starts_with('/') && name.parse::<IpAddr>().is_err() {
            env.interfaces
                .insert(name.clone(), interface_addresses(name));
        }
    }
    env
}

/// The host a display listens on, for `console-info`: `bind` itself, or
/// when it names an interface, the address the start chose (of
/// `version` when 4 or 6, else IPv4 first).
pub(crate) fn display_host(bind: &str, version: u8) -> String {
    if bind.starts_with('/') || bind.parse::<IpAddr>().is_ok() {
        return bind.to_owned();
    }
    kvm_cmdline::pick_address(&interface_addresses(bind), version)
        .map_or_else(|| bind.to_owned(), |a| a.to_string())
}

/// The IPv4 and global IPv6 addresses of interface `name` (link-local
/// IPv6 would need a scope QEMU's listen syntax does not take).
fn interface_addresses(name: &str) -> Vec<IpAddr> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter(|i| i.interface_name == name)
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            let v6 = a.as_sockaddr_in6()?.ip();
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            (!link_local).then_some(IpAddr::V6(v6))
        })
        .collect()
}

/// How long a HEAD check may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks each `http://` CD-ROM image with a `HEAD` request. `https://`
/// is left to QEMU's curl driver, which verifies and opens it at start
/// (gkvm carries no TLS stack); its error names the URL.
pub(crate) async fn check_image_urls(hv: &HvParams) -> Result<(), kvm_cmdline::Error> {
    for (key, image) in [
        ("cdrom_image_path", &hv.cdrom_image_path),
        ("cdrom2_image_path", &hv.cdrom2_image_path),
    ] {
        let Some(url) = image.as_deref().and_then(image_url) else {
            continue;
        };
        if url
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        {
            head(url).await.map_err(|reason| kvm_cmdline::Error::Host {
                key: key.into(),
                reason: format!("{url}: {reason}"),
            })?;
        }
    }
    Ok(())
}

/// `HEAD url`: Ok for a 2xx or 3xx answer (curl follows redirects).
async fn head(url: &str) -> Result<(), String> {
    let rest = &url[7..];
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr.trim_start_matches('['))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let request = format!(
            "HEAD {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gkvm\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let mut answer = vec![0u8; 512];
        let mut len = 0;
        while len < answer.len() && !answer[..len].contains(&b'\n') {
            let n = conn
                .read(&mut answer[len..])
                .await
                .map_err(|e| format!("no answer: {e}"))?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok::<String, String>(String::from_utf8_lossy(&answer[..len]).into_owned())
    };
    let answer = tokio::time::timeout(HEAD_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", HEAD_TIMEOUT.as_secs()))??;
    let status_line = answer.lines().next().unwrap_or("").trim();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        let reason = status_line.splitn(3, ' ').nth(2).unwrap_or("");
        Err(format!("the server answered {code} {reason}")
            .trim_end()
            .to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve_once(answer: &'static str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).await;
            let _ = c.write_all(answer.as_bytes()).await;
        });
        port
    }

    #[test]
    fn loopback_resolves_to_both_families() {
        let addrs = interface_addresses("lo");
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
        assert!(interface_addresses("gkvm-no-such").is_empty());
        assert_eq!(display_host("lo", 0), "127.0.0.1");
        assert_eq!(display_host("lo", 6), "::1");
        assert_eq!(display_host("192.0.2.1", 0), "192.0.2.1");
    }

    #[tokio::test]
    async fn head_reports_what_the_server_said() {
        let p = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").await;
        head(&format!("http://127.0.0.1:{p}/a.iso")).await.unwrap();
        let p = serve_once("HTTP/1.1 404 Not Found\r\n\r\n").await;
        let e = head(&format!("http://127.0.0.1:{p}/a.iso"))
            .await
            .unwrap_err();
        assert_eq!(e, "the server answered 404 Not Found");
        let p = serve_once("garbage\r\n").await;
        let e = head(&format!("http://127.0.0.1:{p}/")).await.unwrap_err();
        assert!(e.contains("not an HTTP answer"), "{e}");
        let e = head("http://127.0.0.1:1/x").await.unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
    }
}
