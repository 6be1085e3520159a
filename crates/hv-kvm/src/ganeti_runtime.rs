//! The instance in a runtime file Ganeti's KVM driver wrote (2.x and 3.1
//! formats: `[argv, nics, hvparams]` or `[argv, nics, hvparams, disks]`):
//! its NICs (`objects.NIC` dicts) and disks (`[disk dict, link]` pairs or
//! `[disk dict, link, uri]` triples) with the device ids and PCI slots
//! Ganeti 3.1 gave them (`hvinfo`), so a restart or an accepted migration
//! brings the same hardware back.

use serde_json::Value;

use kvm_cmdline::{DeviceAddress, DiskMode, DiskSpec, NetworkSpec, NicMode, NicSpec};

/// Ganeti's NIC dicts as gkvm NICs; the error names the NIC and the field.
pub(crate) fn nics(values: &[Value]) -> Result<Vec<NicSpec>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| nic(v).map_err(|e| format!("NIC {i}: {e}")))
        .collect()
}

fn nic(v: &Value) -> Result<NicSpec, String> {
    let mac = v
        .get("mac")
        .and_then(Value::as_str)
        .ok_or("no mac")?
        .parse()
        .map_err(|e| format!("mac: {e}"))?;
    // 2.x before nicparams kept mode and link at the top.
    let params = v.get("nicparams").unwrap_or(v);
    let text = |obj: &Value, k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut nic = NicSpec::new(mac, text(params, "link").unwrap_or_default());
    nic.mode = match text(params, "mode").as_deref() {
        None | Some("bridged") => NicMode::Bridged,
        Some("routed") => NicMode::Routed,
        Some("openvswitch") => NicMode::Openvswitch,
        Some("ext") => NicMode::Ext,
        Some(other) => return Err(format!("mode {other:?} is not supported")),
    };
    nic.vlan = text(params, "vlan").filter(|s| !s.is_empty());
    nic.ip = text(v, "ip").filter(|s| !s.is_empty());
    nic.name = text(v, "name").filter(|s| !s.is_empty());
    nic.uuid = text(v, "uuid").and_then(|u| u.parse().ok());
    if let Some(net) = v.get("netinfo").filter(|n| n.is_object()) {
        let mut n = NetworkSpec {
            name: text(net, "name").unwrap_or_default(),
            subnet: text(net, "network"),
            gateway: text(net, "gateway"),
            subnet6: text(net, "network6"),
            gateway6: text(net, "gateway6"),
            mac_prefix: text(net, "mac_prefix"),
            ..NetworkSpec::default()
        };
        n.uuid = text(net, "uuid").and_then(|u| u.parse().ok());
        n.tags = net
            .get("tags")
            .and_then(Value::as_array)
            .map(|t| {
                t.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        nic.network = Some(n);
    }
    nic.address = address(v);
    Ok(nic)
}

/// Ganeti 3.1's `hvinfo` (`{"driver", "id", "bus", "addr": "0x8"}`) as a
/// device address; `None` without one (2.x) or with an id gkvm cannot use.
fn address(v: &Value) -> Option<DeviceAddress> {
    let info = v.get("hvinfo")?;
    let id = info.get("id")?.as_str()?;
    if !kvm_cmdline::is_valid_device_id(id) {
        return None;
    }
    let pci_slot = info
        .get("addr")
        .and_then(Value::as_str)
        .and_then(|a| u8::from_str_radix(a.trim_start_matches("0x"), 16).ok());
    Some(DeviceAddress {
        id: id.to_owned(),
        pci_slot,
    })
}

/// Ganeti's disk entries as gkvm disks.
pub(crate) fn disks(values: &[Value]) -> Result<Vec<DiskSpec>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| disk(v).map_err(|e| format!("disk {i}: {e}")))
        .collect()
}

fn disk(v: &Value) -> Result<DiskSpec, String> {
    let entry = v.as_array().ok_or("not a [disk, link(, uri)] list")?;
    let dict = entry.first().ok_or("empty entry")?;
    let link = entry
        .get(1)
        .and_then(Value::as_str)
        .ok_or("no device link")?;
    let uri = entry.get(2).and_then(Value::as_str);
    let text = |k: &str| dict.get(k).and_then(Value::as_str);
    // Userspace access: QEMU opens the URI; else the link to the device.
    let userspace = dict
        .get("params")
        .and_then(|p| p.get("access"))
        .and_then(Value::as_str)
        == Some("userspace");
    let mut disk = match uri {
        Some(u) if userspace => DiskSpec::from_uri(u),
        _ => DiskSpec::new(link),
    };
    disk.mode = match text("mode") {
        None | Some("rw") => DiskMode::ReadWrite,
        Some("ro") => DiskMode::ReadOnly,
        Some(other) => return Err(format!("mode {other:?}")),
    };
    // Ganeti 2.x called plain LVs `lvm` and DRBD `drbd8`.
    disk.template = text("dev_type").map(|t| match t {
        "lvm" => "plain".to_owned(),
        "drbd8" => "drbd".to_owned(),
        other => other.to_owned(),
    });
    disk.name = text("name").map(str::to_owned);
    disk.uuid = text("uuid").and_then(|u| u.parse().ok());
    disk.address = address(dict);
    Ok(disk)
}

