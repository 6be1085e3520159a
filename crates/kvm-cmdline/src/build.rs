//! Building QEMU's argv from an instance, its hvparams and a QEMU's
//! capabilities: Ganeti's `_GenerateKVMRuntime` (the instance part, saved
//! in the runtime file and sent to a migration target) and the argv part of
//! its `_ExecuteKVMRuntime` (node paths, NIC descriptors, `-incoming`, `-S`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::escape::{opt_path, opt_value, path_str, whole_arg};
use crate::hvparams::{
    BootOrder, DiskAio, DiskCache, DiskDiscard, DiskType, Firmware, KvmFlag, NicType,
    RebootBehavior, Rng, Sandbox, ScsiControllerType, SecurityModel, Tpm, Watchdog,
};
use crate::instance::DiskMode;
use crate::placement::{disk_on_pci, nic_on_pci};
use crate::qemu::{
    Args, Blockdev, Chardev, Device, Drive, Machine, Netdev, Object, Props, Smp, Syntax, Value,
};
use crate::{Capabilities, Error, InstanceSpec, Layout, PcieSlots, PCIE_SLOTS, PCI_SLOTS};

/// VNC displays are counted from this TCP port.
pub const VNC_BASE_PORT: u16 = 5900;

/// The built argv of an instance, before its start-time parts. This is
/// what the runtime file keeps and what a migration target receives: it
/// holds no node-local path or descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// The addresses of the node's interfaces that `vnc_bind_address` or
    /// `spice_bind` name, by interface (the caller looks them up; this
    /// crate does no I/O). Resolved on each node at each start, so a
    /// migrated instance listens on its new node's address.
    pub interfaces: std::collections::BTreeMap<String, Vec<IpAddr>>,
}

impl Default for BuildEnv {
    fn default() -> Self {
        BuildEnv {
            spice_cacert: PathBuf::from("/etc/gkvm/spice-ca.pem"),
            spice_cert: PathBuf::from("/etc/gkvm/spice.pem"),
            interfaces: std::collections::BTreeMap::new(),
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
    /// The guest agent's socket (`use_guest_agent`).
    pub guest_agent: PathBuf,
    /// The chroot directory (`use_chroot`).
    pub chroot: PathBuf,
    /// The keymap file (`keymap`).
    pub keymap: PathBuf,
    /// QEMU's log (`-D`): with it, a daemonized QEMU keeps writing its
    /// messages to its stderr, which the caller points at this file.
    pub log: Option<PathBuf>,
    /// QEMU's event log (new starts only): a QMP monitor on a pipe
    /// chardev, reading `PATH.in` (which must say `qmp_capabilities`) and
    /// writing every event to `PATH.out`; both must exist before the
    /// launch.
    pub events: Option<PathBuf>,
    /// The UEFI firmware's files (`firmware` uefi or uefi-secboot): its
    /// code, read-only, and the instance's own variable store, which must
    /// exist (the caller copies the template at the first start).
    pub firmware: Option<FirmwareFiles>,
    /// The control socket of the instance's TPM emulator (`tpm=tpm2`;
    /// the caller starts a swtpm listening there first).
    pub tpm: Option<PathBuf>,
}

/// The two flash images of a UEFI machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFiles {
    /// The firmware's code (OVMF_CODE*.fd), read-only and shared.
    pub code: PathBuf,
    /// The instance's variable store (a copy of OVMF_VARS*.fd), writable.
    pub vars: PathBuf,
}

/// The block node names of a UEFI machine's flash images.
pub const FIRMWARE_CODE_NODE: &str = "gkvm-fw-code";
/// See [`FIRMWARE_CODE_NODE`].
pub const FIRMWARE_VARS_NODE: &str = "gkvm-fw-vars";

/// The descriptors of one NIC as the child will see them: a TAP queue
/// each, and with `vhost_net` a `/dev/vhost-net` descriptor per queue that
/// the caller opened (QEMU opens nothing itself, so it needs no access to
/// `/dev/vhost-net` under `use_chroot` or an unprivileged user).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NicBackend {
    /// TAP descriptors, one per queue.
    pub tap_fds: Vec<i32>,
    /// vhost-net descriptors, one per queue; empty without `vhost_net`.
    pub vhost_fds: Vec<i32>,
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
    /// The node's migration TLS directory (`ca-cert.pem`,
    /// `server-cert.pem`/`-key.pem`, `client-cert.pem`/`-key.pem`): QEMU
    /// loads both ends' credentials at start, before it drops privileges
    /// ([`MIGRATION_TLS_IN`], [`MIGRATION_TLS_OUT`]), and an incoming
    /// instance accepts its migration over TLS only, the peer verified.
    pub migration_tls: Option<PathBuf>,
}

/// The id of the TLS credentials an incoming migration is received with.
pub const MIGRATION_TLS_IN: &str = "gkvm-migtls-in";
/// The id of the TLS credentials an outgoing migration is sent with.
pub const MIGRATION_TLS_OUT: &str = "gkvm-migtls-out";

/// The keymap file to write at [`NodePaths::keymap`] before a launch, if
/// this QEMU needs one: old QEMU reads a file that includes en-us first, so
/// a missing layout still leaves a usable keyboard (as Ganeti does); QEMU
/// 4.0 and later refuse include files and get the layout name instead.
pub fn keymap_file(hv: &crate::HvParams, caps: &Capabilities) -> Option<String> {
    (!hv.keymap.is_empty() && caps.features.keymap_include_files)
        .then(|| format!("include en-us\ninclude {}\n", hv.keymap))
}

fn unsupported(caps: &Capabilities, key: &str, what: &str) -> Error {
    Error::Unsupported {
        key: key.into(),
        what: what.into(),
        version: caps.version.text.clone(),
    }
}

/// Every `-device`, `-netdev` and `-object` of the Ganeti layer is written
/// as `key=value`: the argv of earlier releases, kept in runtime files and
/// compared by migration targets, stays byte-identical.
const SYNTAX: Syntax = Syntax::KeyValue;

/// What every area builder reads.
struct Ctx<'a> {
    spec: &'a InstanceSpec,
    hv: &'a crate::HvParams,
    caps: &'a Capabilities,
    f: &'a crate::Features,
    /// NICs and disks behind root ports of a q35 machine.
    root_ports: bool,
}

impl<'a> Ctx<'a> {
    fn new(spec: &'a InstanceSpec, caps: &'a Capabilities) -> Ctx<'a> {
        let root_ports = spec.pcie_slots == Some(PcieSlots::RootPorts)
            && caps
                .resolve_machine(&spec.hvparams.machine_version)
                .is_ok_and(|m| m.contains("q35"));
        Ctx {
            spec,
            hv: &spec.hvparams,
            caps,
            f: &caps.features,
            root_ports,
        }
    }

    /// `-nodefaults`: only the devices the hvparams ask for.
    fn lean(&self) -> bool {
        self.spec.layout == Some(Layout::Lean)
    }

    fn instance_err(&self, field: &str, reason: String) -> Error {
        Error::Instance {
            instance: self.spec.name.clone(),
            field: field.into(),
            reason,
        }
    }

    fn unsupported(&self, key: &str, what: &str) -> Error {
        unsupported(self.caps, key, what)
    }

    /// The boot order, which a kernel path overrides.
    fn boots_from(&self, order: BootOrder) -> bool {
        self.hv.kernel_path.is_none() && self.hv.boot_order == order
    }

    /// Disks and CD-ROMs as `-drive` alone (qemu-kvm before `-device`, or
    /// no device list to tell).
    fn legacy_drives(&self) -> bool {
        self.f.drive_boot || self.caps.devices.is_empty()
    }

    /// Disks and CD-ROMs as `-blockdev` nodes under a `-device` (as Ganeti
    /// 3.1): instances this release starts, on a QEMU that has
    /// `-blockdev`. Earlier releases' instances keep their `-drive`s.
    fn blockdev_disks(&self) -> bool {
        self.lean() && self.f.blockdev && !self.legacy_drives()
    }
}

