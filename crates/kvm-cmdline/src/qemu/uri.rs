//! Storage URIs (`nbd://`, `rbd:`, `gluster://`, `iscsi://`, `http(s)://`)
//! as the protocol node of a `-blockdev`/`blockdev-add`: QEMU's block
//! drivers open them in userspace, with no device on the host.
//!
//! `-blockdev` takes no URI (only the legacy `-drive file=` did), so each
//! scheme is parsed into its driver's options here, and anything that does
//! not parse is refused with the reason rather than handed to QEMU.

use super::props::{Props, Value};
use crate::Error;

/// Whether `text` is a storage URI this module understands the scheme of
/// (as opposed to a path on the node).
pub fn is_storage_uri(text: &str) -> bool {
    scheme(text).is_some()
}

fn scheme(text: &str) -> Option<&'static str> {
    [
        "nbd+unix://",
        "nbd+tcp://",
        "nbd://",
        "gluster+tcp://",
        "gluster://",
        "iscsi://",
        "https://",
        "http://",
        "rbd:",
    ]
    .into_iter()
    .find(|s| {
        text.get(..s.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(s))
    })
}

/// The protocol node for `uri` (the `file` child of a raw node). `field`
/// names the input in errors.
pub fn storage_node(field: &str, uri: &str) -> Result<Props, Error> {
    let bad = |reason: &str| Error::Unexpressible {
        field: field.to_owned(),
        value: uri.to_owned(),
        reason: reason.to_owned(),
    };
    if uri.chars().any(char::is_control) {
        return Err(bad("control characters"));
    }
    let scheme = scheme(uri).ok_or_else(|| {
        bad("not a storage URI (nbd://, nbd+unix://, rbd:, gluster://, iscsi://, http(s)://)")
    })?;
    let rest = &uri[scheme.len()..];
    match scheme {
        "nbd://" | "nbd+tcp://" => {
            let (authority, export) = split_path(rest);
            let (host, port) = host_port(authority, 10809).map_err(|r| bad(&r))?;
            let mut p = Props::new()
                .with("driver", "nbd")
                .with("server", inet(&host, port));
            if !export.is_empty() {
                p.set("export", export);
            }
            Ok(p)
        }
        "nbd+unix://" => {
            let (authority, rest) = split_path(rest);
            let (export, query) = rest.split_once('?').unwrap_or((rest, ""));
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| s.starts_with('/'))
                .ok_or_else(|| bad("nbd+unix:// needs ?socket=/absolute/path"))?;
            if !authority.is_empty() {
                return Err(bad("nbd+unix:// takes no host"));
            }
            let mut p = Props::new().with("driver", "nbd").with(
                "server",
                Props::new().with("type", "unix").with("path", socket),
            );
            if !export.is_empty() {
                p.set("export", export);
            }
            Ok(p)
        }
        "gluster://" | "gluster+tcp://" => {
            let (authority, path) = split_path(rest);
            let (host, port) = host_port(authority, 24007).map_err(|r| bad(&r))?;
            let (volume, image) = path
                .split_once('/')
                .filter(|(v, i)| !v.is_empty() && !i.is_empty())
                .ok_or_else(|| bad("gluster:// needs /VOLUME/PATH"))?;
            Ok(Props::new()
                .with("driver", "gluster")
                .with("volume", volume)
                .with("path", image)
                .with(
                    "server",
                    Value::List(vec![Value::Object(inet(&host, port))]),
                ))
        }
        "iscsi://" => {
            let (authority, path) = split_path(rest);
            let (user, authority) = match authority.rsplit_once('@') {
                Some((u, _)) if u.contains('%') || u.contains(':') => {
                    return Err(bad(
                        "a password in an iscsi:// URI would show in the process list; \
                         use a secret object instead",
                    ));
                }
                Some((u, a)) => (Some(u), a),
                None => (None, authority),
            };
            let (host, port) = host_port(authority, 3260).map_err(|r| bad(&r))?;
            let (target, lun) = path
                .rsplit_once('/')
                .ok_or_else(|| bad("iscsi:// needs /TARGET/LUN"))?;
            let lun: u32 = lun.parse().map_err(|_| bad("the LUN is not a number"))?;
            let portal = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let mut p = Props::new()
                .with("driver", "iscsi")
                .with("transport", "tcp")
                .with("portal", portal)
                .with("target", target)
                .with("lun", u64::from(lun));
            if let Some(u) = user {
                p.set("user", u);
            }
            Ok(p)
        }
        "http://" | "https://" => {
            let (authority, _) = split_path(rest);
            host_port(authority, 80).map_err(|r| bad(&r))?;
            Ok(Props::new()
                .with("driver", scheme.trim_end_matches("://"))
                .with("url", uri))
        }
        _ => rbd(rest).ok_or_else(|| bad("rbd: needs POOL/IMAGE[@SNAP][:id=USER][:conf=FILE]")),
    }
}

