//! TAP interfaces for an instance's NICs, configured by the NIC script with
//! Ganeti's environment or natively (link up, bridge attach).

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
    let vnet_hdr = if virtio && spec.hvparams.vnet_hdr {
        VnetHdr::Auto
    } else {
        VnetHdr::Off
    };
    spec.nics
        .iter()
        .enumerate()
        .map(|(i, _)| {
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
        })
        .collect()
}

/// One `/dev/vhost-net` descriptor per TAP queue of each NIC when the
/// instance uses vhost-net (QEMU gets them as `vhostfds=`), else none.
pub(crate) fn open_vhost(spec: &InstanceSpec, taps: &[Tap]) -> Result<Vec<Vec<OwnedFd>>> {
    if !kvm_cmdline::uses_vhost(&spec.hvparams) {
        return Ok(taps.iter().map(|_| Vec::new()).collect());
    }
    taps.iter()
        .map(|tap| {
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
        })
        .collect()
}

/// The kernel's vhost-net device.
pub(crate) const VHOST_NET: &str = "/dev/vhost-net";

/// The environment the NIC script gets (Ganeti's names).
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
    if let Some(ip) = &nic.ip {
        env.push(("IP".into(), ip.clone()));
    }
    if !nic.link.is_empty() {
        env.push(("LINK".into(), nic.link.clone()));
    }
    if let Some(n) = &nic.network {
        env.push(("NETWORK_NAME".into(), n.name.clone()));
        for (k, v) in [
            ("NETWORK_SUBNET", &n.subnet),
            ("NETWORK_GATEWAY", &n.gateway),
            ("NETWORK_SUBNET6", &n.subnet6),
            ("NETWORK_GATEWAY6", &n.gateway6),
            ("NETWORK_MAC_PREFIX", &n.mac_prefix),
            ("NETWORK_TYPE", &n.network_type),
        ] {
            if let Some(v) = v {
                env.push((k.into(), v.clone()));
            }
        }
    }
    if nic.mode == NicMode::Bridged {
        env.push(("BRIDGE".into(), nic.link.clone()));
    }
    env
}

/// Configures NIC `seq`'s TAP: runs `script INTERFACE` with Ganeti's
/// environment when one is configured, else brings the link up and, for
/// bridged NICs, attaches it to the bridge.
pub(crate) async fn configure(
    spec: &InstanceSpec,
    seq: usize,
    tap: &str,
    script: Option<&Path>,
) -> Result<()> {
    let nic = &spec.nics[seq];
    let fail = |reason: String| Error::Start {
        instance: spec.name.clone(),
        step: "NIC configuration",
        reason,
    };
    if let Some(script) = script {
        let path = std::env::var("PATH").unwrap_or_default();
        let mut cmd = tokio::process::Command::new(script);
        cmd.arg(tap)
            .env_clear()
            .env("PATH", format!("{path}:/sbin:/usr/sbin"))
            .envs(nic_script_env(spec, seq, nic, tap))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| {
                fail(format!(
                    "{} {} did not finish within 60 s",
                    script.display(),
                    tap
                ))
            })?
            .map_err(|e| fail(format!("cannot run {}: {e}", script.display())))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{} {} failed ({}): {}",
                script.display(),
                tap,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        return Ok(());
    }
    let tap_err = |source| Error::Tap {
        instance: spec.name.clone(),
        nic: seq,
        source,
    };
    gkvm_tap::set_link_up(tap).map_err(tap_err)?;
    match nic.mode {
        NicMode::Bridged if !nic.link.is_empty() => {
            gkvm_tap::bridge_add_interface(&nic.link, tap).map_err(tap_err)
        }
        NicMode::Bridged | NicMode::Routed => Ok(()),
        NicMode::Openvswitch => Err(fail(format!(
            "NIC {seq} is in openvswitch mode, which needs a NIC script (none configured)"
        ))),
    }
}
