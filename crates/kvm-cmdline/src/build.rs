//! Building QEMU's argv from an instance, its hvparams and a QEMU's
//! capabilities: Ganeti's `_GenerateKVMRuntime` (the instance part, saved
//! in the runtime file and sent to a migration target) and the argv part of
//! its `_ExecuteKVMRuntime` (node paths, NIC descriptors, `-incoming`, `-S`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::escape::{opt_path, opt_value, path_str, whole_arg};
use crate::hvparams::{
    BootOrder, DiskCache, DiskType, KvmFlag, NicType, RebootBehavior, SecurityModel,
};
use crate::instance::DiskMode;
use crate::{Capabilities, Error, InstanceSpec};

/// VNC displays are counted from this TCP port.
pub const VNC_BASE_PORT: u16 = 5900;

/// The built argv of an instance, before its start-time parts. This is
/// what the runtime file keeps and what a migration target receives: it
/// holds no node-local path or descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QemuCommand {
    /// The command line; `argv[0]` is the QEMU binary.
    pub argv: Vec<String>,
    /// The concrete machine type it was built for (`pc` resolved), which a
    /// migration target must use too.
    pub machine: String,
}

/// Node-wide inputs of the instance part that are not hvparams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildEnv {
    /// SPICE TLS CA certificate.
    pub spice_cacert: PathBuf,
    /// SPICE TLS certificate (and key, in one file as Ganeti has it).
    pub spice_cert: PathBuf,
    /// The address of the `spice_bind` interface when it names one (the
    /// caller looks it up; this crate does no I/O).
    pub spice_address: Option<IpAddr>,
}

impl Default for BuildEnv {
    fn default() -> Self {
        BuildEnv {
            spice_cacert: PathBuf::from("/etc/gkvm/spice-ca.pem"),
            spice_cert: PathBuf::from("/etc/gkvm/spice.pem"),
            spice_address: None,
        }
    }
}

/// Where this node keeps the instance's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    /// QEMU writes its pid here.
    pub pidfile: PathBuf,
    /// The QMP socket.
    pub qmp: PathBuf,
    /// A second QMP socket for long-lived watchers, if wanted.
    pub qmp_watch: Option<PathBuf>,
    /// The serial console socket.
    pub serial: PathBuf,
    /// The chroot directory (`use_chroot`).
    pub chroot: PathBuf,
    /// The keymap file (`keymap`).
    pub keymap: PathBuf,
}

/// The TAP descriptors of one NIC (one per queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicBackend {
    /// Descriptor numbers as the child will see them.
    pub tap_fds: Vec<i32>,
}

/// The start-time parts of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Node paths.
    pub node: NodePaths,
    /// Start with the vCPUs stopped (`-S`).
    pub paused: bool,
    /// Let QEMU daemonize once initialized (`-daemonize`).
    pub daemonize: bool,
    /// Wait for an incoming migration at this URI (`-incoming`).
    pub incoming: Option<String>,
    /// One backend per NIC of the instance, in order.
    pub nics: Vec<NicBackend>,
    /// The user to run as when `security_model` is `pool` (the caller
    /// allocated its uid); `user` takes `security_domain`.
    pub pool_user: Option<String>,
    /// Whether `/dev/vhost-net` exists on this node.
    pub vhost_net_available: bool,
}

/// The keymap file to write at [`NodePaths::keymap`] before a launch, if
/// this QEMU needs one: old QEMU reads a file that includes en-us first, so
/// a missing layout still leaves a usable keyboard (as Ganeti does); QEMU
/// 4.0 and later refuse include files and get the layout name instead.
pub fn keymap_file(hv: &crate::HvParams, caps: &Capabilities) -> Option<String> {
    (!hv.keymap.is_empty() && caps.features.keymap_include_files)
        .then(|| format!("include en-us\ninclude {}\n", hv.keymap))
}

struct Argv(Vec<String>);

impl Argv {
    fn flag(&mut self, f: &str) {
        self.0.push(f.to_owned());
    }
    fn opt(&mut self, f: &str, v: impl Into<String>) {
        self.0.push(f.to_owned());
        self.0.push(v.into());
    }
}

