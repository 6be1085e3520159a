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

/// The instance as Ganeti 3.1's own KVM driver keeps it in its runtime
/// file, for handing a running instance back to that driver (the inverse
/// of [`nics`] and [`disks`]): `argv` is what QEMU runs
/// (`/proc/PID/cmdline`) without what the driver adds itself when it
/// starts or accepts the instance — NICs (`-netdev` and their devices),
/// disks (their nodes and devices), `-qmp`, `-S`, `-incoming`, `-k`, the
/// security options — and without gkvm's own event log monitor; `drivers`
/// maps each NIC's and disk's device id to its QEMU driver (QOM `type`).
pub(crate) fn to_ganeti(
    spec: &kvm_cmdline::InstanceSpec,
    hvparams: &serde_json::Map<String, Value>,
    argv: &[String],
    drivers: &std::collections::HashMap<String, String>,
) -> kvm_runtime::RuntimeRecord {
    use serde_json::json;
    let nic_ids: Vec<&str> = spec
        .nics
        .iter()
        .filter_map(|n| n.address.as_ref().map(|a| a.id.as_str()))
        .collect();
    let disk_ids: Vec<&str> = spec
        .disks
        .iter()
        .filter_map(|d| d.address.as_ref().map(|a| a.id.as_str()))
        .collect();
    let prop = |value: &str, key: &str| {
        value
            .split(',')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let is_disk = |id: Option<String>| id.is_some_and(|id| disk_ids.contains(&id.as_str()));
    let mut kvm_cmd = Vec::with_capacity(argv.len());
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        let value = argv.get(i + 1).map(String::as_str).unwrap_or_default();
        let drop_pair = match flag {
            "-netdev" | "-qmp" | "-incoming" | "-k" | "-runas" | "-chroot" | "-run-with"
            | "-add-fd" => true,
            "-device" => {
                prop(value, "netdev").is_some()
                    || prop(value, "id").is_some_and(|id| nic_ids.contains(&id.as_str()))
                    || is_disk(prop(value, "id"))
                    || is_disk(prop(value, "drive"))
            }
            "-blockdev" => is_disk(prop(value, "node-name")),
            "-drive" => is_disk(prop(value, "id")),
            "-chardev" => prop(value, "id").as_deref() == Some(kvm_cmdline::EVENTS_CHARDEV),
            "-mon" => prop(value, "chardev").as_deref() == Some(kvm_cmdline::EVENTS_CHARDEV),
            // gkvm's own QEMU log (kvm_extra may not set one), in a
            // directory Ganeti's driver does not make: a destination
            // running it would fail to open it.
            "-D" => true,
            _ => false,
        };
        if drop_pair {
            i += 2;
            continue;
        }
        if flag != "-S" {
            kvm_cmd.push(argv[i].clone());
        }
        i += 1;
    }
    let hvinfo = |id: &str, slot: Option<u8>| {
        let driver = drivers.get(id).cloned().unwrap_or_default();
        let mut info = json!({"driver": driver, "id": id});
        // Ganeti 3.1 counts PCI slots by `bus`/`addr`; a device on the SCSI
        // controller keeps QEMU's own bus (gkvm's controller is `scsi0`,
        // Ganeti's `scsi`), so none is written for it.
        if let Some(slot) = slot {
            info["bus"] = json!("pci.0");
            info["addr"] = json!(format!("{slot:#x}"));
        }
        info
    };
    let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::from);
    let nics = spec
        .nics
        .iter()
        .map(|n| {
            let mode = match n.mode {
                kvm_cmdline::NicMode::Bridged => "bridged",
                kvm_cmdline::NicMode::Routed => "routed",
                kvm_cmdline::NicMode::Openvswitch => "openvswitch",
                _ => "ext",
            };
            let mut v = json!({
                "mac": n.mac.to_string(),
                "ip": opt(&n.ip),
                "nicparams": {"mode": mode, "link": n.link, "vlan": n.vlan.clone().unwrap_or_default()},
            });
            if let Some(u) = &n.uuid {
                v["uuid"] = json!(u.to_string());
            }
            if let Some(name) = &n.name {
                v["name"] = json!(name);
            }
            if let Some(net) = &n.network {
                v["network"] = net.uuid.as_ref().map_or(Value::Null, |u| json!(u.to_string()));
                v["netinfo"] = json!({
                    "name": net.name,
                    "uuid": net.uuid.as_ref().map(ToString::to_string),
                    "network": net.subnet,
                    "gateway": net.gateway,
                    "network6": net.subnet6,
                    "gateway6": net.gateway6,
                    "mac_prefix": net.mac_prefix,
                    "tags": net.tags,
                });
            }
            if let Some(a) = &n.address {
                v["hvinfo"] = hvinfo(&a.id, a.pci_slot);
            }
            v
        })
        .collect();
    let disks = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let link = d.path.to_string_lossy().into_owned();
            let template = d.template.clone().unwrap_or_else(|| {
                if link.starts_with("/dev/") {
                    "blockdev"
                } else {
                    "file"
                }
                .to_owned()
            });
            let mut dict = json!({
                "dev_type": template,
                "iv_name": format!("disk/{i}"),
                "mode": if d.mode == DiskMode::ReadOnly { "ro" } else { "rw" },
                "params": if d.uri.is_some() { json!({"access": "userspace"}) } else { json!({}) },
            });
            if let Some(u) = &d.uuid {
                dict["uuid"] = json!(u.to_string());
            }
            if let Some(name) = &d.name {
                dict["name"] = json!(name);
            }
            if let Some(a) = &d.address {
                let on_pci =
                    spec.hvparams.disk_type == kvm_cmdline::hvparams::DiskType::Paravirtual;
                dict["hvinfo"] = hvinfo(&a.id, a.pci_slot.filter(|_| on_pci));
            }
            let link = if link.is_empty() {
                opt(&d.uri)
            } else {
                json!(link)
            };
            json!([dict, link, opt(&d.uri)])
        })
        .collect();
    kvm_runtime::RuntimeRecord {
        argv: kvm_cmd,
        nics,
        hvparams: hvparams.clone(),
        disks,
        payload: Value::Null,
        origin: kvm_runtime::Origin::Ganeti,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_handed_to_ganeti_keeps_its_command_line_and_devices() {
        let mut spec = kvm_cmdline::InstanceSpec::new("back1", 64);
        let mut nic = NicSpec::new("52:54:00:00:01:02".parse().unwrap(), "br0");
        nic.address = Some(DeviceAddress {
            id: "nic0".into(),
            pci_slot: Some(13),
        });
        spec.nics.push(nic);
        let mut disk = DiskSpec::new("/var/run/ganeti/instance-disks/back1:0");
        disk.template = Some("plain".into());
        disk.address = Some(DeviceAddress {
            id: "disk-9a8b7c6d".into(),
            pci_slot: Some(12),
        });
        spec.disks.push(disk);
        let argv: Vec<String> = "/usr/bin/qemu-system-x86_64 -name back1 -nodefaults -m 64 \
            -blockdev driver=raw,node-name=disk-9a8b7c6d,file.driver=host_device,file.filename=/x \
            -device virtio-blk-pci,drive=disk-9a8b7c6d,id=disk-9a8b7c6d,addr=0x0c \
            -pidfile /r/pid/back1 -daemonize -serial unix:/r/ctrl/back1.serial,server=on,wait=off \
            -netdev tap,id=nic0,fd=11 -device virtio-net-pci,mac=52:54:00:00:01:02,netdev=nic0,id=nic0,addr=0x0d \
            -qmp unix:/r/ctrl/back1.qmp,server=on,wait=off -qmp unix:/r/ctrl/back1.qmp-watch,server=on,wait=off \
            -chardev pipe,id=gkvm-events,path=/r/ctrl/back1.events -mon chardev=gkvm-events,mode=control \
            -device virtio-balloon-pci,id=balloon0 -S"
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let drivers = [
            ("nic0".to_owned(), "virtio-net-pci".to_owned()),
            ("disk-9a8b7c6d".to_owned(), "virtio-blk-pci".to_owned()),
        ]
        .into_iter()
        .collect();
        let mut hv = serde_json::Map::new();
        hv.insert("kvm_path".into(), "/usr/bin/kvm".into());
        let r = to_ganeti(&spec, &hv, &argv, &drivers);
        assert_eq!(
            r.argv.join(" "),
            "/usr/bin/qemu-system-x86_64 -name back1 -nodefaults -m 64 -pidfile /r/pid/back1 \
             -daemonize -serial unix:/r/ctrl/back1.serial,server=on,wait=off \
             -device virtio-balloon-pci,id=balloon0"
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert_eq!(
            r.nics[0]["hvinfo"],
            serde_json::json!({"driver": "virtio-net-pci", "id": "nic0", "bus": "pci.0", "addr": "0xd"})
        );
        assert_eq!(r.disks[0][0]["hvinfo"]["addr"], "0xc");
        assert_eq!(r.disks[0][1], "/var/run/ganeti/instance-disks/back1:0");
        // Read back as gkvm reads Ganeti's files: the same devices, places.
        let data = r.to_ganeti_json();
        let path = std::path::Path::new("back1.runtime");
        let again = kvm_runtime::RuntimeRecord::from_json(&data, path).unwrap();
        assert_eq!(again.origin, kvm_runtime::Origin::Ganeti);
        assert_eq!(nics(&again.nics).unwrap(), spec.nics);
        assert_eq!(disks(&again.disks).unwrap(), spec.disks);
        // The machine stays lean (-nodefaults): its own devices keep their
        // slots, so a migration of it loads.
        let back = crate::lifecycle::spec_from_record("back1", &again, path).unwrap();
        assert_eq!(back.layout, Some(kvm_cmdline::Layout::Lean));
    }

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
        let mut config = crate::Config::new(crate::RunDir::new("/nonexistent/gkvm-run"));
        // No key here: an unsealed file is refused unless the node says so.
        assert!(crate::KvmHypervisor::new(config.clone())
            .incoming_spec_with(text, None)
            .is_err());
        config.trust_unsealed_migration_info = true;
        let hv = crate::KvmHypervisor::new(config);
        let mut current = kvm_cmdline::HvParams::default();
        for p in ["keymap=fr", "nic_type=e1000"] {
            current.set_pair(p).unwrap();
        }
        let current = crate::CurrentConfig {
            hvparams: current,
            disks: None,
        };
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