/// A user value checked for QEMU's syntax under its own field name; the
/// renderer escapes it.
fn checked<'a>(field: &str, value: &'a str) -> Result<&'a str, Error> {
    whole_arg(field, value)?;
    Ok(value)
}

fn checked_path<'a>(field: &str, path: &'a Path) -> Result<&'a str, Error> {
    checked(field, path_str(field, path)?)
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
    let c = Ctx::new(spec, caps);
    let mut a = Args::new(path_str("kvm_path", &hv.kvm_path)?);
    if c.lean() && c.f.debug_threads {
        // Named threads (`CPU 0/KVM`, `worker`) for top, perf and pinning.
        a.opt("-name", format!("{},debug-threads=on", spec.name));
    } else {
        a.opt("-name", spec.name.clone());
    }
    if c.lean() {
        a.flag("-nodefaults");
    }
    a.memory_mib(spec.memory);
    build_smp(&c, &mut a)?;
    build_balloon(&c, &mut a)?;
    let machine = build_machine(&c, &mut a)?;
    build_root_ports(&c, &mut a)?;
    if c.boots_from(BootOrder::Network) {
        a.opt("-boot", "n");
    }
    build_io_groups(&c, &mut a)?;
    let mut scsi_controller = false;
    build_disks(&c, &mut a, &mut scsi_controller)?;
    build_cdroms(&c, &mut a, &mut scsi_controller)?;
    if c.lean() && hv.disk_type.on_scsi_bus() {
        // Present without SCSI disks too, so that disks can be hot-plugged
        // (as Ganeti 3.1 adds it whenever disk_type is SCSI).
        scsi_controller_once(&c, &mut a, &mut scsi_controller)?;
    }
    build_floppy(&c, &mut a)?;
    build_kernel(&c, &mut a)?;
    if let Some(m) = &hv.mem_path {
        a.opt(
            "-mem-path",
            whole_arg("mem_path", path_str("mem_path", m)?)?,
        );
        a.flag("-mem-prealloc");
    }
    build_usb_mouse(&c, &mut a)?;
    build_display(&c, &mut a, env)?;
    build_devices_and_extra(&c, &mut a)?;
    Ok(QemuCommand {
        argv: a.into_vec(),
        machine,
    })
}

fn build_smp(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    let hv = c.hv;
    let topology = |v: u32| (v > 0).then_some(v);
    a.smp(&Smp {
        cpus: c.spec.vcpus,
        cores: topology(hv.cpu_cores),
        threads: topology(hv.cpu_threads),
        sockets: topology(hv.cpu_sockets),
    });
    let sets = hv.cpu_mask.sets().len();
    if !hv.cpu_mask.is_all() && sets > 1 && sets != c.spec.vcpus as usize {
        return Err(Error::Syntax {
            key: "cpu_mask".into(),
            reason: format!(
                "has {sets} per-vCPU sets but the instance has {} vCPUs",
                c.spec.vcpus
            ),
        });
    }
    Ok(())
}

/// The balloon: Ganeti's `-balloon` is long gone from QEMU.
fn build_balloon(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    if c.f.balloon_option {
        a.opt("-balloon", "virtio");
    } else if c.caps.has_device("virtio-balloon-pci") {
        a.device(
            &Device::new("virtio-balloon-pci").with("id", "balloon0"),
            SYNTAX,
        )?;
    } else {
        return Err(c.unsupported(
            "memory",
            "a virtio balloon (-balloon or virtio-balloon-pci)",
        ));
    }
    Ok(())
}

/// ACPI, reboot behaviour, machine type and accelerator. Returns the
/// concrete machine type.
fn build_machine(c: &Ctx, a: &mut Args) -> Result<String, Error> {
    let (hv, f) = (c.hv, c.f);
    let acpi_via_machine = !hv.acpi && !f.no_acpi;
    if !hv.acpi && f.no_acpi {
        a.flag("-no-acpi");
    }
    if hv.user_shutdown {
        a.flag("-no-shutdown");
    }
    if hv.reboot_behavior == RebootBehavior::Exit {
        a.flag("-no-reboot");
    }
    let machine = c.caps.resolve_machine(&hv.machine_version)?;
    checked("machine_version", &machine)?;
    if f.machine {
        let accel = match hv.kvm_flag {
            KvmFlag::Enabled => "kvm",
            KvmFlag::Disabled => "tcg",
        };
        let mut m = Machine::new(machine.clone()).with("accel", accel);
        if acpi_via_machine {
            m = m.with("acpi", false);
        }
        if hv.firmware != Firmware::Bios {
            if !f.blockdev {
                return Err(c.unsupported("firmware", "-blockdev flash images (UEFI)"));
            }
            m = m
                .with("pflash0", FIRMWARE_CODE_NODE)
                .with("pflash1", FIRMWARE_VARS_NODE);
        }
        if hv.firmware == Firmware::UefiSecboot {
            if !machine.contains("q35") {
                return Err(Error::Syntax {
                    key: "firmware".into(),
                    reason: format!(
                        "uefi-secboot needs a q35 machine (machine_version), not {machine}: \
                         Secure Boot locks the variable store behind SMM, which i440fx lacks"
                    ),
                });
            }
            m = m.with("smm", true);
        }
        a.machine(&m)?;
        if hv.firmware == Firmware::UefiSecboot {
            a.opt("-global", "driver=cfi.pflash01,property=secure,value=on");
        }
    } else {
        if acpi_via_machine {
            return Err(c.unsupported("acpi", "turning ACPI off (-no-acpi or -machine acpi=off)"));
        }
        if hv.firmware != Firmware::Bios {
            return Err(c.unsupported("firmware", "-machine with flash images (UEFI)"));
        }
        a.opt("-M", opt_value("machine_version", &machine)?);
        match hv.kvm_flag {
            KvmFlag::Enabled if f.enable_kvm => a.flag("-enable-kvm"),
            KvmFlag::Disabled if f.disable_kvm => a.flag("-disable-kvm"),
            _ => {}
        }
    }
    Ok(machine)
}

/// The `-device` driver of a disk or CD-ROM, with its bus; `None` for
/// types QEMU only attaches through `-drive if=TYPE`.
fn disk_device(kind: DiskType, cdrom: bool, drive_id: &str) -> Option<Device> {
    let driver = kind.device_driver(cdrom)?;
    let mut dev = Device::new(driver).with("drive", drive_id);
    if kind.on_scsi_bus() {
        dev.set("bus", "scsi0.0");
    }
    Some(dev)
}

/// The SCSI controller (`scsi_controller_type`), before the first SCSI
/// device.
fn scsi_controller_once(c: &Ctx, a: &mut Args, added: &mut bool) -> Result<(), Error> {
    if !std::mem::replace(added, true) {
        // QEMU's canonical names (`lsi` is only an alias, which neither
        // `-device ?` nor QMP's type list shows).
        let driver = match c.hv.scsi_controller_type {
            ScsiControllerType::Lsi => "lsi53c895a",
            other => other.as_str(),
        };
        if !c.caps.has_device(driver) {
            return Err(c.unsupported("scsi_controller_type", &format!("the {driver} device")));
        }
        a.device(&Device::new(driver).with("id", "scsi0"), SYNTAX)?;
    }
    Ok(())
}