fn unsupported(caps: &Capabilities, key: &str, what: &str) -> Error {
    Error::Unsupported {
        key: key.into(),
        what: what.into(),
        version: caps.version.text.clone(),
    }
}

/// Builds the instance part of the argv.
pub fn build(
    spec: &InstanceSpec,
    caps: &Capabilities,
    env: &BuildEnv,
) -> Result<QemuCommand, Error> {
    spec.validate()?;
    let hv = &spec.hvparams;
    hv.check_syntax()?;
    let f = &caps.features;
    let instance_err = |field: &str, reason: String| Error::Instance {
        instance: spec.name.clone(),
        field: field.into(),
        reason,
    };

    let mut a = Argv(vec![path_str("kvm_path", &hv.kvm_path)?.to_owned()]);
    a.opt("-name", spec.name.clone());
    a.opt("-m", spec.memory.to_string());

    let mut smp = spec.vcpus.to_string();
    for (k, v) in [
        ("cores", hv.cpu_cores),
        ("threads", hv.cpu_threads),
        ("sockets", hv.cpu_sockets),
    ] {
        if v > 0 {
            smp.push_str(&format!(",{k}={v}"));
        }
    }
    a.opt("-smp", smp);
    if !hv.cpu_mask.is_all()
        && hv.cpu_mask.sets().len() > 1
        && hv.cpu_mask.sets().len() != spec.vcpus as usize
    {
        return Err(Error::Syntax {
            key: "cpu_mask".into(),
            reason: format!(
                "has {} per-vCPU sets but the instance has {} vCPUs",
                hv.cpu_mask.sets().len(),
                spec.vcpus
            ),
        });
    }

    // The balloon: Ganeti's -balloon is long gone.
    if f.balloon_option {
        a.opt("-balloon", "virtio");
    } else if caps.has_device("virtio-balloon-pci") {
        a.opt("-device", "virtio-balloon-pci,id=balloon0");
    } else {
        return Err(unsupported(
            caps,
            "memory",
            "a virtio balloon (-balloon or virtio-balloon-pci)",
        ));
    }

    let acpi_via_machine = !hv.acpi && !f.no_acpi;
    if !hv.acpi && f.no_acpi {
        a.flag("-no-acpi");
    }
    if hv.reboot_behavior == RebootBehavior::Exit {
        a.flag("-no-reboot");
    }

    let machine = caps.resolve_machine(&hv.machine_version)?;
    let machine_opt = opt_value("machine_version", &machine)?;
    if f.machine {
        let mut spec_s = machine_opt;
        spec_s.push_str(match hv.kvm_flag {
            KvmFlag::Enabled => ",accel=kvm",
            KvmFlag::Disabled => ",accel=tcg",
        });
        if acpi_via_machine {
            spec_s.push_str(",acpi=off");
        }
        a.opt("-machine", spec_s);
    } else {
        if acpi_via_machine {
            return Err(unsupported(
                caps,
                "acpi",
                "turning ACPI off (-no-acpi or -machine acpi=off)",
            ));
        }
        a.opt("-M", machine_opt);
        match hv.kvm_flag {
            KvmFlag::Enabled if f.enable_kvm => a.flag("-enable-kvm"),
            KvmFlag::Disabled if f.disable_kvm => a.flag("-disable-kvm"),
            _ => {}
        }
    }

    let kernel = hv.kernel_path.is_some();
    let boot = |o: BootOrder| !kernel && hv.boot_order == o;
    if boot(BootOrder::Network) {
        a.opt("-boot", "n");
    }

    // Disks. Modern QEMU: a backend without a bus (-drive if=none) plus a
    // -device, with bootindex for the boot disk. Old qemu-kvm: Ganeti's
    // -drive if=...,boot=on.
    let legacy_drives = f.drive_boot || caps.devices.is_empty();
    let mut scsi_controller = false;
    let mut boot_disk = boot(BootOrder::Disk);
    for (i, disk) in spec.disks.iter().enumerate() {
        let field = format!("disks[{i}].path");
        if !disk.path.is_absolute() {
            return Err(instance_err(
                &field,
                format!("{} is not an absolute path", disk.path.display()),
            ));
        }
        let path = opt_path(&field, &disk.path)?;
        let cache = if disk.is_shared_storage() {
            ",cache=none".to_owned()
        } else if hv.disk_cache != DiskCache::Default {
            format!(",cache={}", hv.disk_cache)
        } else {
            String::new()
        };
        let ro = if disk.mode == DiskMode::ReadOnly {
            ",readonly=on"
        } else {
            ""
        };
        let is_boot = std::mem::take(&mut boot_disk);
        if legacy_drives {
            let iface = match hv.disk_type {
                DiskType::Paravirtual => "virtio".to_owned(),
                other => other.to_string(),
            };
            let mut boot_val = "";
            if is_boot {
                a.opt("-boot", "c");
                if f.drive_boot && hv.disk_type != DiskType::Ide {
                    boot_val = ",boot=on";
                }
            }
            a.opt(
                "-drive",
                format!("file={path},format=raw,if={iface}{boot_val}{cache}{ro}"),
            );
            continue;
        }
        let id = format!("disk{i}");
        let bootindex = if is_boot { ",bootindex=1" } else { "" };
        let device = match hv.disk_type {
            DiskType::Paravirtual => Some(format!("virtio-blk-pci,drive={id}{bootindex}")),
            DiskType::Ide => Some(format!("ide-hd,drive={id}{bootindex}")),
            DiskType::Scsi => Some(format!("scsi-hd,drive={id},bus=scsi0.0{bootindex}")),
            DiskType::Sd | DiskType::Mtd | DiskType::Pflash => None,
        };
        match device {
            Some(dev) => {
                if hv.disk_type == DiskType::Scsi && !std::mem::replace(&mut scsi_controller, true)
                {
                    a.opt("-device", "virtio-scsi-pci,id=scsi0");
                }
                a.opt(
                    "-drive",
                    format!("file={path},format=raw,if=none,id={id}{cache}{ro}"),
                );
                a.opt("-device", dev);
            }
            None => {
                a.opt(
                    "-drive",
                    format!("file={path},format=raw,if={}{cache}{ro}", hv.disk_type),
                );
            }
        }
    }

    // CD-ROMs.
    let cdrom_type = hv.cdrom_disk_type.unwrap_or(hv.disk_type);
    for (n, image, bootable) in [
        (0, &hv.cdrom_image_path, boot(BootOrder::Cdrom)),
        (1, &hv.cdrom2_image_path, false),
    ] {
        let Some(image) = image else { continue };
        let key = if n == 0 {
            "cdrom_image_path"
        } else {
            "cdrom2_image_path"
        };
        let path = opt_path(key, image)?;
        // Ganeti boots CD-ROMs from IDE whatever cdrom_disk_type says.
        let kind = if bootable { DiskType::Ide } else { cdrom_type };
        if legacy_drives {
            let iface = if kind == DiskType::Paravirtual {
                "virtio".to_owned()
            } else {
                kind.to_string()
            };
            let mut boot_val = "";
            if bootable {
                a.opt("-boot", "d");
                if f.drive_boot {
                    boot_val = ",boot=on";
                }
            }
            a.opt(
                "-drive",
                format!("file={path},format=raw,media=cdrom,if={iface}{boot_val}"),
            );
            continue;
        }
        let id = format!("cdrom{n}");
        let bootindex = if bootable { ",bootindex=1" } else { "" };
        let device = match kind {
            DiskType::Ide => Some(format!("ide-cd,drive={id}{bootindex}")),
            DiskType::Paravirtual => Some(format!("virtio-blk-pci,drive={id}{bootindex}")),
            DiskType::Scsi => Some(format!("scsi-cd,drive={id},bus=scsi0.0{bootindex}")),
            _ => None,
        };
        match device {
            Some(dev) => {
                if kind == DiskType::Scsi && !std::mem::replace(&mut scsi_controller, true) {
                    a.opt("-device", "virtio-scsi-pci,id=scsi0");
                }
                a.opt(
                    "-drive",
                    format!("file={path},format=raw,media=cdrom,if=none,id={id},readonly=on"),
                );
                a.opt("-device", dev);
            }
            None => a.opt(
                "-drive",
                format!("file={path},format=raw,media=cdrom,if={kind}"),
            ),
        }
    }

    if let Some(floppy) = &hv.floppy_image_path {
        let path = opt_path("floppy_image_path", floppy)?;
        let mut boot_val = "";
        if boot(BootOrder::Floppy) {
            a.opt("-boot", "a");
            if f.drive_boot {
                boot_val = ",boot=on";
            }
        }
        a.opt(
            "-drive",
            format!("file={path},format=raw,media=disk{boot_val},if=floppy"),
        );
    }

    if let Some(k) = &hv.kernel_path {
        a.opt(
            "-kernel",
            whole_arg("kernel_path", path_str("kernel_path", k)?)?,
        );
        if let Some(i) = &hv.initrd_path {
            // A whole argument: QEMU does not split a Linux initrd on commas.
            a.opt(
                "-initrd",
                whole_arg("initrd_path", path_str("initrd_path", i)?)?,
            );
        }
        let mut append = vec![format!("root={}", hv.root_path)];
        if !hv.kernel_args.is_empty() {
            append.push(hv.kernel_args.clone());
        }
        if hv.serial_console {
            append.push(format!("console=ttyS0,{}", hv.serial_speed));
        }
        a.opt("-append", whole_arg("kernel_args", &append.join(" "))?);
    }

    if let Some(m) = &hv.mem_path {
        a.opt(
            "-mem-path",
            whole_arg("mem_path", path_str("mem_path", m)?)?,
        );
        a.flag("-mem-prealloc");
    }

    // USB and pointing device.
    a.flag("-usb");
    let mouse = hv
        .usb_mouse
        .map(|m| m.as_str())
        .or(if hv.vnc_bind_address.is_empty() {
            None
        } else {
            Some("tablet")
        });
    if let Some(m) = mouse {
        if f.usb_devices && caps.has_device(&format!("usb-{m}")) {
            a.opt("-device", format!("usb-{m}"));
        } else if f.usbdevice {
            a.opt("-usbdevice", m);
        } else {
            return Err(unsupported(caps, "usb_mouse", "USB pointing devices"));
        }
    }

    let spice = !hv.spice_bind.is_empty();
    if !hv.vnc_bind_address.is_empty() {
        vnc(&mut a, spec, caps)?;
    } else if spice {
        spice_args(&mut a, spec, caps, env)?;
    } else if f.display {
        a.opt("-display", "none");
    } else {
        a.flag("-nographic");
    }

    if hv.use_localtime {
        if f.localtime {
            a.flag("-localtime");
        } else if f.rtc {
            a.opt("-rtc", "base=localtime");
        } else {
            return Err(unsupported(caps, "use_localtime", "a local-time RTC"));
        }
    }

    if !hv.cpu_type.is_empty() {
        a.opt("-cpu", whole_arg("cpu_type", &hv.cpu_type)?);
    }

    if !hv.soundhw.is_empty() {
        if f.audio {
            a.opt(
                "-audio",
                format!("none,model={}", opt_value("soundhw", &hv.soundhw)?),
            );
        } else if f.soundhw {
            a.opt("-soundhw", whole_arg("soundhw", &hv.soundhw)?);
        } else {
            return Err(unsupported(
                caps,
                "soundhw",
                "sound cards (-audio or -soundhw)",
            ));
        }
    }

    if !hv.vga.is_empty() {
        a.opt("-vga", whole_arg("vga", &hv.vga)?);
    } else if spice {
        a.opt("-vga", "qxl");
    }

    if !hv.usb_devices.is_empty() {
        if !f.usbdevice {
            return Err(unsupported(caps, "usb_devices", "-usbdevice"));
        }
        for dev in hv
            .usb_devices
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            a.opt("-usbdevice", whole_arg("usb_devices", dev)?);
        }
    }

    if let Some(uuid) = &spec.uuid {
        if f.uuid {
            a.opt("-uuid", uuid.clone());
        }
    }

    // Ganeti appended kvm_extra as one argument; split it so that
    // "-foo a -bar b" means what it says.
    for extra in hv.kvm_extra.split_whitespace() {
        a.flag(extra);
    }

    Ok(QemuCommand { argv: a.0, machine })
}

