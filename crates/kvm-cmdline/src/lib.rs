//! QEMU/KVM command lines from typed instance definitions — pure code: no
//! processes, no files.
//!
//! This is the heart of a KVM hypervisor driver, rebuilt from Ganeti's:
//!
//! - [`HvParams`]: every hypervisor parameter of Ganeti's KVM driver with
//!   its key name and default, typed, parsed from `key=value` text or a
//!   JSON map, with a syntax check ([`HvParams::check_syntax`]) kept apart
//!   from host validation ([`HvParams::validate_host`], which takes the
//!   host's facts as input).
//! - [`Capabilities`]: what a QEMU binary supports, parsed from the text of
//!   `--help`, `-machine ?` and `-device ?` of any QEMU from 0.9 to 10.x, or
//!   from QMP answers. Serializable, so a caller can cache it.
//! - [`build`]: instance + capabilities → [`QemuCommand`], version-aware:
//!   the same parameters give `-balloon virtio` on old QEMU and `-device
//!   virtio-balloon-pci` on new, `-localtime` or `-rtc base=localtime`,
//!   `-chroot`/`-runas` or `-run-with`, `-no-acpi` or `-machine acpi=off`.
//!   [`QemuCommand::launch_argv`] adds the start-time parts (node paths,
//!   TAP descriptors, `-incoming`, `-S`). User values are escaped for
//!   QEMU's option syntax; values that cannot be expressed are errors;
//!   passwords never appear.
//!
//! ```
//! use kvm_cmdline::{build, BuildEnv, Capabilities, InstanceSpec};
//!
//! let caps = Capabilities::from_help(
//!     "QEMU emulator version 7.2.0\n-machine [type=]name\n-display none\n-qmp dev\n-netdev tap\n-rtc base=utc\n",
//!     "Supported machines are:\npc-i440fx-7.2  Standard PC (default)\n",
//!     "name \"virtio-balloon-pci\"\nname \"virtio-net-pci\"\n",
//! ).unwrap();
//! let mut spec = InstanceSpec::new("web1", 512);
//! spec.hvparams.set_pair("use_localtime=true").unwrap();
//! let cmd = build(&spec, &caps, &BuildEnv::default()).unwrap();
//! assert!(cmd.argv.windows(2).any(|w| w == ["-rtc", "base=localtime"]));
//! assert_eq!(cmd.machine, "pc-i440fx-7.2");
//! ```
#![deny(missing_docs)]

mod build;
mod caps;
mod cpumask;
mod error;
pub mod escape;
pub mod hvparams;
mod instance;
mod options;
mod placement;
pub mod qemu;
mod throttle;
mod validate;
mod values;

pub use build::{
    build, hotplug_disk, hotplug_nic, keymap_file, pick_address, uses_vhost, BuildEnv,
    FirmwareFiles, Launch, NicBackend, NodePaths, QemuCommand, EVENTS_CHARDEV, FIRMWARE_CODE_NODE,
    FIRMWARE_VARS_NODE, MIGRATION_TLS_IN, MIGRATION_TLS_OUT, VNC_BASE_PORT,
};
pub use caps::{
    parse_devices, parse_machines, parse_version, Capabilities, Features, MachineType, Probe,
    QemuVersion, Rule, RULES,
};
pub use cpumask::{CpuMask, CpuSet};
pub use error::Error;
pub use hvparams::{CgroupIoMax, HvParams, CGROUP_HVPARAMS, GKVM_HVPARAMS, RESTART_SAFE_HVPARAMS};
pub use instance::tap_template_problem;
pub use instance::{
    validate_instance_name, validate_mac, DeviceAddress, DiskMode, DiskSpec, InstanceSpec, Layout,
    NetworkSpec, NicMode, NicSpec, PcieSlots, MAX_DISKS, MAX_MEMORY_MIB, MAX_NICS, PCIE_SLOTS,
    PCI_SLOTS, SHARED_STORAGE_TEMPLATES,
};
pub use options::generated_mac;
pub use placement::is_valid_device_id;
pub use throttle::{io_group_id, IoLimits, MAX_IO_LIMIT};
pub use validate::{image_url, HostFacts, Warning, MAX_VIRTIO_NET_QUEUES};
pub use values::{parse_size_bytes, MacAddr, Uuid};

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
