//! TAP interfaces for an instance's NICs, configured by the NIC script with
//! Ganeti's environment or natively (link up, bridge attach).

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use gkvm_tap::{Tap, TapBuilder, VnetHdr};
use kvm_cmdline::{InstanceSpec, NicMode, NicSpec};

use crate::error::{Error, Result};

/// Whether the instance's NICs are virtio-net on this QEMU.
pub(crate) fn is_virtio(spec: &InstanceSpec, caps: &kvm_cmdline::Capabilities) -> bool {
    spec.hvparams.nic_type == kvm_cmdline::hvparams::NicType::Paravirtual
        && caps.features.virtio_net_pci
}

/// The TAP queues of each NIC: `virtio_net_queues` for virtio-net, one
/// for emulated models. (Ganeti 3.1 honours the parameter only with
/// `vhost_net` on; gkvm whenever the NIC is virtio.)
pub(crate) fn queues(spec: &InstanceSpec, virtio: bool) -> u16 {
    if virtio {
        u16::try_from(spec.hvparams.virtio_net_queues).unwrap_or(1)
    } else {
        1
    }
}

/// Opens one TAP per NIC. vnet_hdr is used for virtio NICs when the kernel
/// has it and `vnet_hdr` says so (as Ganeti does), never for emulated ones.
pub(crate) fn open_taps(spec: &InstanceSpec, template: &str, virtio: bool) -> Result<Vec<Tap>> {
    (0..spec.nics.len())
        .map(|i| open_tap(spec, i, template, virtio))
        .collect()
}

/// Opens the TAP of NIC `i` (its queues, vnet_hdr as the hvparams say),
/// named from the NIC's own template, else from the node's `template`.
pub(crate) fn open_tap(spec: &InstanceSpec, i: usize, template: &str, virtio: bool) -> Result<Tap> {
    let vnet_hdr = if virtio && spec.hvparams.vnet_hdr {
        VnetHdr::Auto
    } else {
        VnetHdr::Off
    };
    let template = spec.nics[i].tap_template.as_deref().unwrap_or(template);
    TapBuilder::new()
        .name_template(template)
        .vnet_hdr(vnet_hdr)
        .queues(queues(spec, virtio))
        .open()
        .map_err(|source| Error::Tap {
            instance: spec.name.clone(),
            nic: i,
            source,
        })
}

/// One `/dev/vhost-net` descriptor per TAP queue of each NIC when the
/// instance uses vhost-net (QEMU gets them as `vhostfds=`), else none.
pub(crate) fn open_vhost(spec: &InstanceSpec, taps: &[Tap]) -> Result<Vec<Vec<OwnedFd>>> {
    taps.iter().map(|tap| open_vhost_for(spec, tap)).collect()
}

/// The `/dev/vhost-net` descriptors of one TAP (none without vhost-net).
pub(crate) fn open_vhost_for(spec: &InstanceSpec, tap: &Tap) -> Result<Vec<OwnedFd>> {
    if !kvm_cmdline::uses_vhost(&spec.hvparams) {
        return Ok(Vec::new());
    }
    (0..tap.fds().len())
        .map(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(VHOST_NET)
                .map(OwnedFd::from)
                .map_err(|e| Error::Start {
                    instance: spec.name.clone(),
                    step: "vhost-net",
                    reason: format!("vhost_net=true but {VHOST_NET} cannot be opened: {e}"),
                })
        })
        .collect()
}

/// The kernel's vhost-net device.
pub(crate) const VHOST_NET: &str = "/dev/vhost-net";

/// The environment the NIC script gets (Ganeti 3.1's names; `ACTION` is
/// added by the caller: `up` or `down`).
pub fn nic_script_env(
    spec: &InstanceSpec,
    seq: usize,
    nic: &NicSpec,
    interface: &str,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("INSTANCE".to_owned(), spec.name.clone()),
        ("MAC".to_owned(), nic.mac.to_string()),
        ("MODE".to_owned(), nic.mode.as_str().to_owned()),
        ("INTERFACE".to_owned(), interface.to_owned()),
        ("INTERFACE_INDEX".to_owned(), seq.to_string()),
        ("TAGS".to_owned(), spec.tags.join(" ")),
    ];
    let mut opt = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            env.push((k.to_owned(), v));
        }
    };
    opt("INTERFACE_UUID", nic.uuid.as_ref().map(ToString::to_string));
    opt("INTERFACE_NAME", nic.name.clone());
    opt("IP", nic.ip.clone());
    opt("LINK", (!nic.link.is_empty()).then(|| nic.link.clone()));
    opt("VLAN", nic.vlan.clone());
    if let Some(n) = &nic.network {
        opt("NETWORK_NAME", Some(n.name.clone()));
        opt("NETWORK_UUID", n.uuid.as_ref().map(ToString::to_string));
        opt("NETWORK_TAGS", Some(n.tags.join(" ")));
        for (k, v) in [
            ("NETWORK_SUBNET", &n.subnet),
            ("NETWORK_GATEWAY", &n.gateway),
            ("NETWORK_SUBNET6", &n.subnet6),
            ("NETWORK_GATEWAY6", &n.gateway6),
            ("NETWORK_MAC_PREFIX", &n.mac_prefix),
            ("NETWORK_TYPE", &n.network_type),
        ] {
            opt(k, v.clone());
        }
    }
    if nic.mode == NicMode::Bridged {
        opt("BRIDGE", Some(nic.link.clone()));
    }
    env
}