fn vnc(a: &mut Argv, spec: &InstanceSpec, caps: &Capabilities) -> Result<(), Error> {
    let hv = &spec.hvparams;
    let f = &caps.features;
    let flag = |name: &str| {
        if f.bool_suboptions {
            format!(",{name}=on")
        } else {
            format!(",{name}")
        }
    };
    let bind = &hv.vnc_bind_address;
    let arg = if bind.parse::<std::net::Ipv4Addr>().is_ok() {
        let port = spec.network_port.unwrap_or(0);
        if port <= VNC_BASE_PORT {
            return Err(Error::Instance {
                instance: spec.name.clone(),
                field: "network_port".into(),
                reason: format!("VNC needs a port above {VNC_BASE_PORT} (display = port - {VNC_BASE_PORT}), got {port}"),
            });
        }
        let display = port - VNC_BASE_PORT;
        let mut arg = if bind == "0.0.0.0" {
            format!(":{display}")
        } else {
            format!("{bind}:{display}")
        };
        if hv.vnc_tls {
            if f.tls_creds_object {
                let object = match &hv.vnc_x509_path {
                    Some(dir) => format!(
                        "tls-creds-x509,id=vnc-tls-creds0,dir={},endpoint=server,verify-peer={}",
                        opt_path("vnc_x509_path", dir)?,
                        if hv.vnc_x509_verify { "on" } else { "off" }
                    ),
                    None => "tls-creds-anon,id=vnc-tls-creds0,endpoint=server".to_owned(),
                };
                a.opt("-object", object);
                arg.push_str(",tls-creds=vnc-tls-creds0");
            } else {
                arg.push_str(",tls");
                match (&hv.vnc_x509_path, hv.vnc_x509_verify) {
                    (Some(d), true) => {
                        arg.push_str(&format!(",x509verify={}", opt_path("vnc_x509_path", d)?))
                    }
                    (Some(d), false) => {
                        arg.push_str(&format!(",x509={}", opt_path("vnc_x509_path", d)?))
                    }
                    (None, _) => {}
                }
            }
        }
        if hv.vnc_password_file.is_some() {
            arg.push_str(&flag("password"));
        }
        arg
    } else {
        format!(
            "unix:{}",
            opt_path(
                "vnc_bind_address",
                &Path::new(bind).join(format!("{}.vnc", spec.name))
            )?
        )
    };
    a.opt("-vnc", arg);
    Ok(())
}