/// `-drive ...,if=TYPE`: Ganeti's spelling, where `paravirtual` is `virtio`.
fn drive_interface(kind: DiskType) -> String {
    match kind {
        DiskType::Paravirtual => "virtio".to_owned(),
        other => other.to_string(),
    }
}

/// Disks. Modern QEMU: a backend without a bus (`-drive if=none`) plus a
/// `-device`, with `bootindex` for the boot disk and, for placed devices,
/// their id and PCI slot. Old qemu-kvm: Ganeti's `-drive if=...,boot=on`.
fn build_disks(c: &Ctx, a: &mut Args, scsi_controller: &mut bool) -> Result<(), Error> {
    let hv = c.hv;
    let mut boot_disk = c.boots_from(BootOrder::Disk);
    for (i, disk) in c.spec.disks.iter().enumerate() {
        let id = match &disk.address {
            Some(addr) => addr.id.clone(),
            None => format!("disk{i}"),
        };
        if c.blockdev_disks() {
            if let Some(dev) = disk_device(hv.disk_type, false, &id) {
                if hv.disk_type.on_scsi_bus() {
                    scsi_controller_once(c, a, scsi_controller)?;
                }
                let is_boot = std::mem::take(&mut boot_disk);
                blockdev_disk(c, a, i, disk, dev, is_boot)?;
                continue;
            }
        }
        if disk.uri.is_some() {
            return Err(c.unsupported(
                &format!("disks[{i}].uri"),
                "userspace disk access with this disk_type (it needs -blockdev and a -device)",
            ));
        }
        let field = format!("disks[{i}].path");
        if !disk.path.is_absolute() {
            return Err(c.instance_err(
                &field,
                format!("{} is not an absolute path", disk.path.display()),
            ));
        }
        let mut drive = Drive::new(checked_path(&field, &disk.path)?).with("format", "raw");
        let is_boot = std::mem::take(&mut boot_disk);
        let tail = disk_tail(c, disk)?;
        if c.legacy_drives() {
            drive.set("if", drive_interface(hv.disk_type));
            if is_boot {
                a.opt("-boot", "c");
                if c.f.drive_boot && hv.disk_type != DiskType::Ide {
                    drive.set("boot", "on");
                }
            }
            a.drive(&extend(drive, tail))?;
            continue;
        }
        let Some(mut dev) = disk_device(hv.disk_type, false, &id) else {
            drive.set("if", hv.disk_type.to_string());
            a.drive(&extend(drive, tail))?;
            continue;
        };
        if hv.disk_type.on_scsi_bus() {
            scsi_controller_once(c, a, scsi_controller)?;
        }
        drive = drive.with("if", "none").with("id", id.as_str());
        a.drive(&extend(drive, tail))?;
        if is_boot {
            dev.set("bootindex", 1);
        }
        place(
            c,
            &mut dev,
            disk.address.as_ref(),
            disk_on_pci(hv.disk_type),
        );
        a.device(&dev, SYNTAX)?;
    }
    Ok(())
}

/// Ganeti 3.1's cache settings for `-blockdev`: (the device's
/// `write-cache`, `cache.direct`, `cache.no-flush`). Shared storage and
/// `disk_aio=native` force `none`, as in [`disk_tail`].
fn cache_settings(c: &Ctx, disk: &crate::DiskSpec) -> (bool, bool, bool) {
    let forced_none = disk.is_shared_storage() || c.hv.disk_aio == DiskAio::Native;
    match c.hv.disk_cache {
        _ if forced_none => (true, true, false),
        DiskCache::None => (true, true, false),
        DiskCache::Default | DiskCache::Writeback => (true, false, false),
        DiskCache::Writethrough => (false, false, false),
    }
}

/// One disk as a raw `-blockdev` node over its protocol node (a host file
/// or device, or a storage URI QEMU opens itself) and its `-device`.
fn blockdev_disk(
    c: &Ctx,
    a: &mut Args,
    i: usize,
    disk: &crate::DiskSpec,
    dev: Device,
    is_boot: bool,
) -> Result<(), Error> {
    let (node, dev) = disk_pieces(c, i, disk, dev, is_boot)?;
    a.blockdev(&node, SYNTAX)?;
    a.device(&dev, SYNTAX)
}

/// A disk's raw node over its protocol node, and its device completed
/// (write cache, boot index, id and slot).
fn disk_pieces(
    c: &Ctx,
    i: usize,
    disk: &crate::DiskSpec,
    mut dev: Device,
    is_boot: bool,
) -> Result<(Blockdev, Device), Error> {
    let hv = c.hv;
    let id = dev.props.get_str("drive").unwrap_or_default().to_owned();
    let (write_cache, direct, no_flush) = cache_settings(c, disk);
    let file = match &disk.uri {
        Some(uri) => {
            let field = format!("disks[{i}].uri");
            let node = crate::qemu::storage_node(&field, uri)?;
            if matches!(node.get_str("driver"), Some("http" | "https"))
                && disk.mode != DiskMode::ReadOnly
            {
                return Err(c.instance_err(&field, "an http(s) disk can only be read-only".into()));
            }
            node
        }
        None => host_file_node(c, i, disk)?,
    };
    // A disk in a throttle group reaches its file through the group's
    // filter: the format node and the device stay as they are.
    let file = match &disk.io_group {
        Some(group) => Props::new()
            .with("driver", "throttle")
            .with("throttle-group", crate::io_group_id(group))
            .with("file", file),
        None => file,
    };
    let mut node = Blockdev::new("raw", &id);
    if disk.mode == DiskMode::ReadOnly {
        node.props.set("read-only", true);
    }
    if hv.disk_discard == DiskDiscard::Unmap {
        node.props.set("discard", "unmap");
    }
    node.props.set(
        "cache",
        Props::new()
            .with("direct", direct)
            .with("no-flush", no_flush),
    );
    node.props.set("file", file);
    if needs_auto_read_only_off(c) {
        node.props.set("auto-read-only", false);
    }
    // Passed-through SCSI devices have no cache of QEMU's to set.
    if !matches!(dev.driver.as_str(), "scsi-block" | "scsi-generic") {
        // An on/off/auto property: QMP's device_add takes it as a string
        // (QEMU 10 refuses a JSON boolean); the argv is the same.
        dev.set("write-cache", if write_cache { "on" } else { "off" });
    }
    if is_boot {
        dev.set("bootindex", 1);
    }
    place(
        c,
        &mut dev,
        disk.address.as_ref(),
        disk_on_pci(hv.disk_type),
    );
    Ok((node, dev))
}

/// The block node and device of disk `index` of a running `spec` for QMP
/// `blockdev-add` and `device_add` (hot plug). The disk must be placed;
/// its type is the instance's `disk_type` (virtio or SCSI; IDE cannot be
/// hot-plugged).
pub fn hotplug_disk(
    spec: &InstanceSpec,
    caps: &Capabilities,
    index: usize,
) -> Result<(Blockdev, Device), Error> {
    let c = Ctx::new(spec, caps);
    let field = format!("disks[{index}]");
    let disk = spec
        .disks
        .get(index)
        .ok_or_else(|| c.instance_err(&field, "no such disk".into()))?;
    let id =
        disk.address.as_ref().map(|a| a.id.clone()).ok_or_else(|| {
            c.instance_err(&field, "a hot-plugged disk needs its id and slot".into())
        })?;
    let disk_type = spec.hvparams.disk_type;
    if disk_type != DiskType::Paravirtual && !disk_type.on_scsi_bus() {
        return Err(c.unsupported(
            "disk_type",
            &format!(
                "hot plug of {} disks (virtio and SCSI only)",
                spec.hvparams.disk_type
            ),
        ));
    }
    let dev = disk_device(spec.hvparams.disk_type, false, &id)
        .ok_or_else(|| c.instance_err(&field, "no device for this disk type".into()))?;
    disk_pieces(&c, index, disk, dev, false)
}