/// `rbd:POOL/IMAGE[@SNAP][:key=value...]` (the form `qemu-img` and Ganeti
/// use).
fn rbd(rest: &str) -> Option<Props> {
    let mut parts = rest.split(':');
    let (pool, image) = parts.next()?.split_once('/')?;
    if pool.is_empty() || image.is_empty() {
        return None;
    }
    let (image, snap) = match image.split_once('@') {
        Some((i, s)) => (i, Some(s)),
        None => (image, None),
    };
    let mut p = Props::new()
        .with("driver", "rbd")
        .with("pool", pool)
        .with("image", image);
    if let Some(s) = snap {
        p.set("snapshot", s);
    }
    for kv in parts {
        match kv.split_once('=')? {
            ("id", user) => p.set("user", user),
            ("conf", file) => p.set("conf", file),
            _ => return None,
        }
    }
    Some(p)
}

fn inet(host: &str, port: u16) -> Props {
    Props::new()
        .with("type", "inet")
        .with("host", host)
        .with("port", port.to_string())
}

/// `AUTHORITY/PATH` → (`AUTHORITY`, `PATH`).
fn split_path(rest: &str) -> (&str, &str) {
    rest.split_once('/').unwrap_or((rest, ""))
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn host_port(authority: &str, default: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or("an IPv6 host needs its closing ]")?;
        (h, tail.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("port {p:?} is not a number"))?,
        None => default,
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyval(uri: &str) -> String {
        storage_node("disk", uri).unwrap().to_keyval().unwrap()
    }

    #[test]
    fn each_scheme_becomes_its_driver() {
        assert_eq!(
            keyval("nbd://127.0.0.1:10810/exp"),
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10810,export=exp"
        );
        assert_eq!(
            keyval("nbd://[::1]/e"),
            "driver=nbd,server.type=inet,server.host=::1,server.port=10809,export=e"
        );
        assert_eq!(
            keyval("nbd+unix:///e?socket=/run/nbd.sock"),
            "driver=nbd,server.type=unix,server.path=/run/nbd.sock,export=e"
        );
        assert_eq!(
            keyval("rbd:rbd/disk0@snap:id=admin"),
            "driver=rbd,pool=rbd,image=disk0,snapshot=snap,user=admin"
        );
        assert_eq!(
            keyval("gluster://gl1/vol/dir/img"),
            "driver=gluster,volume=vol,path=dir/img,server.0.type=inet,server.0.host=gl1,server.0.port=24007"
        );
        assert_eq!(
            keyval("iscsi://alice@10.0.0.1/iqn.2001-04.com.example:t/1"),
            "driver=iscsi,transport=tcp,portal=10.0.0.1:3260,target=iqn.2001-04.com.example:t,lun=1,user=alice"
        );
        assert_eq!(
            keyval("https://h/a,b.iso"),
            "driver=https,url=https://h/a,,b.iso"
        );
        let gluster = storage_node("d", "gluster://gl1:1/vol/img")
            .unwrap()
            .to_json();
        assert_eq!(gluster["server"][0]["port"], "1");
    }

    #[test]
    fn what_does_not_parse_is_refused_with_the_reason() {
        for (uri, why) in [
            ("/dev/vg/a", "not a storage URI"),
            ("nbd://:10/e", "no host"),
            ("nbd://h:x/e", "not a number"),
            ("nbd+unix:///e", "socket="),
            ("rbd:pool", "POOL/IMAGE"),
            ("rbd:p/i:key=secret", "POOL/IMAGE"),
            ("gluster://h/vol", "VOLUME/PATH"),
            ("iscsi://u%pw@h/t/1", "password"),
            ("iscsi://h/t/x", "LUN"),
            ("http://h/a\nb", "control"),
        ] {
            let err = storage_node("disks[0].uri", uri).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("disks[0].uri"),
                "{uri}: {err}"
            );
        }
        assert!(is_storage_uri("NBD://h/e") && !is_storage_uri("/srv/nbd://x"));
    }
}
