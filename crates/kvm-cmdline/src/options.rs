//! The command-line syntax of disks and NICs (`gkvm start --disk`,
//! `--nic`), so every tool that takes them parses them the same way.
//!
//! - Disk: `PATH`, `PATH:ro` or `PATH:rw` (read-write is the default);
//!   `PATH` may be a storage URI (`nbd://`, `rbd:`, ...) QEMU opens itself.
//! - NIC: comma-separated `key=value` pairs: one of `bridge=BRIDGE`,
//!   `routed=TABLE`, `ovs=SWITCH` (`openvswitch=` too) or `ext=LINK` for
//!   the mode and link, then optionally `mac=52:54:00:12:34:56`,
//!   `ip=ADDRESS`, `vlan=.N:M` (Ganeti's VLAN syntax) and `tap=NAME%d`
//!   (the TAP's name template, instead of the node's). A NIC
//!   without a MAC gets one made from the instance name and NIC index
//!   ([`generated_mac`]): locally administered, stable across restarts.

use std::str::FromStr;

use crate::{DiskMode, DiskSpec, Error, MacAddr, NicMode, NicSpec};

fn bad(instance: &str, field: &str, reason: String) -> Error {
    Error::Instance {
        instance: instance.into(),
        field: field.into(),
        reason,
    }
}

impl FromStr for DiskSpec {
    type Err = Error;

    /// `PATH`, `PATH:ro` or `PATH:rw`; a storage URI (`nbd://...`) in
    /// place of `PATH` is opened by QEMU itself.
    fn from_str(text: &str) -> Result<DiskSpec, Error> {
        let (path, mode) = match text.strip_suffix(":ro") {
            Some(p) => (p, DiskMode::ReadOnly),
            None => (
                text.strip_suffix(":rw").unwrap_or(text),
                DiskMode::ReadWrite,
            ),
        };
        if path.is_empty() {
            return Err(bad("(cli)", "--disk", format!("{text:?}: no path")));
        }
        let mut disk = if crate::qemu::is_storage_uri(path) {
            crate::qemu::storage_node("--disk", path)?;
            DiskSpec::from_uri(path)
        } else {
            DiskSpec::new(path)
        };
        disk.mode = mode;
        Ok(disk)
    }
}

impl NicSpec {
    /// Parses a `--nic` value for NIC `index` of `instance` (see the
    /// module documentation for the syntax).
    pub fn parse_option(text: &str, instance: &str, index: usize) -> Result<NicSpec, Error> {
        let field = format!("--nic {text}");
        let mut nic = NicSpec::default();
        let mut mac = None;
        let mut mode_given = false;
        for part in text.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                bad(
                    instance,
                    &field,
                    format!("expected key=value, got {part:?}"),
                )
            })?;
            let mode = match k {
                "bridge" => Some(NicMode::Bridged),
                "routed" => Some(NicMode::Routed),
                "ovs" | "openvswitch" => Some(NicMode::Openvswitch),
                "ext" => Some(NicMode::Ext),
                "vlan" => {
                    nic.vlan = Some(v.into());
                    None
                }
                "mac" => {
                    mac = Some(
                        v.parse::<MacAddr>()
                            .map_err(|e| bad(instance, &field, e.to_string()))?,
                    );
                    None
                }
                "ip" => {
                    nic.ip = Some(v.into());
                    None
                }
                "tap" => {
                    nic.tap_template = Some(v.into());
                    None
                }
                other => {
                    return Err(bad(
                        instance,
                        &field,
                        format!(
                            "unknown key {other:?} (bridge, routed, ovs, ext, mac, ip, vlan, tap)"
                        ),
                    ))
                }
            };
            if let Some(mode) = mode {
                if mode_given {
                    return Err(bad(instance, &field, "more than one mode".into()));
                }
                (nic.mode, nic.link, mode_given) = (mode, v.into(), true);
            }
        }
        nic.mac = mac.unwrap_or_else(|| generated_mac(instance, index));
        Ok(nic)
    }
}

/// A MAC for NIC `index` of `instance`: QEMU's `52:54:00` prefix and 24
/// bits of an FNV-1a hash of the name and index, so the same instance gets
/// the same MACs each time it is started from flags.
pub fn generated_mac(instance: &str, index: usize) -> MacAddr {
    let mut h: u32 = 2166136261;
    // The index as one byte, as gkvm 0.1 hashed it (NICs are at most 8).
    for b in instance.bytes().chain([index.to_le_bytes()[0]]) {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    let [_, a, b, c] = h.to_be_bytes();
    MacAddr::new([0x52, 0x54, 0x00, a, b, c])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d: DiskSpec = "/dev/vg/a:ro".parse().unwrap();
        assert_eq!(
            (d.path.to_str(), d.mode),
            (Some("/dev/vg/a"), DiskMode::ReadOnly)
        );
        let d: DiskSpec = "/srv/a,b.img".parse().unwrap();
        assert_eq!(
            (d.path.to_str(), d.mode),
            (Some("/srv/a,b.img"), DiskMode::ReadWrite)
        );
        let d: DiskSpec = "/x:rw".parse().unwrap();
        assert_eq!(d.path.to_str(), Some("/x"));
        assert!("".parse::<DiskSpec>().is_err());
        let d: DiskSpec = "nbd://127.0.0.1/e:ro".parse().unwrap();
        assert_eq!(
            (d.uri.as_deref(), d.mode),
            (Some("nbd://127.0.0.1/e"), DiskMode::ReadOnly)
        );
        assert!("nbd://:1/e".parse::<DiskSpec>().is_err());
        assert!(":ro".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn nic_tap_templates() {
        let n = NicSpec::parse_option("routed=,ip=169.254.0.9,tap=gnt.com.%d", "w1", 0).unwrap();
        assert_eq!(n.tap_template.as_deref(), Some("gnt.com.%d"));
        for bad in [
            "tap0",
            "t%d%d",
            "%s%d",
            "-t%d",
            ".t%d",
            "a b%d",
            "averylongname%d",
        ] {
            assert!(crate::tap_template_problem(bad).is_some(), "{bad}");
        }
        let mut spec = crate::InstanceSpec::new("w1", 128);
        spec.nics.push(n);
        spec.nics[0].tap_template = Some("gnt.com.0".into());
        let e = spec.validate().unwrap_err().to_string();
        assert!(e.contains("nics[0].tap_template"), "{e}");
    }

    #[test]
    fn nics() {
        let n =
            NicSpec::parse_option("bridge=br0,mac=52:54:00:aa:bb:cc,ip=10.0.0.2", "w1", 0).unwrap();
        assert_eq!(
            (
                n.mode,
                n.link.as_str(),
                n.mac.to_string().as_str(),
                n.ip.as_deref()
            ),
            (
                NicMode::Bridged,
                "br0",
                "52:54:00:aa:bb:cc",
                Some("10.0.0.2")
            )
        );
        let n = NicSpec::parse_option("ovs=sw0", "w1", 1).unwrap();
        assert_eq!(n.mode, NicMode::Openvswitch);
        assert_eq!(n.mac, generated_mac("w1", 1));
        assert_ne!(generated_mac("w1", 0), generated_mac("w1", 1));
        for bad in ["br0", "bridge=a,routed=b", "colour=red", ""] {
            assert!(NicSpec::parse_option(bad, "w1", 0).is_err(), "{bad}");
        }
    }
}