/// QEMU (≥ 3.1) may reopen an image read-only when it cannot write it;
/// under `security_model=user|pool` that silently breaks writes after a
/// migration, so Ganeti 3.1 turns it off there, and so does gkvm.
fn needs_auto_read_only_off(c: &Ctx) -> bool {
    c.f.auto_read_only && c.hv.security_model != SecurityModel::None
}

/// The `file` or `host_device` node of a disk on this node, with
/// `disk_aio`: `host_device` for block devices, `file` for image files.
fn host_file_node(c: &Ctx, i: usize, disk: &crate::DiskSpec) -> Result<Props, Error> {
    let field = format!("disks[{i}].path");
    if !disk.path.is_absolute() {
        return Err(c.instance_err(
            &field,
            format!("{} is not an absolute path", disk.path.display()),
        ));
    }
    let filename = checked_path(&field, &disk.path)?;
    // Ganeti's rule where the template is known (its disk links are not
    // under /dev), else where the path is.
    let block_device = match disk.template.as_deref() {
        Some(t) => !matches!(t, "file" | "sharedfile" | "gluster"),
        None => filename.starts_with("/dev/"),
    };
    let driver = if block_device { "host_device" } else { "file" };
    let mut p = Props::new()
        .with("driver", driver)
        .with("filename", filename);
    match c.hv.disk_aio {
        DiskAio::Threads => {}
        DiskAio::IoUring if !c.f.aio_io_uring => {
            return Err(c.unsupported("disk_aio", "aio=io_uring"));
        }
        aio => p.set("aio", aio.to_string()),
    }
    Ok(p)
}

/// A disk's cache mode, I/O mode, discard and read-only flag: shared
/// storage forces `cache=none` (Ganeti's rule: a migration must not see
/// stale pages), and so does `disk_aio=native` (it needs O_DIRECT).
fn disk_tail(c: &Ctx, disk: &crate::DiskSpec) -> Result<Props, Error> {
    let hv = c.hv;
    let mut p = Props::new();
    if disk.is_shared_storage() || hv.disk_aio == DiskAio::Native {
        p.set("cache", "none");
    } else if hv.disk_cache != DiskCache::Default {
        p.set("cache", hv.disk_cache.to_string());
    }
    if disk.mode == DiskMode::ReadOnly {
        p.set("readonly", true);
    }
    match hv.disk_aio {
        DiskAio::Threads => {}
        DiskAio::IoUring if !c.f.aio_io_uring => {
            return Err(c.unsupported("disk_aio", "aio=io_uring"));
        }
        aio => p.set("aio", aio.to_string()),
    }
    if hv.disk_discard == DiskDiscard::Unmap {
        p.set("discard", "unmap");
    }
    Ok(p)
}

fn extend(mut drive: Drive, tail: Props) -> Drive {
    for (k, v) in tail.iter() {
        drive.props.set(k, v.clone());
    }
    drive
}

/// The instance's throttle groups (`io_limits`), every one, before the
/// disks that join them: a disk hot-plugged later may join one too.
fn build_io_groups(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    if c.spec.io_limits.is_empty() {
        return Ok(());
    }
    if !c.blockdev_disks() {
        return Err(c.unsupported(
            "io_limits",
            "throttle groups (they need disks as -blockdev nodes: QEMU 2.11)",
        ));
    }
    for (group, limits) in &c.spec.io_limits {
        let mut o = Object::new("throttle-group", crate::io_group_id(group));
        for (k, v) in limits.object_props() {
            o.props.set(k, v);
        }
        a.object(&o, SYNTAX)?;
    }
    Ok(())
}

/// The id of the root port at `slot` of a q35 machine
/// ([`PcieSlots::RootPorts`]).
pub fn root_port_id(slot: u8) -> String {
    format!("pcie-port{slot}")
}

/// A q35 machine's root ports, one at each slot from
/// `kvm_pci_reservations` on ([`PcieSlots::RootPorts`]). Each has its own
/// chassis number (QEMU refuses two ports with the same chassis and
/// slot) and no I/O window: 19 windows of 4 KiB would not fit the 64 KiB
/// I/O space, and PCI Express devices (virtio's modern interface) need
/// none.
fn build_root_ports(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    if !c.root_ports {
        return Ok(());
    }
    if !c.caps.has_device("pcie-root-port") {
        return Err(c.unsupported("machine_version", "PCI Express root ports (pcie-root-port)"));
    }
    let first = u8::try_from(c.hv.kvm_pci_reservations).unwrap_or(PCI_SLOTS);
    for slot in first..PCIE_SLOTS {
        let port = Device::new("pcie-root-port")
            .with("id", root_port_id(slot))
            .with("bus", "pcie.0")
            .with("addr", format!("{slot:#04x}"))
            .with("chassis", u32::from(slot))
            .with("io-reserve", 0);
        a.device(&port, SYNTAX)?;
    }
    Ok(())
}

/// A placed device gets its id and, on the PCI bus, its slot: on the root
/// bus, or the root port at that slot.
fn place(c: &Ctx, dev: &mut Device, address: Option<&crate::DeviceAddress>, on_pci: bool) {
    if let Some(addr) = address {
        dev.set("id", addr.id.as_str());
        match (addr.pci_slot, on_pci) {
            (Some(slot), true) if c.root_ports => dev.set("bus", root_port_id(slot)),
            (Some(slot), true) => dev.set("addr", format!("{slot:#04x}")),
            _ => {}
        }
    }
}

/// CD-ROMs. Ganeti boots CD-ROMs from IDE whatever `cdrom_disk_type` says.
fn build_cdroms(c: &Ctx, a: &mut Args, scsi_controller: &mut bool) -> Result<(), Error> {
    let hv = c.hv;
    let cdrom_type = hv.cdrom_disk_type.unwrap_or(hv.disk_type);
    for (n, key, image, bootable) in [
        (
            0,
            "cdrom_image_path",
            &hv.cdrom_image_path,
            c.boots_from(BootOrder::Cdrom),
        ),
        (1, "cdrom2_image_path", &hv.cdrom2_image_path, false),
    ] {
        let Some(image) = image else { continue };
        let kind = if bootable { DiskType::Ide } else { cdrom_type };
        let mut drive = Drive::new(checked_path(key, image)?)
            .with("format", "raw")
            .with("media", "cdrom");
        if c.legacy_drives() {
            drive.set("if", drive_interface(kind));
            if bootable {
                a.opt("-boot", "d");
                if c.f.drive_boot {
                    drive.set("boot", "on");
                }
            }
            a.drive(&drive)?;
            continue;
        }
        let id = format!("cdrom{n}");
        if c.blockdev_disks() {
            if let Some(mut dev) = disk_device(kind, true, &id) {
                if kind.on_scsi_bus() {
                    scsi_controller_once(c, a, scsi_controller)?;
                }
                a.blockdev(&cdrom_node(key, image, &id)?, SYNTAX)?;
                if bootable {
                    dev.set("bootindex", 1);
                }
                a.device(&dev, SYNTAX)?;
                continue;
            }
        }
        let Some(mut dev) = disk_device(kind, true, &id) else {
            a.drive(&drive.with("if", kind.to_string()))?;
            continue;
        };
        if kind.on_scsi_bus() {
            scsi_controller_once(c, a, scsi_controller)?;
        }
        a.drive(
            &drive
                .with("if", "none")
                .with("id", id)
                .with("readonly", true),
        )?;
        if bootable {
            dev.set("bootindex", 1);
        }
        a.device(&dev, SYNTAX)?;
    }
    Ok(())
}