fn spice_args(
    a: &mut Argv,
    spec: &InstanceSpec,
    caps: &Capabilities,
    env: &BuildEnv,
) -> Result<(), Error> {
    let hv = &spec.hvparams;
    let f = &caps.features;
    if !f.spice {
        return Err(unsupported(caps, "spice_bind", "SPICE (-spice)"));
    }
    let flag = |name: &str, v: bool| {
        if f.bool_suboptions {
            format!(",{name}={}", if v { "on" } else { "off" })
        } else if v {
            format!(",{name}")
        } else {
            format!(",{name}=off")
        }
    };
    let address: IpAddr = match hv.spice_bind.parse() {
        Ok(ip) => ip,
        Err(_) => env.spice_address.ok_or_else(|| Error::Host {
            key: "spice_bind".into(),
            reason: format!(
                "the address of interface {:?} was not resolved",
                hv.spice_bind
            ),
        })?,
    };
    let port = spec.network_port.ok_or_else(|| Error::Instance {
        instance: spec.name.clone(),
        field: "network_port".into(),
        reason: "SPICE needs a port".into(),
    })?;
    let mut arg = format!("addr={address}");
    if hv.spice_use_tls {
        arg.push_str(&format!(
            ",tls-port={port},x509-cacert-file={},x509-key-file={},x509-cert-file={}",
            opt_path("spice_cacert", &env.spice_cacert)?,
            opt_path("spice_cert", &env.spice_cert)?,
            opt_path("spice_cert", &env.spice_cert)?
        ));
        if !hv.spice_tls_ciphers.is_empty() {
            arg.push_str(&format!(
                ",tls-ciphers={}",
                opt_value("spice_tls_ciphers", &hv.spice_tls_ciphers)?
            ));
        }
    } else {
        arg.push_str(&format!(",port={port}"));
    }
    if hv.spice_password_file.is_none() {
        arg.push_str(&flag("disable-ticketing", true));
    }
    let ip_version = match hv.spice_ip_version {
        0 if hv.spice_bind.parse::<IpAddr>().is_err() => {
            Some(if address.is_ipv4() { 4 } else { 6 })
        }
        0 => None,
        v => Some(v),
    };
    if let Some(v) = ip_version {
        arg.push_str(&flag(&format!("ipv{v}"), true));
    }
    if let Some(c) = hv.spice_image_compression {
        arg.push_str(&format!(",image-compression={c}"));
    }
    if let Some(c) = hv.spice_jpeg_wan_compression {
        arg.push_str(&format!(",jpeg-wan-compression={c}"));
    }
    if let Some(c) = hv.spice_zlib_glz_wan_compression {
        arg.push_str(&format!(",zlib-glz-wan-compression={c}"));
    }
    if let Some(v) = hv.spice_streaming_video {
        arg.push_str(&format!(",streaming-video={v}"));
    }
    if !hv.spice_playback_compression {
        arg.push_str(",playback-compression=off");
    }
    if !hv.spice_use_vdagent {
        arg.push_str(",agent-mouse=off");
    } else {
        a.opt("-device", "virtio-serial-pci");
        a.opt(
            "-device",
            "virtserialport,chardev=spicechannel0,name=com.redhat.spice.0",
        );
        a.opt("-chardev", "spicevmc,id=spicechannel0,name=vdagent");
    }
    a.opt("-spice", arg);
    Ok(())
}