/// How long a NIC script or network tool may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `program args` with `env` (and a sane `PATH`), bounded by
/// [`SCRIPT_TIMEOUT`]; the error says what ran and what it printed.
fn run_tool(
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> std::result::Result<(), String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut child = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", format!("{path}:/sbin:/usr/sbin:/bin:/usr/bin"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let deadline = std::time::Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not finish within {} s",
                    SCRIPT_TIMEOUT.as_secs()
                ));
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    Err(format!("{shown} failed ({status}): {}", err.trim()))
}

/// Whether `tap` of a NIC in `mode` is a Ganeti 3.1 instance-communication
/// TAP (Ganeti's `is_instance_communication_tap`: routed, named
/// `gnt.com.N`).
pub fn is_instance_communication_tap(mode: NicMode, tap: &str) -> bool {
    mode == NicMode::Routed && tap.starts_with(COMMUNICATION_TAP_PREFIX)
}

/// The name prefix of Ganeti's instance-communication TAPs.
const COMMUNICATION_TAP_PREFIX: &str = "gnt.com.";

/// Configures NIC `seq`'s TAP: runs the NIC up script `INTERFACE` with
/// Ganeti's environment and `ACTION=up` when the node has one; else
/// natively, as Ganeti's `kvm-ifup` would: link up, then per mode —
/// bridged: join the bridge; routed: a host route to the NIC's IP (in
/// table `link` with a rule for the TAP when a table is given), proxy
/// ARP/NDP and forwarding, as Ganeti's `net-routed-up`; an
/// instance-communication TAP instead runs the node's communication
/// script (`kvm-ifup-os`); openvswitch: `ovs-vsctl add-port` with the
/// VLAN tag and trunks, as `net-ovs-up`; ext: nothing more.
pub(crate) async fn configure(
    spec: &InstanceSpec,
    seq: usize,
    tap: &str,
    config: &crate::Config,
) -> Result<()> {
    let nic = &spec.nics[seq];
    let fail = |reason: String| Error::Start {
        instance: spec.name.clone(),
        step: "NIC configuration",
        reason,
    };
    let communication = is_instance_communication_tap(nic.mode, tap);
    let script = match (&config.nic_script, &config.nic_communication_script) {
        (Some(up), _) => Some(up),
        (None, Some(os)) if communication => Some(os),
        _ => None,
    };
    // gkvm brings the TAP up itself when it configures the NIC natively,
    // and before a communication script (the node's NIC up script does
    // all of it).
    if script.is_none() || (communication && config.nic_script.is_none()) {
        gkvm_tap::set_link_up(tap).map_err(|source| Error::Tap {
            instance: spec.name.clone(),
            nic: seq,
            source,
        })?;
    }
    if let Some(script) = script {
        let mut env = nic_script_env(spec, seq, nic, tap);
        env.push(("ACTION".into(), "up".into()));
        let (script, tap) = (script.to_owned(), tap.to_owned());
        return tokio::task::spawn_blocking(move || run_tool(&script, &[&tap], &env))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(fail);
    }
    if communication {
        // Up, and no routing table to join: that is all without a script.
        return Ok(());
    }
    match nic.mode {
        NicMode::Bridged if !nic.link.is_empty() => gkvm_tap::bridge_add_interface(&nic.link, tap)
            .map_err(|source| Error::Tap {
                instance: spec.name.clone(),
                nic: seq,
                source,
            }),
        NicMode::Bridged | NicMode::Ext => Ok(()),
        NicMode::Routed | NicMode::Openvswitch => {
            let (nic, tap) = (nic.clone(), tap.to_owned());
            tokio::task::spawn_blocking(move || native_up(&nic, &tap))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| fail(format!("NIC {seq} ({}): {e}", nic_mode_name(spec, seq))))
        }
    }
}

fn nic_mode_name(spec: &InstanceSpec, seq: usize) -> &'static str {
    spec.nics[seq].mode.as_str()
}

/// `ip [-6] ...`, the family from the NIC's address.
fn ip_tool(v6: bool, args: &[&str]) -> std::result::Result<(), String> {
    let mut all = Vec::with_capacity(args.len() + 1);
    if v6 {
        all.push("-6");
    }
    all.extend_from_slice(args);
    run_tool(Path::new("ip"), &all, &[])
}

/// Deletes every routing rule for packets from `tap` (Ganeti's
/// `while ip rule del dev TAP`), bounded in case `ip` keeps succeeding.
fn delete_rules(v6: bool, tap: &str) {
    for _ in 0..64 {
        if ip_tool(v6, &["rule", "del", "dev", tap]).is_err() {
            break;
        }
    }
}