/// The VNC or SPICE port a Ganeti argv listens on (`-vnc :D`, `-vnc
/// host:D`, `-spice ...,port=P` or `tls-port=P`), Ganeti's
/// `network_port`.
pub(crate) fn network_port(argv: &[String]) -> Option<u16> {
    let value = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
    };
    if let Some(vnc) = value("-vnc") {
        let head = vnc.split(',').next()?;
        let display: u16 = head.rsplit(':').next()?.parse().ok()?;
        return kvm_cmdline::VNC_BASE_PORT.checked_add(display);
    }
    value("-spice")?.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        matches!(k, "port" | "tls-port").then(|| v.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ganeti_3_1_runtime_keeps_nics_disks_and_their_places() {
        // test/data/kvm_runtime.json of Ganeti 3.1, written by its
        // KVMRuntime.serialize, read as the run dir reads it.
        let path = std::path::Path::new("ganeti-3.1-kvm_runtime.json");
        let record = kvm_runtime::RuntimeRecord::from_json(
            include_bytes!("../tests/data/ganeti-3.1-kvm_runtime.json"),
            path,
        )
        .unwrap();
        let spec = crate::lifecycle::spec_from_record("xen-test-inst2", &record, path).unwrap();
        assert_eq!((spec.memory, spec.vcpus), (1024, 1));
        let n = &spec.nics;
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].mac.to_string(), "aa:00:00:bf:2f:16");
        assert_eq!((n[0].mode, n[0].link.as_str()), (NicMode::Bridged, "br0"));
        let a = n[0].address.as_ref().unwrap();
        assert_eq!(
            (a.id.as_str(), a.pci_slot),
            ("nic-003fc157-66a8-4e6d", Some(8))
        );
        let d = &spec.disks;
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0].path.to_str(),
            Some("/var/run/ganeti/instance-disks/xen-test-inst2:0")
        );
        // Its URI is for userspace access, which this disk does not use.
        assert_eq!(d[0].uri, None);
        assert_eq!(d[0].template.as_deref(), Some("plain"));
        let a = d[1].address.as_ref().unwrap();
        assert_eq!(
            (a.id.as_str(), a.pci_slot),
            ("disk-9f5c5bd4-6f60-480b", Some(10))
        );
        assert_eq!(spec.network_port, Some(5900 + 5100));
        assert_eq!(spec.hvparams.vnc_bind_address, "0.0.0.0");
        // The same file handed over as migration info (Ganeti's
        // MigrationInfo is the runtime file): the same hardware.
        let text = include_str!("../tests/data/ganeti-3.1-kvm_runtime.json");
        let incoming = crate::parse_migration_info(text, None).unwrap();
        assert_eq!((incoming.nics, incoming.disks), (spec.nics, spec.disks));
        // Accepted with the cluster's current configuration: what may
        // change between starts comes from it, the hardware from the file.
        let hv = crate::KvmHypervisor::new(crate::Config::new(crate::RunDir::new(
            "/nonexistent/gkvm-run",
        )));
        let mut current = kvm_cmdline::HvParams::default();
        for p in ["keymap=fr", "nic_type=e1000"] {
            current.set_pair(p).unwrap();
        }
        let accepted = hv.incoming_spec_with(text, Some(&current)).unwrap();
        assert_eq!(accepted.hvparams.keymap, "fr");
        assert_eq!(accepted.hvparams.nic_type, spec.hvparams.nic_type);
    }

    #[test]
    fn what_does_not_parse_is_an_error_naming_the_device() {
        let e = nics(&[serde_json::json!({"mac": "zz"})]).unwrap_err();
        assert!(e.starts_with("NIC 0: mac"), "{e}");
        let e =
            nics(&[serde_json::json!({"mac": "aa:00:00:00:00:01", "nicparams": {"mode": "pool"}})])
                .unwrap_err();
        assert!(e.contains("pool"), "{e}");
        let e = disks(&[serde_json::json!([{"mode": "rw"}])]).unwrap_err();
        assert!(e.starts_with("disk 0"), "{e}");
        let d = disks(&[serde_json::json!([
            {"mode": "ro", "params": {"access": "userspace"}, "dev_type": "rbd"},
            "/dev/rbd0",
            "rbd:pool/img"
        ])])
        .unwrap();
        assert_eq!(
            (d[0].uri.as_deref(), d[0].mode),
            (Some("rbd:pool/img"), DiskMode::ReadOnly)
        );
    }
}