/// A CD-ROM image as a read-only raw node (Ganeti 3.1's cache settings)
/// over a file, or over QEMU's curl driver for an http(s) URL.
fn cdrom_node(key: &str, image: &Path, id: &str) -> Result<Blockdev, Error> {
    let file = match crate::image_url(image) {
        Some(url) => crate::qemu::storage_node(key, url)?,
        None => Props::new()
            .with("driver", "file")
            .with("filename", checked_path(key, image)?),
    };
    Ok(Blockdev::new("raw", id)
        .with("read-only", true)
        .with(
            "cache",
            Props::new().with("direct", false).with("no-flush", true),
        )
        .with("file", file))
}

fn build_floppy(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    let Some(floppy) = &c.hv.floppy_image_path else {
        return Ok(());
    };
    let mut drive = Drive::new(checked_path("floppy_image_path", floppy)?)
        .with("format", "raw")
        .with("media", "disk");
    if c.boots_from(BootOrder::Floppy) {
        a.opt("-boot", "a");
        if c.f.drive_boot {
            drive.set("boot", "on");
        }
    }
    a.drive(&drive.with("if", "floppy"))
}

fn build_kernel(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    let hv = c.hv;
    let Some(k) = &hv.kernel_path else {
        return Ok(());
    };
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
    Ok(())
}

/// The USB controller and pointing device (a tablet whenever VNC is on,
/// as Ganeti does). Ganeti adds the controller always; a lean machine only
/// when a USB device needs it (the guest spends ~0.3 s probing it).
fn build_usb_mouse(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    let hv = c.hv;
    let mouse = hv
        .usb_mouse
        .map(|m| m.as_str())
        .or((!hv.vnc_bind_address.is_empty()).then_some("tablet"));
    if !c.lean() || mouse.is_some() || !hv.usb_devices.is_empty() {
        a.flag("-usb");
    }
    if let Some(m) = mouse {
        let driver = format!("usb-{m}");
        if c.f.usb_devices && c.caps.has_device(&driver) {
            a.device(&Device::new(driver), SYNTAX)?;
        } else if c.f.usbdevice {
            a.opt("-usbdevice", m);
        } else {
            return Err(c.unsupported("usb_mouse", "USB pointing devices"));
        }
    }
    Ok(())
}

fn build_display(c: &Ctx, a: &mut Args, env: &BuildEnv) -> Result<(), Error> {
    if !c.hv.vnc_bind_address.is_empty() {
        build_vnc(c, a, env)
    } else if !c.hv.spice_bind.is_empty() {
        build_spice(c, a, env)
    } else {
        if c.f.display {
            a.opt("-display", "none");
        } else {
            a.flag("-nographic");
        }
        Ok(())
    }
}

