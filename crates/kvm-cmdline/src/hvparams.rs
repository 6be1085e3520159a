//! The KVM hypervisor parameters, with Ganeti's KVM driver's key names and
//! defaults (deviations are listed in the crate README), typed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cpumask::CpuMask;
use crate::Error;

macro_rules! str_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $s:literal),+ $(,)? } default $def:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $s)] $variant),+
        }
        impl $name {
            /// Every value, as Ganeti spells them.
            pub const ALL: &'static [&'static str] = &[$($s),+];
            /// Ganeti's spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }
        impl Default for $name {
            fn default() -> Self { $name::$def }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

str_enum!(
    /// `boot_order`.
    BootOrder { /** First disk. */ Disk = "disk", /** The CD-ROM image. */ Cdrom = "cdrom",
                /** The floppy image. */ Floppy = "floppy", /** PXE. */ Network = "network" } default Disk);
str_enum!(
    /// `nic_type`: the emulated NIC model.
    NicType { /** virtio-net. */ Paravirtual = "paravirtual", #[allow(missing_docs)] Rtl8139 = "rtl8139",
              #[allow(missing_docs)] Ne2kPci = "ne2k_pci", #[allow(missing_docs)] Ne2kIsa = "ne2k_isa",
              #[allow(missing_docs)] I82551 = "i82551", #[allow(missing_docs)] I82557b = "i82557b",
              #[allow(missing_docs)] I82559er = "i82559er", #[allow(missing_docs)] Pcnet = "pcnet",
              #[allow(missing_docs)] E1000 = "e1000" } default Paravirtual);
str_enum!(
    /// `disk_type` and `cdrom_disk_type`: how disks are attached.
    DiskType { /** virtio-blk. */ Paravirtual = "paravirtual", /** IDE. */ Ide = "ide",
               /** SCSI (virtio-scsi controller on modern QEMU). */ Scsi = "scsi",
               /** SD card. */ Sd = "sd", /** MTD. */ Mtd = "mtd", /** Parallel flash. */ Pflash = "pflash",
               /** Ganeti 3.1: a SCSI disk (`scsi-hd`) on the SCSI controller. */ ScsiHd = "scsi-hd",
               /** Ganeti 3.1: a host SCSI block device passed through (`scsi-block`). */ ScsiBlock = "scsi-block",
               /** Ganeti 3.1: a host SCSI device passed through as SG_IO (`scsi-generic`). */ ScsiGeneric = "scsi-generic",
               /** Ganeti 3.1: a SCSI CD-ROM (`scsi-cd`). */ ScsiCd = "scsi-cd" } default Paravirtual);

impl DiskType {
    /// The `-device` driver of a disk (`cdrom`: a CD-ROM) of this type;
    /// `None` for types QEMU only attaches through `-drive if=TYPE`.
    pub fn device_driver(self, cdrom: bool) -> Option<&'static str> {
        Some(match (self, cdrom) {
            (DiskType::Paravirtual, _) => "virtio-blk-pci",
            (DiskType::Ide, false) => "ide-hd",
            (DiskType::Ide, true) => "ide-cd",
            // A CD-ROM image on the SCSI bus is a SCSI CD-ROM, whatever
            // the disks' SCSI type.
            (k, true) if k.on_scsi_bus() => "scsi-cd",
            (DiskType::Scsi | DiskType::ScsiHd, false) => "scsi-hd",
            (DiskType::ScsiBlock, false) => "scsi-block",
            (DiskType::ScsiGeneric, false) => "scsi-generic",
            (DiskType::ScsiCd, false) => "scsi-cd",
            _ => return None,
        })
    }

    /// Whether devices of this type sit on the SCSI controller
    /// (`scsi_controller_type`).
    pub fn on_scsi_bus(self) -> bool {
        matches!(
            self,
            DiskType::Scsi
                | DiskType::ScsiHd
                | DiskType::ScsiBlock
                | DiskType::ScsiGeneric
                | DiskType::ScsiCd
        )
    }
}
str_enum!(
    /// `usb_mouse`.
    UsbMouse { /** Relative USB mouse. */ Mouse = "mouse", /** Absolute tablet. */ Tablet = "tablet" } default Tablet);
str_enum!(
    /// `migration_mode`.
    MigrationMode { /** Live. */ Live = "live", /** Pause first. */ NonLive = "non-live" } default Live);
str_enum!(
    /// `disk_cache`.
    DiskCache { /** QEMU's default. */ Default = "default", #[allow(missing_docs)] None = "none",
                #[allow(missing_docs)] Writethrough = "writethrough", #[allow(missing_docs)] Writeback = "writeback" } default Default);
str_enum!(
    /// `disk_aio` (Ganeti 3.1): how QEMU does disk I/O.
    DiskAio { /** A thread pool (QEMU's default). */ Threads = "threads",
              /** Linux native AIO; needs O_DIRECT, so it forces `cache=none`. */ Native = "native",
              /** io_uring (QEMU ≥ 5.0). */ IoUring = "io_uring" } default Threads);
str_enum!(
    /// `disk_discard` (Ganeti 3.1): what a guest's TRIM does.
    DiskDiscard { /** Nothing. */ Ignore = "ignore", /** Punch holes in the backing file or device. */ Unmap = "unmap" } default Ignore);
str_enum!(
    /// `scsi_controller_type` (Ganeti 3.1): the controller SCSI disks and
    /// CD-ROMs sit on. gkvm's default is `virtio-scsi-pci` (Ganeti's is
    /// `lsi`): the paravirtual controller is faster, and it is what gkvm
    /// 0.1 started, so those instances keep their hardware.
    ScsiControllerType { /** LSI 53C895A. */ Lsi = "lsi", /** virtio-scsi. */ VirtioScsiPci = "virtio-scsi-pci",
                         /** LSI MegaRAID SAS. */ Megasas = "megasas" } default VirtioScsiPci);
str_enum!(
    /// `security_model`.
    SecurityModel { /** Run as the caller. */ None = "none", /** Run as `security_domain`. */ User = "user",
                    /** A uid from the pool. */ Pool = "pool" } default None);
str_enum!(
    /// `kvm_flag`.
    KvmFlag { /** KVM acceleration. */ Enabled = "enabled", /** TCG, no KVM. */ Disabled = "disabled" } default Enabled);
str_enum!(
    /// `reboot_behavior`.
    RebootBehavior { /** The guest may reboot (gkvm 0.1 spelled it `allow`). */ #[serde(alias = "allow")] Allow = "reboot", /** A reboot makes QEMU exit. */ Exit = "exit" } default Allow);
str_enum!(
    /// `firmware` (gkvm's, not Ganeti's): what the machine boots from.
    Firmware { /** SeaBIOS, QEMU's default (as Ganeti starts every instance). */ Bios = "bios",
               /** UEFI (OVMF), its variables in a per-instance store that persists. */ Uefi = "uefi",
               /** UEFI with Secure Boot and Microsoft's keys enrolled (a q35 machine, SMM). */ UefiSecboot = "uefi-secboot" } default Bios);
str_enum!(
    /// `rng` (gkvm's): a random-number device for the guest.
    Rng { /** None (as Ganeti starts every instance). */ None = "none",
          /** virtio-rng, fed by the host's `/dev/urandom` at `rng_rate` bytes a second. */ Virtio = "virtio" } default None);
str_enum!(
    /// `tpm` (gkvm's): a TPM for the guest.
    Tpm { /** None (as Ganeti starts every instance). */ None = "none",
          /** TPM 2.0 (a CRB device), emulated by a swtpm of the instance's own whose state persists on the node. */ Tpm2 = "tpm2" } default None);
str_enum!(
    /// `sandbox` (gkvm's): QEMU's seccomp system-call filter.
    Sandbox { /** `-sandbox on,obsolete=deny,resourcecontrol=deny` where QEMU has it (libvirt's default less `spawn` and `elevateprivileges`, which `-daemonize` needs: QEMU forks and calls setsid after it installs the filter). */ On = "on",
              /** No filter (as Ganeti starts every instance). */ Off = "off" } default On);
str_enum!(
    /// `watchdog` (gkvm's): a hardware watchdog the guest must feed.
    Watchdog { /** None. */ None = "none",
               /** Intel 6300ESB (a PCI device every guest kernel has a driver for). */ I6300esb = "i6300esb" } default None);
str_enum!(
    /// `watchdog_action` (gkvm's): what happens when the guest stops
    /// feeding its watchdog (QEMU's `-action watchdog=`).
    WatchdogAction { /** Reset the machine. */ Reset = "reset", /** Stop it (QEMU exits; `user_shutdown` keeps it). */ Shutdown = "shutdown",
                     /** Power it off at once. */ Poweroff = "poweroff", /** Pause the guest (its state kept for a look). */ Pause = "pause",
                     /** Nothing but the event. */ None = "none" } default Reset);
str_enum!(
    /// SPICE lossless image compression.
    SpiceLossless { #[allow(missing_docs)] AutoGlz = "auto_glz", #[allow(missing_docs)] AutoLz = "auto_lz",
                    #[allow(missing_docs)] Quic = "quic", #[allow(missing_docs)] Glz = "glz",
                    #[allow(missing_docs)] Lz = "lz", #[allow(missing_docs)] Off = "off" } default AutoGlz);
str_enum!(
    /// SPICE lossy (WAN) compression.
    SpiceLossy { #[allow(missing_docs)] Auto = "auto", #[allow(missing_docs)] Never = "never",
                 #[allow(missing_docs)] Always = "always" } default Auto);
str_enum!(
    /// SPICE video stream detection.
    SpiceVideo { #[allow(missing_docs)] Off = "off", #[allow(missing_docs)] All = "all",
                 #[allow(missing_docs)] Filter = "filter" } default Off);

/// Serial speeds Ganeti accepts.
pub const VALID_SERIAL_SPEEDS: &[u32] = &[
    75, 110, 300, 600, 1200, 1800, 2400, 4800, 9600, 14400, 19200, 28800, 38400, 57600, 115200,
    230400, 345600, 460800,
];

/// Ganeti's TLS cipher default for SPICE.
pub const DEFAULT_SPICE_TLS_CIPHERS: &str = "HIGH:-DES:-3DES:-EXPORT:-ADH";

/// Every KVM hypervisor parameter of Ganeti's KVM driver, typed. Empty strings
/// in Ganeti's format are `None` here for optional values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HvParams {
    /// QEMU binary.
    pub kvm_path: PathBuf,
    /// Kernel to boot directly (none: boot from disk).
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub kernel_path: Option<PathBuf>,
    /// Initrd for `kernel_path`.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub initrd_path: Option<PathBuf>,
    /// `root=` for `kernel_path`.
    pub root_path: String,
    /// Extra kernel command line for `kernel_path`.
    pub kernel_args: String,
    /// ACPI on.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub acpi: bool,
    /// Serial console on a Unix socket.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub serial_console: bool,
    /// Console speed for `console=ttyS0,SPEED`.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub serial_speed: u32,
    /// VNC: an IPv4 address, or an absolute directory for a Unix socket.
    pub vnc_bind_address: String,
    /// VNC TLS.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub vnc_tls: bool,
    /// VNC x509 certificate directory.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub vnc_x509_path: Option<PathBuf>,
    /// Verify VNC clients' certificates.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub vnc_x509_verify: bool,
    /// File holding the VNC password (set over QMP, never on the command line).
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub vnc_password_file: Option<PathBuf>,
    /// SPICE: an IP address or a host interface name.
    pub spice_bind: String,
    /// SPICE IP version: 0 (any), 4 or 6.
    #[serde(with = "lenient")]
    #[schemars(with = "u8")]
    pub spice_ip_version: u8,
    /// File holding the SPICE password (set over QMP).
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub spice_password_file: Option<PathBuf>,
    /// SPICE lossless image compression.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<SpiceLossless>")]
    pub spice_image_compression: Option<SpiceLossless>,
    /// SPICE JPEG WAN compression.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<SpiceLossy>")]
    pub spice_jpeg_wan_compression: Option<SpiceLossy>,
    /// SPICE zlib-glz WAN compression.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<SpiceLossy>")]
    pub spice_zlib_glz_wan_compression: Option<SpiceLossy>,
    /// SPICE video stream detection.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<SpiceVideo>")]
    pub spice_streaming_video: Option<SpiceVideo>,
    /// SPICE audio compression.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub spice_playback_compression: bool,
    /// SPICE over TLS.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub spice_use_tls: bool,
    /// SPICE TLS ciphers.
    pub spice_tls_ciphers: String,
    /// SPICE guest agent channel.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub spice_use_vdagent: bool,
    /// Floppy image.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub floppy_image_path: Option<PathBuf>,
    /// CD-ROM image.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub cdrom_image_path: Option<PathBuf>,
    /// Second CD-ROM image.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub cdrom2_image_path: Option<PathBuf>,
    /// Boot device.
    pub boot_order: BootOrder,
    /// NIC model.
    pub nic_type: NicType,
    /// Disk attachment.
    pub disk_type: DiskType,
    /// CD-ROM attachment (default: `disk_type`).
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<DiskType>")]
    pub cdrom_disk_type: Option<DiskType>,
    /// USB pointing device.
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<UsbMouse>")]
    pub usb_mouse: Option<UsbMouse>,
    /// VNC keyboard layout.
    pub keymap: String,
    /// Migration TCP port.
    #[serde(with = "lenient")]
    #[schemars(with = "u16")]
    pub migration_port: u16,
    /// Migration bandwidth limit in MiB/s.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub migration_bandwidth: u32,
    /// Migration downtime limit in ms.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub migration_downtime: u32,
    /// Live or not.
    pub migration_mode: MigrationMode,
    /// Migration capabilities to turn on, `:`-separated (Ganeti 3.1), e.g.
    /// `xbzrle:auto-converge`: set on both sides before the transfer.
    pub migration_caps: String,
    /// RTC in local time.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub use_localtime: bool,
    /// Disk cache mode.
    pub disk_cache: DiskCache,
    /// Disk I/O mode (Ganeti 3.1).
    pub disk_aio: DiskAio,
    /// Whether a guest's discards reach the disk (Ganeti 3.1).
    pub disk_discard: DiskDiscard,
    /// The SCSI controller model (Ganeti 3.1).
    pub scsi_controller_type: ScsiControllerType,
    /// Which user QEMU runs as.
    pub security_model: SecurityModel,
    /// The user for `security_model=user`.
    pub security_domain: String,
    /// KVM acceleration on or off. Ganeti's `""` (say nothing) meant KVM
    /// on the qemu-kvm of its day, so it reads as `enabled`.
    #[serde(deserialize_with = "kvm_flag_or_empty")]
    pub kvm_flag: KvmFlag,
    /// vhost-net for paravirtual NICs.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub vhost_net: bool,
    /// Keep QEMU when the guest shuts itself down (`-no-shutdown`), so the
    /// instance shows `shutdown` — the user's, not a crash — until it is
    /// started again or stopped (Ganeti 3.1).
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub user_shutdown: bool,
    /// A virtio-serial port for the QEMU guest agent, on a socket in the
    /// run dir (Ganeti 3.1).
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub use_guest_agent: bool,
    /// Offer the virtio-net header on paravirtual NICs' TAPs when the
    /// kernel has it (Ganeti 3.1).
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub vnet_hdr: bool,
    /// Queues of each paravirtual NIC (Ganeti 3.1; 1 to 32): one TAP
    /// queue each, and `mq=on,vectors=2N+2` on the device.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub virtio_net_queues: u32,
    /// chroot QEMU into an empty per-instance directory.
    #[serde(with = "lenient")]
    #[schemars(with = "bool")]
    pub use_chroot: bool,
    /// Back guest RAM by files in this directory (hugetlbfs).
    #[serde(with = "empty_none")]
    #[schemars(with = "Option<PathBuf>")]
    pub mem_path: Option<PathBuf>,
    /// What a guest reboot does.
    pub reboot_behavior: RebootBehavior,
    /// CPU pinning, e.g. `all`, `0-3`, `0:1:2-3` (one set per vCPU).
    pub cpu_mask: CpuMask,
    /// `-cpu` model and flags.
    pub cpu_type: String,
    /// Cores per socket (0: QEMU decides).
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cpu_cores: u32,
    /// Threads per core (0: QEMU decides).
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cpu_threads: u32,
    /// Sockets (0: QEMU decides).
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cpu_sockets: u32,
    /// Sound card model.
    pub soundhw: String,
    /// Extra USB devices, comma separated (`-usbdevice` names).
    pub usb_devices: String,
    /// `-vga` type.
    pub vga: String,
    /// Extra QEMU arguments, split as a POSIX shell splits words (quotes
    /// group, a backslash escapes; nothing is expanded): see
    /// [`HvParams::kvm_extra_args`].
    pub kvm_extra: String,
    /// Machine type (empty: QEMU's default, resolved to its concrete name).
    pub machine_version: String,
    /// PCI slots left to QEMU's own devices; NICs and disks get explicit
    /// slots from this one up (Ganeti 3.1's default: 12).
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub kvm_pci_reservations: u32,
    /// What the machine boots from: BIOS, or UEFI with its own variable
    /// store (gkvm's parameter; Ganeti 3.1 has none, see
    /// [`GKVM_HVPARAMS`]).
    pub firmware: Firmware,
    /// A random-number device fed by the host (gkvm's parameter).
    pub rng: Rng,
    /// Bytes a second the guest may draw from its random-number device (0:
    /// no limit). A bound keeps one guest from draining the host's pool
    /// for the others.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub rng_rate: u32,
    /// A hardware watchdog (gkvm's parameter).
    pub watchdog: Watchdog,
    /// A TPM (gkvm's parameter), emulated by a swtpm the instance owns.
    pub tpm: Tpm,
    /// What the watchdog does when the guest stops feeding it.
    pub watchdog_action: WatchdogAction,
    /// QEMU's seccomp sandbox (gkvm's parameter; on by default).
    pub sandbox: Sandbox,
    /// CPU time the instance's cgroup may use, in percent of one CPU (150:
    /// one and a half); 0: no limit. gkvm's, like the other `cgroup_*`.
    /// QEMU and its helpers run in a cgroup of the instance's own where
    /// the node has cgroups; with any limit set, a node without them
    /// cannot start the instance.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cgroup_cpu_quota: u32,
    /// CPU weight against other cgroups, 1 to 10000 (100 is the kernel's
    /// default); 0: the default.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cgroup_cpu_weight: u32,
    /// Memory (MiB) the instance's QEMU may never exceed, guest memory
    /// and QEMU's own together; 0: no limit. At least the guest's memory
    /// plus QEMU's overhead (64 MiB and 1/32 of it).
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cgroup_memory_max: u32,
    /// Memory (MiB) above which the instance is reclaimed first under
    /// pressure (v2 `memory.high`, v1's soft limit); 0: none.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cgroup_memory_high: u32,
    /// Processes and threads the instance's cgroup may have; 0: no limit.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cgroup_pids_max: u32,
    /// Block I/O weight, 1 to 10000 (100 is the default); 0: the default.
    #[serde(with = "lenient")]
    #[schemars(with = "u32")]
    pub cgroup_io_weight: u32,
    /// Block I/O ceilings on the host device under each of the instance's
    /// disks, in the kernel's `io.max` keys: any of `rbps`, `wbps` (bytes
    /// a second; suffixes K, M, G), `riops`, `wiops` (operations a
    /// second), comma separated (`rbps=20M,wiops=500`); empty: none. The
    /// kernel holds buffered writes to them only on cgroup v2; QEMU's own
    /// throttle groups (`io_limits`) hold everything, per disk.
    pub cgroup_io_max: String,
}

impl Default for HvParams {
    fn default() -> Self {
        HvParams {
            kvm_path: PathBuf::from("/usr/bin/kvm"),
            kernel_path: None,
            initrd_path: None,
            root_path: "/dev/vda1".into(),
            kernel_args: "ro".into(),
            acpi: true,
            serial_console: true,
            serial_speed: 38400,
            vnc_bind_address: String::new(),
            vnc_tls: false,
            vnc_x509_path: None,
            vnc_x509_verify: false,
            vnc_password_file: None,
            spice_bind: String::new(),
            spice_ip_version: 0,
            spice_password_file: None,
            spice_image_compression: None,
            spice_jpeg_wan_compression: None,
            spice_zlib_glz_wan_compression: None,
            spice_streaming_video: None,
            spice_playback_compression: true,
            spice_use_tls: false,
            spice_tls_ciphers: DEFAULT_SPICE_TLS_CIPHERS.into(),
            spice_use_vdagent: true,
            floppy_image_path: None,
            cdrom_image_path: None,
            cdrom2_image_path: None,
            boot_order: BootOrder::Disk,
            nic_type: NicType::Paravirtual,
            disk_type: DiskType::Paravirtual,
            cdrom_disk_type: None,
            usb_mouse: None,
            keymap: String::new(),
            migration_port: 8102,
            migration_bandwidth: 32,
            migration_downtime: 30,
            migration_mode: MigrationMode::Live,
            migration_caps: String::new(),
            use_localtime: false,
            disk_cache: DiskCache::Default,
            disk_aio: DiskAio::Threads,
            disk_discard: DiskDiscard::Ignore,
            scsi_controller_type: ScsiControllerType::VirtioScsiPci,
            security_model: SecurityModel::None,
            security_domain: String::new(),
            kvm_flag: KvmFlag::Enabled,
            vhost_net: false,
            use_guest_agent: false,
            user_shutdown: false,
            vnet_hdr: true,
            virtio_net_queues: 1,
            use_chroot: false,
            mem_path: None,
            reboot_behavior: RebootBehavior::Allow,
            cpu_mask: CpuMask::all(),
            cpu_type: String::new(),
            cpu_cores: 0,
            cpu_threads: 0,
            cpu_sockets: 0,
            soundhw: String::new(),
            usb_devices: String::new(),
            vga: String::new(),
            kvm_extra: String::new(),
            machine_version: String::new(),
            kvm_pci_reservations: 12,
            firmware: Firmware::Bios,
            rng: Rng::None,
            rng_rate: 1 << 20,
            watchdog: Watchdog::None,
            tpm: Tpm::None,
            watchdog_action: WatchdogAction::Reset,
            sandbox: Sandbox::On,
            cgroup_cpu_quota: 0,
            cgroup_cpu_weight: 0,
            cgroup_memory_max: 0,
            cgroup_memory_high: 0,
            cgroup_pids_max: 0,
            cgroup_io_weight: 0,
            cgroup_io_max: String::new(),
        }
    }
}

/// The hypervisor parameters gkvm has beyond Ganeti 3.1's 65: a Ganeti
/// cluster cannot set them (its parameter tables are fixed in its code);
/// they take their defaults there.
pub const GKVM_HVPARAMS: [&str; 14] = [
    "firmware",
    "rng",
    "rng_rate",
    "watchdog",
    "watchdog_action",
    "tpm",
    "sandbox",
    "cgroup_cpu_quota",
    "cgroup_cpu_weight",
    "cgroup_memory_max",
    "cgroup_memory_high",
    "cgroup_pids_max",
    "cgroup_io_weight",
    "cgroup_io_max",
];

/// The hvparams that set an instance's cgroup limits, which change live
/// (`set-limits`).
pub const CGROUP_HVPARAMS: [&str; 7] = [
    "cgroup_cpu_quota",
    "cgroup_cpu_weight",
    "cgroup_memory_max",
    "cgroup_memory_high",
    "cgroup_pids_max",
    "cgroup_io_weight",
    "cgroup_io_max",
];

/// Block I/O ceilings per backing device (`cgroup_io_max`): unset means
/// no ceiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CgroupIoMax {
    /// Bytes read a second.
    pub read_bps: Option<u64>,
    /// Bytes written a second.
    pub write_bps: Option<u64>,
    /// Read operations a second.
    pub read_iops: Option<u64>,
    /// Write operations a second.
    pub write_iops: Option<u64>,
}

impl CgroupIoMax {
    /// Parses `rbps=20M,wbps=10M,riops=500,wiops=200` (any of them, each
    /// once; empty: none).
    pub fn parse(text: &str) -> Result<CgroupIoMax, String> {
        let mut max = CgroupIoMax::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not KEY=VALUE (rbps, wbps, riops, wiops)"))?;
            let slot = match key.trim() {
                "rbps" => &mut max.read_bps,
                "wbps" => &mut max.write_bps,
                "riops" => &mut max.read_iops,
                "wiops" => &mut max.write_iops,
                other => return Err(format!("{other:?} is not one of rbps, wbps, riops, wiops")),
            };
            let n = crate::values::parse_size_bytes(value).map_err(|e| format!("{key}: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "{key}=0 would stop the disks (leave it out for no ceiling)"
                ));
            }
            if slot.replace(n).is_some() {
                return Err(format!("{key} is given twice"));
            }
        }
        Ok(max)
    }

    /// Whether any ceiling is set.
    pub fn is_set(&self) -> bool {
        *self != CgroupIoMax::default()
    }
}

impl HvParams {
    /// Whether any cgroup limit is set (the instance then runs in a cgroup
    /// of its own).
    pub fn has_cgroup_limits(&self) -> bool {
        [
            self.cgroup_cpu_quota,
            self.cgroup_cpu_weight,
            self.cgroup_memory_max,
            self.cgroup_memory_high,
            self.cgroup_pids_max,
            self.cgroup_io_weight,
        ]
        .iter()
        .any(|v| *v > 0)
            || self.cgroup_io_max().is_ok_and(|m| m.is_set())
    }

    /// The `cgroup_io_max` ceilings; a malformed value is an error naming
    /// the parameter.
    pub fn cgroup_io_max(&self) -> Result<CgroupIoMax, Error> {
        CgroupIoMax::parse(&self.cgroup_io_max).map_err(|reason| Error::Syntax {
            key: "cgroup_io_max".into(),
            reason,
        })
    }

    /// The least `cgroup_memory_max` (MiB) an instance of `memory` MiB can
    /// run under: its guest's memory and QEMU's own (64 MiB and 1/32 of
    /// the guest's: code, device state, I/O buffers).
    pub fn min_cgroup_memory(memory: u64) -> u64 {
        memory + 64 + memory / 32
    }
}

/// The hvparams a restart (`reboot_behavior=exit`) or a migration's
/// destination takes from the current configuration rather than from the
/// running instance (Ganeti 3.1's `conf_hvp`): see
/// [`HvParams::take_restart_safe`].
pub const RESTART_SAFE_HVPARAMS: [&str; 6] = [
    "keymap",
    "vnc_password_file",
    "spice_password_file",
    "use_chroot",
    "security_model",
    "security_domain",
];

impl HvParams {
    /// `kvm_extra` as arguments, split like a shell splits words: `-device
    /// "e1000,id=x y"` is two arguments. An unterminated quote or a
    /// trailing backslash is an error naming `kvm_extra`.
    pub fn kvm_extra_args(&self) -> Result<Vec<String>, Error> {
        split_shell_words(&self.kvm_extra).map_err(|reason| Error::Syntax {
            key: "kvm_extra".into(),
            reason,
        })
    }

    /// The capabilities of `migration_caps`.
    pub fn migration_capabilities(&self) -> Vec<&str> {
        self.migration_caps
            .split(':')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// Every parameter name, in Ganeti's order.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(HvParams::default()) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The parameters as a JSON map (Ganeti's spelling: `""` for unset).
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }

    /// Parses a JSON map over the defaults. Values may be JSON-typed or
    /// strings (`"true"`, `"38400"`); errors name the key and value.
    pub fn from_map(map: &Map<String, Value>) -> Result<HvParams, Error> {
        let mut params = HvParams::default();
        params.apply_map(map)?;
        Ok(params)
    }

    /// Takes from `current` (the cluster's configuration now) the
    /// parameters that may change between starts of a running instance —
    /// [`RESTART_SAFE_HVPARAMS`], as Ganeti 3.1's `conf_hvp` — and keeps
    /// this instance's own values (`up_hvp`) of everything else, whose
    /// change needs a stop and a start (NIC and disk types, vhost, CPU
    /// mask, machine, ...).
    pub fn take_restart_safe(&mut self, current: &HvParams) {
        self.keymap.clone_from(&current.keymap);
        self.vnc_password_file
            .clone_from(&current.vnc_password_file);
        self.spice_password_file
            .clone_from(&current.spice_password_file);
        self.use_chroot = current.use_chroot;
        self.security_model = current.security_model;
        self.security_domain.clone_from(&current.security_domain);
    }

    /// Parses `key=value` items over the defaults.
    pub fn from_pairs<S: AsRef<str>>(pairs: &[S]) -> Result<HvParams, Error> {
        let mut params = HvParams::default();
        for p in pairs {
            params.set_pair(p.as_ref())?;
        }
        Ok(params)
    }

    /// Sets one `key=value` item.
    pub fn set_pair(&mut self, pair: &str) -> Result<(), Error> {
        let (key, value) = pair.split_once('=').ok_or_else(|| Error::InvalidValue {
            key: pair.to_owned(),
            value: String::new(),
            reason: "expected key=value".into(),
        })?;
        self.set(key.trim(), Value::String(value.to_owned()))
    }

    /// Sets one parameter from a JSON value (or a string to parse).
    pub fn set(&mut self, key: &str, value: Value) -> Result<(), Error> {
        let mut m = Map::new();
        m.insert(key.to_owned(), value);
        self.apply_map(&m)
    }

    fn apply_map(&mut self, map: &Map<String, Value>) -> Result<(), Error> {
        // Ganeti writes `None` (JSON null) for a parameter left unset: the
        // default.
        if map.values().any(Value::is_null) {
            let defaults = HvParams::default().to_map();
            let filled: Map<String, Value> = map
                .iter()
                .map(|(k, v)| match (v, defaults.get(k)) {
                    (Value::Null, Some(d)) => (k.clone(), d.clone()),
                    _ => (k.clone(), v.clone()),
                })
                .collect();
            return self.apply_filled(&filled);
        }
        self.apply_filled(map)
    }

    fn apply_filled(&mut self, map: &Map<String, Value>) -> Result<(), Error> {
        let mut current = self.to_map();
        // Fast path: every key known and the merged map parses in one go.
        // Only a map that fails is parsed key by key, for an error naming
        // the key (parsing each key alone costs a whole HvParams each).
        if map.keys().all(|k| current.contains_key(k)) {
            let mut merged = current.clone();
            merged.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
            if let Ok(parsed) = serde_json::from_value::<HvParams>(Value::Object(merged)) {
                *self = parsed;
                return Ok(());
            }
        }
        for (key, value) in map {
            if !current.contains_key(key) {
                return Err(Error::UnknownParameter { key: key.clone() });
            }
            // Parse the one key alone so an error can name it.
            let mut one = Map::new();
            one.insert(key.clone(), value.clone());
            let parsed: HvParams =
                serde_json::from_value(Value::Object(one)).map_err(|e| Error::InvalidValue {
                    key: key.clone(),
                    value: match value {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                    reason: clean_serde_message(&e.to_string()),
                })?;
            let canonical = parsed.to_map().remove(key).unwrap_or(Value::Null);
            current.insert(key.clone(), canonical);
        }
        *self =
            serde_json::from_value(Value::Object(current)).map_err(|e| Error::InvalidValue {
                key: "hvparams".into(),
                value: String::new(),
                reason: e.to_string(),
            })?;
        Ok(())
    }
}

/// Splits words as a POSIX shell does, without expanding anything:
/// whitespace separates, `'...'` keeps everything, `"..."` keeps all but
/// `\"` and `\\`, a backslash outside quotes escapes the next character.
fn split_shell_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(q) => w.push(q),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\')) => w.push(e),
                            Some(e) => {
                                w.push('\\');
                                w.push(e);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(q) => w.push(q),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(e) => word.get_or_insert_with(String::new).push(e),
                None => return Err("trailing backslash".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

fn kvm_flag_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<KvmFlag, D::Error> {
    let v = Value::deserialize(d)?;
    match v {
        Value::String(ref s) if s.is_empty() => Ok(KvmFlag::Enabled),
        other => KvmFlag::deserialize(other).map_err(serde::de::Error::custom),
    }
}

fn clean_serde_message(m: &str) -> String {
    // serde_json appends " at line 1 column N", meaningless for one value.
    match m.find(" at line ") {
        Some(i) => m[..i].to_owned(),
        None => m.to_owned(),
    }
}

/// `""` ↔ `None` for optional values, as Ganeti stores them.
pub(crate) mod empty_none {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        let v = Value::deserialize(d)?;
        match v {
            Value::Null => Ok(None),
            Value::String(ref s) if s.is_empty() => Ok(None),
            other => T::deserialize(other)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Booleans and numbers that also accept their string spellings, so that
/// `key=value` text and typed JSON parse the same.
pub(crate) mod lenient {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    pub trait Lenient: Sized + Serialize {
        fn from_value(v: &Value) -> Result<Self, String>;
    }

    impl Lenient for bool {
        fn from_value(v: &Value) -> Result<bool, String> {
            match v {
                Value::Bool(b) => Ok(*b),
                Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
                Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
                Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "yes" | "on" | "1" => Ok(true),
                    "false" | "no" | "off" | "0" => Ok(false),
                    _ => Err("expected a boolean (true/false, yes/no, on/off, 1/0)".into()),
                },
                _ => Err("expected a boolean".into()),
            }
        }
    }

    macro_rules! lenient_int {
        ($($t:ty),*) => {$(
            impl Lenient for $t {
                fn from_value(v: &Value) -> Result<$t, String> {
                    let range = || format!("expected an integer from {} to {}", <$t>::MIN, <$t>::MAX);
                    match v {
                        Value::Number(n) => n.as_u64().and_then(|n| <$t>::try_from(n).ok()).ok_or_else(range),
                        Value::String(s) => s.trim().parse::<$t>().map_err(|_| range()),
                        _ => Err(range()),
                    }
                }
            }
        )*};
    }
    lenient_int!(u8, u16, u32);

    pub fn serialize<T: Lenient, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, T: Lenient, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let v = Value::deserialize(d)?;
        T::from_value(&v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_ceilings_parse_and_bad_ones_are_named() {
        let max = CgroupIoMax::parse("rbps=20M, wiops=500").unwrap();
        assert_eq!(max.read_bps, Some(20 << 20));
        assert_eq!(max.write_iops, Some(500));
        assert_eq!(max.write_bps, None);
        assert!(max.is_set());
        assert!(!CgroupIoMax::parse("").unwrap().is_set());
        for (bad, says) in [
            ("rbps", "KEY=VALUE"),
            ("xbps=1", "not one of"),
            ("rbps=1,rbps=2", "twice"),
            ("wbps=0", "stop the disks"),
            ("riops=ten", "not a number"),
        ] {
            let e = CgroupIoMax::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let mut hv = HvParams::default();
        assert!(!hv.has_cgroup_limits());
        hv.set_pair("cgroup_io_max=wbps=1M").unwrap();
        assert!(hv.has_cgroup_limits());
        hv.cgroup_io_max = "what".into();
        assert!(hv
            .cgroup_io_max()
            .unwrap_err()
            .to_string()
            .contains("cgroup_io_max"));
    }

    #[test]
    fn a_restart_takes_exactly_the_restart_safe_keys() {
        let current = HvParams::from_pairs(&[
            "keymap=de",
            "vnc_password_file=/etc/vnc.pass",
            "spice_password_file=/etc/spice.pass",
            "use_chroot=true",
            "security_model=user",
            "security_domain=nobody",
            "nic_type=e1000",
            "cpu_mask=0",
        ])
        .unwrap();
        let mut up = HvParams::default();
        up.take_restart_safe(&current);
        let (got, want, before) = (up.to_map(), current.to_map(), HvParams::default().to_map());
        for k in HvParams::keys() {
            let expected = if RESTART_SAFE_HVPARAMS.contains(&k.as_str()) {
                &want
            } else {
                &before
            };
            assert_eq!(got[k.as_str()], expected[k.as_str()], "{k}");
        }
    }

    #[test]
    fn kvm_extra_splits_like_a_shell() {
        let split = |t: &str| split_shell_words(t);
        assert_eq!(split("-a b  -c").unwrap(), ["-a", "b", "-c"]);
        assert_eq!(
            split(r#"-device "e1000,id=x y" -name 'a b'c"#).unwrap(),
            ["-device", "e1000,id=x y", "-name", "a bc"]
        );
        assert_eq!(split(r#"a\ b "q\"t" ''"#).unwrap(), ["a b", "q\"t", ""]);
        assert!(split("'open").is_err());
        assert!(split("\"open").is_err());
        assert!(split("end\\").is_err());
        let mut hv = HvParams::default();
        hv.set_pair("kvm_extra=-x 'unterminated").unwrap();
        assert!(matches!(hv.check_syntax(), Err(Error::Syntax { key, .. }) if key == "kvm_extra"));
    }

    #[test]
    fn defaults_round_trip_through_the_ganeti_map() {
        let d = HvParams::default();
        let m = d.to_map();
        assert_eq!(m["kernel_path"], "");
        assert_eq!(m["serial_speed"], 38400);
        assert_eq!(m["cpu_mask"], "all");
        assert_eq!(HvParams::from_map(&m).unwrap(), d);
        assert_eq!(HvParams::keys().len(), 65 + GKVM_HVPARAMS.len());
    }

    #[test]
    fn pairs_parse_typed() {
        let p = HvParams::from_pairs(&[
            "acpi=no",
            "serial_speed=115200",
            "boot_order=cdrom",
            "kernel_path=/boot/vmlinuz",
            "cdrom_disk_type=",
            "usb_mouse=tablet",
            "cpu_mask=0-1:2",
            "migration_port=9000",
        ])
        .unwrap();
        assert!(!p.acpi);
        assert_eq!(p.serial_speed, 115200);
        assert_eq!(p.boot_order, BootOrder::Cdrom);
        assert_eq!(
            p.kernel_path.as_deref(),
            Some(std::path::Path::new("/boot/vmlinuz"))
        );
        assert_eq!(p.cdrom_disk_type, None);
        assert_eq!(p.usb_mouse, Some(UsbMouse::Tablet));
        assert_eq!(p.cpu_mask.to_string(), "0-1:2");
        assert_eq!(p.migration_port, 9000);
    }

    #[test]
    fn errors_name_key_and_value() {
        let e = HvParams::from_pairs(&["no_such=1"]).unwrap_err();
        assert_eq!(
            e,
            Error::UnknownParameter {
                key: "no_such".into()
            }
        );
        for (pair, key, value) in [
            ("acpi=maybe", "acpi", "maybe"),
            ("serial_speed=fast", "serial_speed", "fast"),
            ("migration_port=70000", "migration_port", "70000"),
            ("boot_order=usb", "boot_order", "usb"),
            ("cpu_mask=0-x", "cpu_mask", "0-x"),
            ("disk_cache=unsafe", "disk_cache", "unsafe"),
        ] {
            match HvParams::from_pairs(&[pair]) {
                Err(Error::InvalidValue {
                    key: k,
                    value: v,
                    reason,
                }) => {
                    assert_eq!((k.as_str(), v.as_str()), (key, value), "{reason}");
                    assert!(!reason.contains("line 1"), "{reason}");
                }
                other => panic!("{pair}: {other:?}"),
            }
        }
        assert!(matches!(
            HvParams::from_pairs(&["acpi"]),
            Err(Error::InvalidValue { .. })
        ));
    }

    #[test]
    fn json_map_with_native_types() {
        let m = serde_json::json!({"acpi": false, "serial_speed": 9600, "kvm_flag": "disabled", "spice_ip_version": 6});
        let p = HvParams::from_map(m.as_object().unwrap()).unwrap();
        assert!(!p.acpi);
        assert_eq!(p.serial_speed, 9600);
        assert_eq!(p.kvm_flag, KvmFlag::Disabled);
        assert_eq!(p.spice_ip_version, 6);
    }
}
