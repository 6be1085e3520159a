//! Two checks, kept apart as Ganeti keeps them: syntax (the parameters
//! alone, no host access) and host validation (against facts about the
//! node, passed in so this stays pure).

use std::net::IpAddr;
use std::path::Path;

use crate::hvparams::{BootOrder, DiskType, NicType, SecurityModel, VALID_SERIAL_SPEEDS};
use crate::{Capabilities, Error, HvParams};

/// Most queues of a paravirtual NIC (Ganeti 3.1's `MAX_VIRTIO_NET_QUEUES`).
pub const MAX_VIRTIO_NET_QUEUES: u32 = 32;

fn syntax(key: &str, reason: impl Into<String>) -> Error {
    Error::Syntax {
        key: key.into(),
        reason: reason.into(),
    }
}

fn check_abs(key: &str, p: Option<&Path>) -> Result<(), Error> {
    match p {
        Some(p) if !p.is_absolute() => Err(syntax(
            key,
            format!("{} is not an absolute path", p.display()),
        )),
        Some(p) if p.to_string_lossy().chars().any(char::is_control) => {
            Err(syntax(key, format!("{p:?} contains control characters")))
        }
        _ => Ok(()),
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, `:` or whitespace.
fn is_interface_name(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
}

fn is_norm_abs(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|c| c == "." || c == "..") && !p.contains("//")
}

/// A parameter value that works but is rarely what one wants (Ganeti
/// 3.1's `AssessParameters`): shown, never refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Warning {
    /// The hvparam.
    pub key: &'static str,
    /// Why it is worth a second look.
    pub message: String,
}

impl HvParams {
    /// Ganeti 3.1's `AssessParameters`: values that work but are rarely
    /// what one wants. Its warnings about an unset or `pc` machine type do
    /// not apply: gkvm records the concrete machine and migrates with it.
    pub fn assess(&self) -> Vec<Warning> {
        let mut w = Vec::new();
        let mut warn = |key: &'static str, message: String| w.push(Warning { key, message });
        match self.cpu_type.as_str() {
            "" => warn("cpu_type", "unset: the guest gets QEMU's default model (qemu64), slow and without modern CPU security features".into()),
            t @ ("qemu32" | "qemu64" | "kvm32" | "kvm64") => warn("cpu_type", format!("{t} lacks modern CPU features and their security fixes")),
            "host" => warn("cpu_type", "host: live migration needs the exact same CPU on every node".into()),
            _ => {}
        }
        if self.sandbox == crate::hvparams::Sandbox::Off {
            warn(
                "sandbox",
                "off: a compromised QEMU may make any system call (reboot the host, load modules, ...)".into(),
            );
        }
        if !self.vhost_net && self.nic_type == NicType::Paravirtual {
            warn(
                "vhost_net",
                "off: paravirtual NICs have more latency and less throughput without it".into(),
            );
        }
        if self.migration_bandwidth == HvParams::default().migration_bandwidth {
            warn(
                "migration_bandwidth",
                format!(
                    "still the default {} MiB/s; today's networks do far more",
                    self.migration_bandwidth
                ),
            );
        }
        if self.disk_type != DiskType::Paravirtual {
            warn(
                "disk_type",
                format!(
                    "{}: virtio disks (paravirtual) perform best",
                    self.disk_type
                ),
            );
        }
        if self.nic_type != NicType::Paravirtual {
            warn(
                "nic_type",
                format!("{}: virtio NICs (paravirtual) perform best", self.nic_type),
            );
        }
        let exposed = |addr: &str| !addr.is_empty() && addr != "127.0.0.1" && addr != "::1";
        if exposed(&self.vnc_bind_address)
            && !self.vnc_tls
            && !self.vnc_bind_address.starts_with('/')
        {
            warn("vnc_tls", "VNC listens beyond this host without TLS".into());
        }
        if exposed(&self.spice_bind) && !self.spice_use_tls {
            warn(
                "spice_use_tls",
                "SPICE listens beyond this host without TLS".into(),
            );
        }
        if ["none", "microvm", "isapc", "x-remote"].contains(&self.machine_version.as_str()) {
            warn(
                "machine_version",
                format!(
                    "{} is not a machine type gkvm supports",
                    self.machine_version
                ),
            );
        }
        w
    }

    /// Ganeti's `CheckParameterSyntax`: parameters that do not fit
    /// together, and values outside their syntax. No host access.
    pub fn check_syntax(&self) -> Result<(), Error> {
        self.check_paths()?;
        self.check_combinations()?;
        self.check_display()?;
        self.cgroup_io_max()?;
        self.check_text()
    }