fn native_up(nic: &NicSpec, tap: &str) -> std::result::Result<(), String> {
    match nic.mode {
        NicMode::Routed => {
            let ip = nic.ip.as_deref().unwrap_or_default();
            let v6 = ip.contains(':');
            if nic.link.is_empty() {
                ip_tool(v6, &["route", "replace", ip, "proto", "static", "dev", tap])?;
            } else {
                delete_rules(v6, tap);
                ip_tool(v6, &["rule", "add", "dev", tap, "table", &nic.link])?;
                ip_tool(
                    v6,
                    &[
                        "route", "replace", ip, "table", &nic.link, "proto", "static", "dev", tap,
                    ],
                )?;
            }
            for (file, value) in [
                (format!("/proc/sys/net/ipv4/conf/{tap}/proxy_arp"), "1"),
                (format!("/proc/sys/net/ipv4/conf/{tap}/forwarding"), "1"),
                (format!("/proc/sys/net/ipv6/conf/{tap}/proxy_ndp"), "1"),
                (format!("/proc/sys/net/ipv6/conf/{tap}/forwarding"), "1"),
            ] {
                if Path::new(&file).exists() {
                    std::fs::write(&file, value).map_err(|e| format!("{file}: {e}"))?;
                }
            }
            Ok(())
        }
        NicMode::Openvswitch => {
            let ovs = Path::new("ovs-vsctl");
            run_tool(ovs, &["--if-exists", "del-port", tap], &[])?;
            let mut args = vec!["add-port".to_owned(), nic.link.clone(), tap.to_owned()];
            args.extend(ovs_vlan_settings(tap, nic.vlan.as_deref()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tool(ovs, &args, &[])
        }
        _ => Ok(()),
    }
}

/// The `-- set port TAP tag=N trunks=A,B` part of `ovs-vsctl add-port`
/// for Ganeti's VLAN syntax (`.N` untagged, `:A:B` tagged).
fn ovs_vlan_settings(tap: &str, vlan: Option<&str>) -> Vec<String> {
    let Some(vlan) = vlan else {
        return Vec::new();
    };
    let mut parts = vlan.split(':');
    let access = parts.next().unwrap_or("").trim_start_matches('.');
    let trunks: Vec<&str> = parts.filter(|p| !p.is_empty()).collect();
    let mut set = Vec::new();
    if !access.is_empty() {
        set.push(format!("tag={access}"));
    }
    if !trunks.is_empty() {
        set.push(format!("trunks={}", trunks.join(",")));
    }
    if set.is_empty() {
        return Vec::new();
    }
    let mut args = vec![
        "--".to_owned(),
        "set".to_owned(),
        "port".to_owned(),
        tap.to_owned(),
    ];
    args.extend(set);
    args
}

/// Undoes NIC `seq`'s configuration once its TAP is gone or going (stop,
/// migration away, failed start): runs the down script (Ganeti 3.1's
/// `kvm-ifdown`, `ACTION=down`) when one is configured, else natively
/// removes what the kernel does not remove with the TAP — a routed NIC's
/// rule for its table, an Open vSwitch port record. Best effort: a
/// failure is logged, as Ganeti does, and never keeps an instance from
/// stopping.
pub(crate) fn deconfigure(spec: &InstanceSpec, seq: usize, tap: &str, script: Option<&Path>) {
    let Some(nic) = spec.nics.get(seq) else {
        return;
    };
    let result = if let Some(script) = script {
        let mut env = nic_script_env(spec, seq, nic, tap);
        env.push(("ACTION".into(), "down".into()));
        run_tool(script, &[tap], &env)
    } else {
        match nic.mode {
            NicMode::Routed if is_instance_communication_tap(nic.mode, tap) => Ok(()),
            NicMode::Routed if !nic.link.is_empty() => {
                delete_rules(nic.ip.as_deref().is_some_and(|ip| ip.contains(':')), tap);
                Ok(())
            }
            NicMode::Openvswitch => run_tool(
                Path::new("ovs-vsctl"),
                &["--if-exists", "del-port", &nic.link, tap],
                &[],
            ),
            _ => Ok(()),
        }
    };
    if let Err(e) = result {
        tracing::warn!(instance = %spec.name, nic = seq, tap, error = %e, "NIC teardown failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovs_vlans_as_net_ovs_up() {
        let set = |v| ovs_vlan_settings("t0", v).join(" ");
        assert_eq!(set(None), "");
        assert_eq!(set(Some(".100")), "-- set port t0 tag=100");
        assert_eq!(set(Some("100")), "-- set port t0 tag=100");
        assert_eq!(set(Some(":10:20")), "-- set port t0 trunks=10,20");
        assert_eq!(set(Some(".5:10:20")), "-- set port t0 tag=5 trunks=10,20");
    }

    #[test]
    fn a_failing_tool_says_what_ran_and_what_it_printed() {
        let e = run_tool(Path::new("sh"), &["-c", "echo nope >&2; exit 3"], &[]).unwrap_err();
        assert!(
            e.contains("sh -c") && e.contains("nope") && e.contains('3'),
            "{e}"
        );
        let e = run_tool(Path::new("/nonexistent/tool"), &[], &[]).unwrap_err();
        assert!(e.contains("cannot run /nonexistent/tool"), "{e}");
    }
}