/// RTC, CPU model, sound, VGA, extra USB devices, UUID and `kvm_extra`.
fn build_devices_and_extra(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    let (hv, f) = (c.hv, c.f);
    if hv.use_localtime {
        if f.localtime {
            a.flag("-localtime");
        } else if f.rtc {
            a.opt("-rtc", "base=localtime");
        } else {
            return Err(c.unsupported("use_localtime", "a local-time RTC"));
        }
    }
    if !hv.cpu_type.is_empty() {
        a.opt("-cpu", whole_arg("cpu_type", &hv.cpu_type)?);
    }
    build_sound(c, a)?;
    if !hv.vga.is_empty() {
        a.opt("-vga", whole_arg("vga", &hv.vga)?);
    } else if !hv.spice_bind.is_empty() {
        a.opt("-vga", "qxl");
    } else if c.lean() && !hv.vnc_bind_address.is_empty() {
        // QEMU's default card, which -nodefaults leaves out.
        a.opt("-vga", "std");
    }
    if !hv.usb_devices.is_empty() {
        if !f.usbdevice {
            return Err(c.unsupported("usb_devices", "-usbdevice"));
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
    if let (Some(uuid), true) = (&c.spec.uuid, f.uuid) {
        a.opt("-uuid", uuid.to_string());
    }
    build_gkvm_devices(c, a)?;
    // Ganeti 2.x appended kvm_extra as one argument; 3.1 splits it as a
    // shell would, and so does gkvm: "-foo a -bar 'b c'" is four words.
    for extra in hv.kvm_extra_args()? {
        a.flag(&extra);
    }
    Ok(())
}

/// gkvm's own devices (`rng`, `watchdog`), after every device of the
/// Ganeti layer: turning one on moves no other device (QEMU places them in
/// the first free slots, after all the others).
fn build_gkvm_devices(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    let hv = c.hv;
    // Not guest-visible: every instance this release starts has it where
    // QEMU does (earlier releases' keep Ganeti's argv).
    if c.lean() && hv.sandbox == Sandbox::On && c.f.sandbox {
        a.opt("-sandbox", "on,obsolete=deny,resourcecontrol=deny");
    }
    if hv.rng == Rng::Virtio {
        if !c.caps.has_device("virtio-rng-pci") {
            return Err(c.unsupported("rng", "the virtio-rng-pci device"));
        }
        a.object(
            &Object::new("rng-random", "rng0").with("filename", "/dev/urandom"),
            SYNTAX,
        )?;
        let mut dev = Device::new("virtio-rng-pci")
            .with("id", "rng-dev0")
            .with("rng", "rng0");
        if hv.rng_rate > 0 {
            dev = dev.with("max-bytes", hv.rng_rate).with("period", 1000u32);
        }
        a.device(&dev, SYNTAX)?;
    }
    if hv.watchdog == Watchdog::I6300esb {
        if !c.caps.has_device("i6300esb") {
            return Err(c.unsupported("watchdog", "the i6300esb device"));
        }
        if !c.f.action {
            return Err(c.unsupported("watchdog_action", "-action (QEMU 6.0)"));
        }
        a.device(&Device::new("i6300esb").with("id", "watchdog0"), SYNTAX)?;
        a.opt(
            "-action",
            format!("watchdog={}", hv.watchdog_action.as_str()),
        );
    }
    Ok(())
}

fn build_sound(c: &Ctx, a: &mut Args) -> Result<(), Error> {
    let hv = c.hv;
    if hv.soundhw.is_empty() {
        return Ok(());
    }
    if c.f.audio {
        // With SPICE on, the guest's sound goes to SPICE clients (as
        // Ganeti 3.1); else the card has no host backend.
        let driver = if hv.spice_bind.is_empty() {
            "none"
        } else {
            "spice"
        };
        let model = checked("soundhw", &hv.soundhw)?;
        a.keyval("-audio", driver, &Props::new().with("model", model))
    } else if c.f.soundhw {
        a.opt("-soundhw", whole_arg("soundhw", &hv.soundhw)?);
        Ok(())
    } else {
        Err(c.unsupported("soundhw", "sound cards (-audio or -soundhw)"))
    }
}

/// A boolean sub-option: `name=on|off` on QEMU ≥ 2.5, a bare `name`
/// before.
fn bool_prop(f: &crate::Features, v: bool) -> Value {
    if f.bool_suboptions || !v {
        Value::Bool(v)
    } else {
        Value::Flag
    }
}

/// The address an interface-name bind resolves to on this node: of
/// `version` (4 or 6) when given, else its first IPv4 address, else its
/// first IPv6 address (Ganeti 3.1 takes the cluster's primary family when
/// an interface has both; gkvm has no cluster, and IPv4 first is what
/// Ganeti does for VNC).
/// The address a bind to an interface with `addresses` listens on: of
/// `version` when 4 or 6, else the first IPv4 one, else the first IPv6 one.
pub fn pick_address(addresses: &[IpAddr], version: u8) -> Option<IpAddr> {
    let of = |v4: bool| addresses.iter().copied().find(|a| a.is_ipv4() == v4);
    match version {
        4 => of(true),
        6 => of(false),
        _ => of(true).or_else(|| of(false)),
    }
}

fn interface_address(
    key: &str,
    interface: &str,
    version: u8,
    env: &BuildEnv,
) -> Result<IpAddr, Error> {
    let addresses = env.interfaces.get(interface).map_or(&[][..], Vec::as_slice);
    pick_address(addresses, version).ok_or_else(|| Error::Host {
        key: key.into(),
        reason: match version {
            4 | 6 => format!("interface {interface:?} has no IPv{version} address"),
            _ => format!("interface {interface:?} has no IP address"),
        },
    })
}

fn build_vnc(c: &Ctx, a: &mut Args, env: &BuildEnv) -> Result<(), Error> {
    let (hv, spec) = (c.hv, c.spec);
    let bind = &hv.vnc_bind_address;
    if bind.starts_with('/') {
        // A directory: a Unix socket named after the instance.
        let socket = Path::new(bind).join(format!("{}.vnc", spec.name));
        a.opt(
            "-vnc",
            format!("unix:{}", opt_path("vnc_bind_address", &socket)?),
        );
        return Ok(());
    }
    let port = spec.network_port.unwrap_or(0);
    if port <= VNC_BASE_PORT {
        return Err(c.instance_err(
            "network_port",
            format!("VNC needs a port above {VNC_BASE_PORT} (display = port - {VNC_BASE_PORT}), got {port}"),
        ));
    }
    let display = port - VNC_BASE_PORT;
    let address = match bind.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => interface_address("vnc_bind_address", bind, 0, env)?,
    };
    let head = match address {
        IpAddr::V4(v4) if v4.is_unspecified() => format!(":{display}"),
        IpAddr::V4(v4) => format!("{v4}:{display}"),
        IpAddr::V6(v6) => format!("[{v6}]:{display}"),
    };
    let mut props = Props::new();
    if hv.vnc_tls {
        vnc_tls(c, a, &mut props)?;
    }
    if hv.vnc_password_file.is_some() {
        props.set("password", bool_prop(c.f, true));
    }
    let rest = props.to_keyval()?;
    a.opt(
        "-vnc",
        if rest.is_empty() {
            head
        } else {
            format!("{head},{rest}")
        },
    );
    Ok(())
}

/// VNC TLS: a `tls-creds-*` object on QEMU ≥ 2.5, Ganeti's `tls,x509=`
/// sub-options before.
fn vnc_tls(c: &Ctx, a: &mut Args, props: &mut Props) -> Result<(), Error> {
    let hv = c.hv;
    let dir = hv
        .vnc_x509_path
        .as_deref()
        .map(|d| checked_path("vnc_x509_path", d))
        .transpose()?;
    if c.f.tls_creds_object {
        let object = match dir {
            Some(dir) => Object::new("tls-creds-x509", "vnc-tls-creds0")
                .with("dir", dir)
                .with("endpoint", "server")
                .with("verify-peer", hv.vnc_x509_verify),
            None => Object::new("tls-creds-anon", "vnc-tls-creds0").with("endpoint", "server"),
        };
        a.object(&object, SYNTAX)?;
        props.set("tls-creds", "vnc-tls-creds0");
    } else {
        props.set("tls", Value::Flag);
        match (dir, hv.vnc_x509_verify) {
            (Some(d), true) => props.set("x509verify", d),
            (Some(d), false) => props.set("x509", d),
            (None, _) => {}
        }
    }
    Ok(())
}

fn build_spice(c: &Ctx, a: &mut Args, env: &BuildEnv) -> Result<(), Error> {
    let hv = c.hv;
    if !c.f.spice {
        return Err(c.unsupported("spice_bind", "SPICE (-spice)"));
    }
    let address: IpAddr = match hv.spice_bind.parse() {
        Ok(ip) => ip,
        Err(_) => interface_address("spice_bind", &hv.spice_bind, hv.spice_ip_version, env)?,
    };
    let port = c
        .spec
        .network_port
        .ok_or_else(|| c.instance_err("network_port", "SPICE needs a port".into()))?;
    let mut p = Props::new().with("addr", address.to_string());
    spice_listen(c, &mut p, port, env)?;
    if hv.spice_password_file.is_none() {
        p.set("disable-ticketing", bool_prop(c.f, true));
    }
    let ip_version = match hv.spice_ip_version {
        0 if hv.spice_bind.parse::<IpAddr>().is_err() => {
            Some(if address.is_ipv4() { 4 } else { 6 })
        }
        0 => None,
        v => Some(v),
    };
    if let Some(v) = ip_version {
        p.set(format!("ipv{v}"), bool_prop(c.f, true));
    }
    spice_tuning(hv, &mut p);
    if hv.spice_use_vdagent {
        a.device(&Device::new("virtio-serial-pci"), SYNTAX)?;
        a.device(
            &Device::new("virtserialport")
                .with("chardev", "spicechannel0")
                .with("name", "com.redhat.spice.0"),
            SYNTAX,
        )?;
        a.chardev(&Chardev::new("spicevmc", "spicechannel0").with("name", "vdagent"))?;
    } else {
        p.set("agent-mouse", false);
    }
    a.keyval("-spice", "", &p)
}

fn spice_listen(c: &Ctx, p: &mut Props, port: u16, env: &BuildEnv) -> Result<(), Error> {
    let hv = c.hv;
    if !hv.spice_use_tls {
        p.set("port", port);
        return Ok(());
    }
    let cert = checked_path("spice_cert", &env.spice_cert)?;
    p.set("tls-port", port);
    p.set(
        "x509-cacert-file",
        checked_path("spice_cacert", &env.spice_cacert)?,
    );
    p.set("x509-key-file", cert);
    p.set("x509-cert-file", cert);
    if !hv.spice_tls_ciphers.is_empty() {
        p.set(
            "tls-ciphers",
            checked("spice_tls_ciphers", &hv.spice_tls_ciphers)?,
        );
    }
    Ok(())
}

/// SPICE compression and streaming settings, in Ganeti's order.
fn spice_tuning(hv: &crate::HvParams, p: &mut Props) {
    if let Some(v) = hv.spice_image_compression {
        p.set("image-compression", v.to_string());
    }
    if let Some(v) = hv.spice_jpeg_wan_compression {
        p.set("jpeg-wan-compression", v.to_string());
    }
    if let Some(v) = hv.spice_zlib_glz_wan_compression {
        p.set("zlib-glz-wan-compression", v.to_string());
    }
    if let Some(v) = hv.spice_streaming_video {
        p.set("streaming-video", v.to_string());
    }
    if !hv.spice_playback_compression {
        p.set("playback-compression", false);
    }
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
        let c = Ctx::new(spec, caps);
        let node = &launch.node;
        let mut a = Args::from_vec(self.argv.clone());
        a.opt(
            "-pidfile",
            whole_arg("pidfile", path_str("pidfile", &node.pidfile)?)?,
        );
        if let Some(log) = &node.log {
            a.opt("-D", whole_arg("log", path_str("log", log)?)?);
        }
        if launch.daemonize {
            a.flag("-daemonize");
        }
        if c.hv.serial_console {
            let path = opt_path("serial socket", &node.serial)?;
            a.opt("-serial", format!("unix:{path},{}", socket_opts(c.f)));
        } else {
            a.opt("-serial", "none");
        }
        launch_firmware(&c, &mut a, node)?;
        launch_run_as(&c, &mut a, launch)?;
        launch_keymap(&c, &mut a, node)?;
        if c.hv.use_guest_agent {
            launch_guest_agent(&c, &mut a, node)?;
        }
        launch_tpm(&c, &mut a, node)?;
        launch_nics(&c, &mut a, launch)?;
        if let Some(dir) = &launch.migration_tls {
            launch_migration_tls(&c, &mut a, dir, launch.incoming.is_some())?;
        }
        if let Some(uri) = &launch.incoming {
            a.opt("-incoming", whole_arg("incoming", uri)?);
        }
        launch_qmp(&c, &mut a, node)?;
        if launch.paused {
            a.flag("-S");
        }
        Ok(a.into_vec())
    }
}