    /// Paths that must be absolute and normalized.
    fn check_paths(&self) -> Result<(), Error> {
        if !self.kvm_path.is_absolute() {
            return Err(syntax(
                "kvm_path",
                format!("{} is not an absolute path", self.kvm_path.display()),
            ));
        }
        check_abs("kvm_path", Some(&self.kvm_path))?;
        for (key, p) in [
            ("kernel_path", &self.kernel_path),
            ("initrd_path", &self.initrd_path),
            ("vnc_x509_path", &self.vnc_x509_path),
            ("vnc_password_file", &self.vnc_password_file),
            ("spice_password_file", &self.spice_password_file),
            ("floppy_image_path", &self.floppy_image_path),
            ("mem_path", &self.mem_path),
        ] {
            check_abs(key, p.as_deref())?;
        }
        // CD-ROM images may also be http(s) URLs, as in Ganeti.
        for (key, p) in [
            ("cdrom_image_path", &self.cdrom_image_path),
            ("cdrom2_image_path", &self.cdrom2_image_path),
        ] {
            match p.as_deref().and_then(image_url) {
                Some(url) => {
                    crate::qemu::storage_node(key, url)?;
                }
                None => check_abs(key, p.as_deref())?,
            }
        }
        Ok(())
    }

    /// Values that need or exclude others.
    fn check_combinations(&self) -> Result<(), Error> {
        if self.kernel_path.is_some() && self.root_path.is_empty() {
            return Err(syntax("root_path", "needed when kernel_path is set"));
        }
        if let Some(bad) = self.migration_capabilities().into_iter().find(|c| {
            !c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        }) {
            return Err(syntax(
                "migration_caps",
                format!(
                    "{bad:?} is not a migration capability name (lowercase letters, digits, -)"
                ),
            ));
        }
        if !(1..=MAX_VIRTIO_NET_QUEUES).contains(&self.virtio_net_queues) {
            return Err(syntax(
                "virtio_net_queues",
                format!(
                    "{} is not between 1 and {MAX_VIRTIO_NET_QUEUES}",
                    self.virtio_net_queues
                ),
            ));
        }
        if self.kvm_pci_reservations > u32::from(crate::instance::PCI_SLOTS) {
            return Err(syntax(
                "kvm_pci_reservations",
                "cannot exceed the 32 slots of a PCI bus",
            ));
        }
        if self.vnc_x509_verify && self.vnc_x509_path.is_none() {
            return Err(syntax(
                "vnc_x509_path",
                "must be set when vnc_x509_verify is",
            ));
        }
        if self.serial_console && !VALID_SERIAL_SPEEDS.contains(&self.serial_speed) {
            return Err(syntax(
                "serial_speed",
                format!(
                    "{} is not one of {VALID_SERIAL_SPEEDS:?}",
                    self.serial_speed
                ),
            ));
        }
        if self.boot_order == BootOrder::Cdrom && self.cdrom_image_path.is_none() {
            return Err(syntax(
                "boot_order",
                "cannot boot from cdrom without cdrom_image_path",
            ));
        }
        match self.security_model {
            SecurityModel::User if self.security_domain.is_empty() => {
                return Err(syntax(
                    "security_domain",
                    "security_model=user needs the user to run QEMU as",
                ))
            }
            SecurityModel::None | SecurityModel::Pool if !self.security_domain.is_empty() => {
                return Err(syntax(
                    "security_domain",
                    format!("must be empty with security_model={}", self.security_model),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// VNC and SPICE.
    fn check_display(&self) -> Result<(), Error> {
        let bind = &self.vnc_bind_address;
        if !bind.is_empty()
            && bind.parse::<IpAddr>().is_err()
            && !is_norm_abs(bind)
            && !is_interface_name(bind)
        {
            return Err(syntax(
                "vnc_bind_address",
                format!("{bind:?} is not an IP address, an interface name or an absolute path"),
            ));
        }
        if ![0, 4, 6].contains(&self.spice_ip_version) {
            return Err(syntax("spice_ip_version", "must be 0 (any), 4 or 6"));
        }
        if self.migration_port == 0 {
            return Err(syntax(
                "migration_port",
                "must be a TCP port from 1 to 65535",
            ));
        }
        if !self.spice_bind.is_empty() {
            if !self.vnc_bind_address.is_empty() {
                return Err(syntax(
                    "spice_bind",
                    "SPICE and VNC cannot both be configured",
                ));
            }
            if let Ok(ip) = self.spice_bind.parse::<IpAddr>() {
                let v = if ip.is_ipv4() { 4 } else { 6 };
                if self.spice_ip_version != 0 && self.spice_ip_version != v {
                    return Err(syntax(
                        "spice_ip_version",
                        format!(
                            "spice_bind {ip} is IPv{v} but spice_ip_version is {}",
                            self.spice_ip_version
                        ),
                    ));
                }
            }
        } else {
            let set: [(&str, bool); 7] = [
                ("spice_ip_version", self.spice_ip_version != 0),
                ("spice_password_file", self.spice_password_file.is_some()),
                (
                    "spice_image_compression",
                    self.spice_image_compression.is_some(),
                ),
                (
                    "spice_jpeg_wan_compression",
                    self.spice_jpeg_wan_compression.is_some(),
                ),
                (
                    "spice_zlib_glz_wan_compression",
                    self.spice_zlib_glz_wan_compression.is_some(),
                ),
                (
                    "spice_streaming_video",
                    self.spice_streaming_video.is_some(),
                ),
                ("spice_use_tls", self.spice_use_tls),
            ];
            if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
                return Err(syntax(key, "requires spice_bind to be set"));
            }
        }
        Ok(())
    }

    /// Free-text values QEMU receives.
    fn check_text(&self) -> Result<(), Error> {
        /// QEMU options gkvm sets itself; `kvm_extra` may not give them.
        const OWNED_OPTIONS: &[&str] = &[
            "-pidfile",
            "-qmp",
            "-qmp-pretty",
            "-daemonize",
            "-name",
            "-runas",
            "-chroot",
            "-run-with",
            "-incoming",
            "-S",
            "-D",
        ];
        for (key, v) in [
            ("root_path", &self.root_path),
            ("kernel_args", &self.kernel_args),
            ("keymap", &self.keymap),
            ("cpu_type", &self.cpu_type),
            ("soundhw", &self.soundhw),
            ("usb_devices", &self.usb_devices),
            ("vga", &self.vga),
            ("kvm_extra", &self.kvm_extra),
            ("machine_version", &self.machine_version),
            ("security_domain", &self.security_domain),
            ("spice_bind", &self.spice_bind),
            ("spice_tls_ciphers", &self.spice_tls_ciphers),
        ] {
            if v.chars().any(char::is_control) {
                return Err(syntax(key, format!("{v:?} contains control characters")));
            }
        }
        for arg in self.kvm_extra_args()? {
            // What gkvm itself decides (and relies on: stop, cleanup and
            // liveness find QEMU by its pid file and sockets) is not
            // kvm_extra's to change.
            let flag = arg.split('=').next().unwrap_or_default();
            let flag = match flag.strip_prefix("--") {
                Some(f) => format!("-{f}"),
                None => flag.to_owned(),
            };
            if OWNED_OPTIONS.contains(&flag.as_str()) {
                return Err(syntax(
                    "kvm_extra",
                    format!("{arg} is gkvm's to set (pid file, QMP, daemonizing, name, user, chroot, migration, log), not kvm_extra's"),
                ));
            }
        }
        if self.keymap.contains('/') {
            return Err(syntax(
                "keymap",
                "is a layout name such as de or fr-ch, not a path",
            ));
        }
        Ok(())
    }

    /// Ganeti's `ValidateParameters`: checks against the node. Call
    /// [`HvParams::check_syntax`] first.
    pub fn validate_host(&self, host: &dyn HostFacts, caps: &Capabilities) -> Result<(), Error> {
        let host_err = |key: &str, reason: String| Error::Host {
            key: key.into(),
            reason,
        };
        if !host.is_file(&self.kvm_path) {
            return Err(host_err(
                "kvm_path",
                format!("{} does not exist", self.kvm_path.display()),
            ));
        }
        for (key, p) in [
            ("kernel_path", &self.kernel_path),
            ("initrd_path", &self.initrd_path),
            ("vnc_password_file", &self.vnc_password_file),
            ("spice_password_file", &self.spice_password_file),
            ("floppy_image_path", &self.floppy_image_path),
            ("cdrom_image_path", &self.cdrom_image_path),
            ("cdrom2_image_path", &self.cdrom2_image_path),
        ] {
            if let Some(p) = p.as_deref().filter(|p| image_url(p).is_none()) {
                if !host.is_file(p) {
                    return Err(host_err(key, format!("{} is not a file", p.display())));
                }
            }
        }
        for (key, p) in [
            ("vnc_x509_path", &self.vnc_x509_path),
            ("mem_path", &self.mem_path),
        ] {
            if let Some(p) = p {
                if !host.is_dir(p) {
                    return Err(host_err(key, format!("{} is not a directory", p.display())));
                }
            }
        }
        if self.security_model == SecurityModel::User && !host.user_exists(&self.security_domain) {
            return Err(host_err(
                "security_domain",
                format!("unknown user {:?}", self.security_domain),
            ));
        }
        let bind = &self.vnc_bind_address;
        if !bind.is_empty()
            && !bind.starts_with('/')
            && bind.parse::<IpAddr>().is_err()
            && !host.interface_exists(bind)
        {
            return Err(host_err(
                "vnc_bind_address",
                format!("{bind:?} is neither an IP address nor a network interface of this node"),
            ));
        }
        if !self.spice_bind.is_empty() {
            if !caps.features.spice {
                return Err(Error::Unsupported {
                    key: "spice_bind".into(),
                    what: "SPICE (-spice)".into(),
                    version: caps.version.text.clone(),
                });
            }
            if self.spice_bind.parse::<IpAddr>().is_err()
                && !host.interface_exists(&self.spice_bind)
            {
                return Err(host_err(
                    "spice_bind",
                    format!(
                        "{:?} is neither an IP address nor a network interface",
                        self.spice_bind
                    ),
                ));
            }
        }
        if self.vhost_net && !caps.features.vhost_net {
            return Err(Error::Unsupported {
                key: "vhost_net".into(),
                what: "vhost-net (the tap backend's vhost option)".into(),
                version: caps.version.text.clone(),
            });
        }
        if self.vhost_net && !host.vhost_net_available() {
            return Err(host_err(
                "vhost_net",
                "vhost_net=true but /dev/vhost-net cannot be opened on this node \
                 (load the vhost_net module, or set vhost_net=false)"
                    .into(),
            ));
        }
        caps.resolve_machine(&self.machine_version)?;
        Ok(())
    }
}

/// The URL of a CD-ROM image given as `http://` or `https://` (QEMU's
/// curl driver reads it), or `None` for a path on the node.
pub fn image_url(image: &Path) -> Option<&str> {
    let text = image.to_str()?;
    let lower = text.get(..8)?.to_ascii_lowercase();
    (lower.starts_with("http://") || lower == "https://").then_some(text)
}

/// What host validation needs to know about the node.
pub trait HostFacts {
    /// Whether `path` is an existing regular file.
    fn is_file(&self, path: &Path) -> bool;
    /// Whether `path` is an existing directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Whether a user of this name exists.
    fn user_exists(&self, name: &str) -> bool;
    /// Whether a network interface of this name exists.
    fn interface_exists(&self, name: &str) -> bool;
    /// Whether `/dev/vhost-net` is usable.
    fn vhost_net_available(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assessment_flags_what_ganeti_3_1_flags() {
        let keys = |hv: &HvParams| hv.assess().iter().map(|w| w.key).collect::<Vec<_>>();
        assert_eq!(
            keys(&HvParams::default()),
            ["cpu_type", "vhost_net", "migration_bandwidth"]
        );
        let tuned = HvParams::from_pairs(&[
            "cpu_type=Skylake-Server",
            "vhost_net=true",
            "migration_bandwidth=1000",
            "vnc_bind_address=127.0.0.1",
        ])
        .unwrap();
        assert!(tuned.assess().is_empty(), "{:?}", tuned.assess());
        let open = HvParams::from_pairs(&["vnc_bind_address=0.0.0.0", "nic_type=e1000"]).unwrap();
        assert!(keys(&open).contains(&"vnc_tls") && keys(&open).contains(&"nic_type"));
    }

    #[test]
    fn kvm_extra_may_not_take_over_what_gkvm_owns() {
        for extra in [
            "-pidfile /tmp/x",
            "-smbios type=1 --daemonize",
            "-qmp unix:/tmp/q,server=on,wait=off",
            "-name other",
            "-runas nobody",
            "-chroot /",
            "-incoming tcp:0:4444",
        ] {
            let hv = HvParams::from_pairs(&[&format!("kvm_extra={extra}")]).unwrap();
            match hv.check_syntax() {
                Err(Error::Syntax { key, reason }) => {
                    assert_eq!(key, "kvm_extra");
                    assert!(reason.contains("gkvm's to set"), "{reason}");
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
        // Options of the guest's hardware stay the administrator's.
        for extra in [
            "-smbios type=1,manufacturer=gkvm",
            "-monitor none",
            "-serial null",
        ] {
            let hv = HvParams::from_pairs(&[&format!("kvm_extra={extra}")]).unwrap();
            hv.check_syntax().unwrap();
        }
    }
}