impl QemuCommand {
    /// The full argv for a start on this node: the instance part plus the
    /// pid file, daemonizing, serial console, chroot and user, keymap,
    /// NICs on the given TAP descriptors, `-incoming`, QMP and `-S`.
    pub fn launch_argv(
        &self,
        spec: &InstanceSpec,
        caps: &Capabilities,
        launch: &Launch,
    ) -> Result<Vec<String>, Error> {
        let hv = &spec.hvparams;
        let f = &caps.features;
        let node = &launch.node;
        let mut a = Argv(self.argv.clone());
        let socket_opts = if f.bool_suboptions {
            "server=on,wait=off"
        } else {
            "server,nowait"
        };

        a.opt(
            "-pidfile",
            whole_arg("pidfile", path_str("pidfile", &node.pidfile)?)?,
        );
        if launch.daemonize {
            a.flag("-daemonize");
        }
        if hv.serial_console {
            let path = opt_path("serial socket", &node.serial)?;
            a.opt("-serial", format!("unix:{path},{socket_opts}"));
        } else {
            a.opt("-serial", "none");
        }

        let run_as = match hv.security_model {
            SecurityModel::None => None,
            SecurityModel::User => Some(hv.security_domain.clone()),
            SecurityModel::Pool => {
                Some(launch.pool_user.clone().ok_or_else(|| Error::Instance {
                    instance: spec.name.clone(),
                    field: "security_model".into(),
                    reason: "pool: no user was allocated for this start".into(),
                })?)
            }
        };
        let chroot = hv.use_chroot.then(|| node.chroot.clone());
        if run_as.is_some() || chroot.is_some() {
            if f.run_with {
                let mut parts = Vec::new();
                if let Some(c) = &chroot {
                    parts.push(format!("chroot={}", opt_path("use_chroot", c)?));
                }
                if let Some(u) = &run_as {
                    parts.push(format!("user={}", opt_value("security_domain", u)?));
                }
                a.opt("-run-with", parts.join(","));
            } else {
                if let Some(c) = &chroot {
                    if !f.chroot {
                        return Err(unsupported(caps, "use_chroot", "-chroot or -run-with"));
                    }
                    a.opt(
                        "-chroot",
                        whole_arg("use_chroot", path_str("use_chroot", c)?)?,
                    );
                }
                if let Some(u) = &run_as {
                    if !f.runas {
                        return Err(unsupported(caps, "security_model", "-runas or -run-with"));
                    }
                    a.opt("-runas", whole_arg("security_domain", u)?);
                }
            }
        }

        if !hv.keymap.is_empty() {
            if f.keymap_include_files {
                a.opt(
                    "-k",
                    whole_arg("keymap", path_str("keymap", &node.keymap)?)?,
                );
            } else {
                a.opt("-k", whole_arg("keymap", &hv.keymap)?);
            }
        }

        if launch.nics.len() != spec.nics.len() {
            return Err(Error::Instance {
                instance: spec.name.clone(),
                field: "nics".into(),
                reason: format!(
                    "{} NICs but {} TAP backends",
                    spec.nics.len(),
                    launch.nics.len()
                ),
            });
        }
        if spec.nics.is_empty() {
            a.opt("-net", "none");
        }
        let paravirtual = hv.nic_type == NicType::Paravirtual;
        let model = if paravirtual {
            if caps.features.virtio_net_pci {
                "virtio-net-pci"
            } else {
                "virtio"
            }
        } else {
            hv.nic_type.as_str()
        };
        let vhost = if hv.vhost_net && paravirtual {
            if !(f.vhost_net && launch.vhost_net_available) {
                return Err(Error::Host {
                    key: "vhost_net".into(),
                    reason: "vhost-net is configured but not available (no /dev/vhost-net or QEMU lacks vhost)".into(),
                });
            }
            ",vhost=on"
        } else {
            ""
        };
        for (i, (nic, backend)) in spec.nics.iter().zip(&launch.nics).enumerate() {
            if backend.tap_fds.is_empty() {
                return Err(Error::Instance {
                    instance: spec.name.clone(),
                    field: format!("nics[{i}]"),
                    reason: "no TAP descriptor".into(),
                });
            }
            let queues = backend.tap_fds.len();
            if f.netdev {
                let fds = if queues == 1 {
                    format!("fd={}", backend.tap_fds[0])
                } else {
                    let list: Vec<String> = backend.tap_fds.iter().map(i32::to_string).collect();
                    format!("fds={}", list.join(":"))
                };
                a.opt("-netdev", format!("tap,id=netdev{i},{fds}{vhost}"));
                let mq = if queues > 1 && paravirtual {
                    format!(",mq=on,vectors={}", 2 * queues + 2)
                } else {
                    String::new()
                };
                a.opt(
                    "-device",
                    format!("{model},mac={},netdev=netdev{i}{mq}", nic.mac),
                );
            } else {
                a.opt("-net", format!("tap,vlan={i},fd={}", backend.tap_fds[0]));
                a.opt(
                    "-net",
                    format!("nic,vlan={i},macaddr={},model={model}", nic.mac),
                );
            }
        }

        if let Some(uri) = &launch.incoming {
            a.opt("-incoming", whole_arg("incoming", uri)?);
        }
        if !f.qmp {
            return Err(unsupported(
                caps,
                "kvm_path",
                "QMP (-qmp), which gkvm needs to manage QEMU",
            ));
        }
        a.opt(
            "-qmp",
            format!("unix:{},{socket_opts}", opt_path("qmp socket", &node.qmp)?),
        );
        if let Some(watch) = &node.qmp_watch {
            a.opt(
                "-qmp",
                format!("unix:{},{socket_opts}", opt_path("qmp socket", watch)?),
            );
        }
        if launch.paused {
            a.flag("-S");
        }
        Ok(a.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_initrd_path_is_one_whole_argument() {
        let caps = crate::Capabilities::from_help(
            include_str!("../tests/data/qemu-10.0/help.txt"),
            include_str!("../tests/data/qemu-10.0/machine.txt"),
            include_str!("../tests/data/qemu-10.0/device.txt"),
        )
        .unwrap();
        let mut spec = crate::InstanceSpec::new("i1", 64);
        spec.hvparams.set_pair("kernel_path=/boot/vmlinuz").unwrap();
        spec.hvparams.set_pair("initrd_path=/boot/a,b.img").unwrap();
        let cmd = crate::build(&spec, &caps, &crate::BuildEnv::default()).unwrap();
        let i = cmd.argv.iter().position(|a| a == "-initrd").unwrap();
        assert_eq!(cmd.argv[i + 1], "/boot/a,b.img");
    }
}