/// A UEFI machine's flash images: the firmware's code read-only, the
/// instance's variable store writable (QEMU opens both before it drops
/// privileges).
fn launch_firmware(c: &Ctx, a: &mut Args, node: &NodePaths) -> Result<(), Error> {
    if c.hv.firmware == Firmware::Bios {
        return Ok(());
    }
    let files = node.firmware.as_ref().ok_or_else(|| {
        c.instance_err(
            "hvparams.firmware",
            "UEFI needs the node's firmware and the instance's variable store".into(),
        )
    })?;
    let code = Blockdev::raw_file(
        FIRMWARE_CODE_NODE,
        checked_path("firmware code", &files.code)?,
    )
    .with("read-only", true);
    let vars = Blockdev::raw_file(
        FIRMWARE_VARS_NODE,
        checked_path("firmware variables", &files.vars)?,
    );
    a.blockdev(&code, SYNTAX)?;
    a.blockdev(&vars, SYNTAX)
}

/// Migration TLS: both ends' x509 credentials, and for an incoming
/// instance the migration's `tls-creds` set before it listens.
fn launch_migration_tls(c: &Ctx, a: &mut Args, dir: &Path, incoming: bool) -> Result<(), Error> {
    if !c.f.tls_creds_object {
        return Err(c.unsupported("migration_tls_dir", "tls-creds-x509 objects"));
    }
    let dir = checked_path("migration_tls_dir", dir)?;
    for (id, endpoint) in [(MIGRATION_TLS_IN, "server"), (MIGRATION_TLS_OUT, "client")] {
        let mut o = Object::new("tls-creds-x509", id)
            .with("dir", dir)
            .with("endpoint", endpoint);
        if endpoint == "server" {
            o.props.set("verify-peer", bool_prop(c.f, true));
        }
        a.object(&o, SYNTAX)?;
    }
    if incoming {
        a.opt("-global", format!("migration.tls-creds={MIGRATION_TLS_IN}"));
    }
    Ok(())
}

/// Listening-socket options of `-serial`/`-qmp unix:`.
fn socket_opts(f: &crate::Features) -> &'static str {
    if f.bool_suboptions {
        "server=on,wait=off"
    } else {
        "server,nowait"
    }
}

/// Chroot and the user QEMU runs as: `-run-with` (QEMU ≥ 9.0) or
/// `-chroot`/`-runas`.
fn launch_run_as(c: &Ctx, a: &mut Args, launch: &Launch) -> Result<(), Error> {
    let hv = c.hv;
    let run_as = match hv.security_model {
        SecurityModel::None => None,
        SecurityModel::User => Some(hv.security_domain.clone()),
        SecurityModel::Pool => Some(launch.pool_user.clone().ok_or_else(|| {
            c.instance_err(
                "security_model",
                "pool: no user was allocated for this start".into(),
            )
        })?),
    };
    let chroot = hv.use_chroot.then(|| launch.node.chroot.clone());
    if c.f.run_with && (run_as.is_some() || chroot.is_some()) {
        let mut p = Props::new();
        if let Some(dir) = &chroot {
            p.set("chroot", checked_path("use_chroot", dir)?);
        }
        if let Some(u) = &run_as {
            p.set("user", checked("security_domain", u)?);
        }
        return a.keyval("-run-with", "", &p);
    }
    if let Some(dir) = &chroot {
        if !c.f.chroot {
            return Err(c.unsupported("use_chroot", "-chroot or -run-with"));
        }
        a.opt(
            "-chroot",
            whole_arg("use_chroot", path_str("use_chroot", dir)?)?,
        );
    }
    if let Some(u) = &run_as {
        if !c.f.runas {
            return Err(c.unsupported("security_model", "-runas or -run-with"));
        }
        a.opt("-runas", whole_arg("security_domain", u)?);
    }
    Ok(())
}

/// The guest agent: a socket chardev and a virtio-serial port named as
/// qemu-ga expects (Ganeti 3.1's ids).
/// A TPM 2.0 (CRB interface) whose emulator, a swtpm of the instance's
/// own, listens on the node's socket.
fn launch_tpm(c: &Ctx, a: &mut Args, node: &NodePaths) -> Result<(), Error> {
    if c.hv.tpm == Tpm::None {
        return Ok(());
    }
    let socket = node.tpm.as_deref().ok_or_else(|| {
        c.instance_err(
            "hvparams.tpm",
            "a TPM needs the socket of its emulator (swtpm)".into(),
        )
    })?;
    if !c.caps.has_device("tpm-crb") {
        return Err(c.unsupported("tpm", "the tpm-crb device"));
    }
    let path = opt_path("TPM socket", socket)?;
    a.opt("-chardev", format!("socket,id=gkvm-tpm-chr,path={path}"));
    a.opt("-tpmdev", "emulator,id=gkvm-tpm,chardev=gkvm-tpm-chr");
    a.device(
        &Device::new("tpm-crb")
            .with("id", "tpm0")
            .with("tpmdev", "gkvm-tpm"),
        SYNTAX,
    )
}

fn launch_guest_agent(c: &Ctx, a: &mut Args, node: &NodePaths) -> Result<(), Error> {
    let path = opt_path("guest agent socket", &node.guest_agent)?;
    a.opt(
        "-chardev",
        format!("socket,path={path},{},id=qga0", socket_opts(c.f)),
    );
    a.device(&Device::new("virtio-serial-pci").with("id", "qga0"), SYNTAX)?;
    a.device(
        &Device::new("virtserialport")
            .with("chardev", "qga0")
            .with("name", "org.qemu.guest_agent.0"),
        SYNTAX,
    )
}

fn launch_keymap(c: &Ctx, a: &mut Args, node: &NodePaths) -> Result<(), Error> {
    let hv = c.hv;
    if hv.keymap.is_empty() {
        return Ok(());
    }
    if c.f.keymap_include_files {
        a.opt(
            "-k",
            whole_arg("keymap", path_str("keymap", &node.keymap)?)?,
        );
    } else {
        a.opt("-k", whole_arg("keymap", &hv.keymap)?);
    }
    Ok(())
}

/// Whether the NICs use vhost-net: `vhost_net` on a virtio NIC (Ganeti
/// ignores it for emulated models, and so does gkvm).
pub fn uses_vhost(hv: &crate::HvParams) -> bool {
    hv.vhost_net && hv.nic_type == NicType::Paravirtual
}

/// The NIC model of `nic_type` on this QEMU.
fn nic_model(c: &Ctx) -> &'static str {
    match c.hv.nic_type {
        NicType::Paravirtual if c.f.virtio_net_pci => "virtio-net-pci",
        NicType::Paravirtual => "virtio",
        other => other.as_str(),
    }
}

fn launch_nics(c: &Ctx, a: &mut Args, launch: &Launch) -> Result<(), Error> {
    let (spec, hv, f) = (c.spec, c.hv, c.f);
    if launch.nics.len() != spec.nics.len() {
        return Err(c.instance_err(
            "nics",
            format!(
                "{} NICs but {} TAP backends",
                spec.nics.len(),
                launch.nics.len()
            ),
        ));
    }
    if spec.nics.is_empty() {
        a.opt("-net", "none");
    }
    let vhost = uses_vhost(hv);
    if vhost && !f.vhost_net {
        return Err(c.unsupported("vhost_net", "vhost-net (the tap backend's vhost option)"));
    }
    for (i, (nic, backend)) in spec.nics.iter().zip(&launch.nics).enumerate() {
        if backend.tap_fds.is_empty() {
            return Err(c.instance_err(&format!("nics[{i}]"), "no TAP descriptor".into()));
        }
        if vhost && backend.vhost_fds.len() != backend.tap_fds.len() {
            return Err(Error::Host {
                key: "vhost_net".into(),
                reason: format!(
                    "NIC {i} has {} TAP queues but {} /dev/vhost-net descriptors",
                    backend.tap_fds.len(),
                    backend.vhost_fds.len()
                ),
            });
        }
        if !f.netdev {
            // qemu-kvm before -netdev: Ganeti's VLAN pairs.
            a.opt("-net", format!("tap,vlan={i},fd={}", backend.tap_fds[0]));
            a.opt(
                "-net",
                format!("nic,vlan={i},macaddr={},model={}", nic.mac, nic_model(c)),
            );
            continue;
        }
        let refs = |fds: &[i32]| fds.iter().map(i32::to_string).collect::<Vec<_>>();
        let vhost_fds = if vhost {
            refs(&backend.vhost_fds)
        } else {
            Vec::new()
        };
        let (netdev, device) = nic_pieces(c, i, nic, &refs(&backend.tap_fds), &vhost_fds);
        a.netdev(&netdev, SYNTAX)?;
        a.device(&device, SYNTAX)?;
    }
    Ok(())
}

/// The backend and device of one NIC on TAP descriptors, given as what
/// QEMU refers to them by: numbers inherited at start, or the names given
/// with `getfd` for a hot plug. vhost-net when `vhost_fds` is not empty.
fn nic_pieces(
    c: &Ctx,
    i: usize,
    nic: &crate::NicSpec,
    tap_fds: &[String],
    vhost_fds: &[String],
) -> (Netdev, Device) {
    let id = match &nic.address {
        Some(addr) => addr.id.clone(),
        None => format!("netdev{i}"),
    };
    let queues = tap_fds.len();
    let mut netdev = Netdev::new("tap", id.as_str());
    if queues == 1 {
        netdev.set("fd", tap_fds[0].as_str());
    } else {
        netdev.set("fds", tap_fds.join(":"));
    }
    if !vhost_fds.is_empty() {
        netdev.set("vhost", true);
        netdev.set(
            if queues == 1 { "vhostfd" } else { "vhostfds" },
            vhost_fds.join(":"),
        );
    }
    let mut device = Device::new(nic_model(c))
        .with("mac", nic.mac.to_string())
        .with("netdev", id);
    if queues > 1 && c.hv.nic_type == NicType::Paravirtual {
        device.set("mq", true);
        device.set("vectors", 2 * queues + 2);
    }
    place(
        c,
        &mut device,
        nic.address.as_ref(),
        nic_on_pci(c.hv.nic_type),
    );
    (netdev, device)
}

/// The backend and device of NIC `index` of a running `spec` for QMP
/// `netdev_add` and `device_add` (hot plug), on TAP descriptors passed
/// with `getfd` under the names `tap_fds` (one per queue) and, with
/// vhost-net, `vhost_fds`. The NIC must be placed (its id and slot).
pub fn hotplug_nic(
    spec: &InstanceSpec,
    caps: &Capabilities,
    index: usize,
    tap_fds: &[String],
    vhost_fds: &[String],
) -> Result<(Netdev, Device), Error> {
    let c = Ctx::new(spec, caps);
    let field = format!("nics[{index}]");
    let nic = spec
        .nics
        .get(index)
        .ok_or_else(|| c.instance_err(&field, "no such NIC".into()))?;
    if nic.address.is_none() {
        return Err(c.instance_err(&field, "a hot-plugged NIC needs its id and slot".into()));
    }
    if tap_fds.is_empty() {
        return Err(c.instance_err(&field, "no TAP descriptor".into()));
    }
    if !vhost_fds.is_empty() && !c.f.vhost_net {
        return Err(c.unsupported("vhost_net", "vhost-net (the tap backend's vhost option)"));
    }
    Ok(nic_pieces(&c, index, nic, tap_fds, vhost_fds))
}

fn launch_qmp(c: &Ctx, a: &mut Args, node: &NodePaths) -> Result<(), Error> {
    if !c.f.qmp {
        return Err(c.unsupported("kvm_path", "QMP (-qmp), which gkvm needs to manage QEMU"));
    }
    for socket in std::iter::once(&node.qmp).chain(&node.qmp_watch) {
        a.opt(
            "-qmp",
            format!(
                "unix:{},{}",
                opt_path("qmp socket", socket)?,
                socket_opts(c.f)
            ),
        );
    }
    if let (Some(events), true) = (&node.events, c.lean()) {
        a.opt(
            "-chardev",
            format!(
                "pipe,id={EVENTS_CHARDEV},path={}",
                opt_path("event log", events)?
            ),
        );
        a.opt("-mon", format!("chardev={EVENTS_CHARDEV},mode=control"));
    }
    Ok(())
}

/// The chardev of QEMU's event log ([`NodePaths::events`]).
pub const EVENTS_CHARDEV: &str = "gkvm-events";

#[cfg(test)]
mod tests {
    #[test]
    fn io_uring_needs_a_qemu_that_has_it() {
        let caps = crate::Capabilities::from_help(
            "QEMU emulator version 4.2.1\n-machine [type=]name\n-display none\n-qmp dev\n-netdev tap\n-drive [file=file][,aio=threads|native]\n",
            "",
            "name \"virtio-balloon-pci\"\nname \"virtio-blk-pci\"\n",
        )
        .unwrap();
        let mut spec = crate::InstanceSpec::new("u1", 64);
        spec.disks.push(crate::DiskSpec::new("/dev/vg/u1"));
        spec.hvparams.set_pair("disk_aio=io_uring").unwrap();
        match crate::build(&spec, &caps, &crate::BuildEnv::default()) {
            Err(crate::Error::Unsupported { key, .. }) => assert_eq!(key, "disk_aio"),
            other => panic!("{other:?}"),
        }
        spec.hvparams.set_pair("disk_aio=native").unwrap();
        let argv = crate::build(&spec, &caps, &crate::BuildEnv::default())
            .unwrap()
            .argv;
        assert!(
            argv.iter().any(|a| a.ends_with(",cache=none,aio=native")),
            "native forces cache=none: {argv:?}"
        );
    }

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
