//! TAP network interfaces for virtual machines, by ioctl.
//!
//! A hypervisor that gives a guest a network card needs a TAP interface: a
//! kernel network device whose other end is a file descriptor the emulator
//! reads and writes frames on. This crate creates one with `TUNSETIFF`
//! (`IFF_TAP | IFF_NO_PI`), turns on `IFF_VNET_HDR` when the kernel offers
//! it (so the guest can use checksum and segmentation offloads), opens one
//! descriptor per queue for multiqueue NICs, brings the link up and attaches
//! it to a Linux bridge — all with ioctls, no `ip` or `brctl` processes.
//!
//! Every descriptor is an [`OwnedFd`] opened close-on-exec; the interface
//! disappears when the last one is dropped. [`pass_fd_to_child`] hands a
//! descriptor to a child process without ever clearing close-on-exec in the
//! parent, so descriptors never leak into unrelated children.
//!
//! ```no_run
//! use gkvm_tap::{TapBuilder, VnetHdr};
//!
//! # fn main() -> Result<(), gkvm_tap::Error> {
//! let tap = TapBuilder::new()
//!     .name_template("gkvm%d")
//!     .vnet_hdr(VnetHdr::Auto)
//!     .queues(2)
//!     .open()?;
//! tap.set_up()?;
//! tap.attach_to_bridge("br0")?;
//! println!("{} has {} queues", tap.name(), tap.fds().len());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod child;
mod error;
mod sys;

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

pub use child::pass_fd_to_child;
pub use error::Error;

/// The character device that creates TUN/TAP interfaces.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// Longest interface name the kernel accepts (`IFNAMSIZ` less the NUL).
pub const MAX_NAME_LEN: usize = sys::IFNAMSIZ - 1;

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Feature flags of the kernel's TUN driver, from `TUNGETFEATURES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(u32);

impl Features {
    /// The raw `IFF_*` bit set.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether the driver can prepend a `virtio_net_hdr` to frames (`IFF_VNET_HDR`).
    pub fn vnet_hdr(self) -> bool {
        self.0 & sys::IFF_VNET_HDR != 0
    }

    /// Whether the driver supports several queues per interface (`IFF_MULTI_QUEUE`).
    pub fn multi_queue(self) -> bool {
        self.0 & sys::IFF_MULTI_QUEUE != 0
    }
}

/// Reads the TUN driver's features from an open `/dev/net/tun` descriptor.
///
/// The descriptor must not yet be attached to an interface for the answer
/// to be useful before `TUNSETIFF`; the kernel answers either way.
pub fn features_of(fd: BorrowedFd<'_>) -> Result<Features> {
    sys::tun_get_features(fd.as_raw_fd())
        .map(Features)
        .map_err(|source| Error::Io {
            op: "TUNGETFEATURES",
            name: TUN_DEVICE.to_owned(),
            source,
        })
}

/// Opens `/dev/net/tun` once and reads the driver's features.
pub fn features() -> Result<Features> {
    let fd = open_tun(TUN_DEVICE)?;
    features_of(fd.as_fd())
}

/// Whether a new TAP interface would get `IFF_VNET_HDR`: true when
/// `TUNGETFEATURES` works and reports it, false on any failure.
pub fn probe_vnet_hdr() -> bool {
    features().map(Features::vnet_hdr).unwrap_or(false)
}

/// What to do about `IFF_VNET_HDR` on a new interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VnetHdr {
    /// Enable it when the kernel supports it.
    #[default]
    Auto,
    /// Enable it; fail with [`Error::VnetHdrUnsupported`] when the kernel lacks it.
    Required,
    /// Never enable it.
    Off,
}

#[derive(Debug, Clone)]
enum Naming {
    Template(String),
    Exact(String),
}

/// Configures and opens a TAP interface.
#[derive(Debug, Clone)]
pub struct TapBuilder {
    naming: Naming,
    vnet_hdr: VnetHdr,
    queues: u16,
    tun_path: String,
}

impl Default for TapBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TapBuilder {
    /// A single-queue TAP with a kernel-chosen `tap%d` name and automatic vnet_hdr.
    pub fn new() -> Self {
        TapBuilder {
            naming: Naming::Template("tap%d".to_owned()),
            vnet_hdr: VnetHdr::Auto,
            queues: 1,
            tun_path: TUN_DEVICE.to_owned(),
        }
    }

    /// Let the kernel pick the name from a template with one `%d`, like `gkvm%d`.
    pub fn name_template(mut self, template: impl Into<String>) -> Self {
        self.naming = Naming::Template(template.into());
        self
    }

    /// Use exactly this interface name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.naming = Naming::Exact(name.into());
        self
    }

    /// Choose the vnet_hdr policy.
    pub fn vnet_hdr(mut self, policy: VnetHdr) -> Self {
        self.vnet_hdr = policy;
        self
    }

    /// Number of queues; more than one makes a multiqueue interface with one
    /// descriptor per queue. Zero is treated as one.
    pub fn queues(mut self, queues: u16) -> Self {
        self.queues = queues.max(1);
        self
    }

    /// Use another TUN character device than `/dev/net/tun` (for tests and
    /// unusual hosts).
    pub fn tun_device(mut self, path: impl Into<String>) -> Self {
        self.tun_path = path.into();
        self
    }

    /// Creates the interface and returns it with its queue descriptors.
    pub fn open(&self) -> Result<Tap> {
        let requested = match &self.naming {
            Naming::Template(t) => {
                validate_name(t, true)?;
                t.clone()
            }
            Naming::Exact(n) => {
                validate_name(n, false)?;
                n.clone()
            }
        };

        let first = open_tun(&self.tun_path)?;
        let features = features_of(first.as_fd())?;

        let mut flags = sys::IFF_TAP | sys::IFF_NO_PI;
        let vnet_hdr = match self.vnet_hdr {
            VnetHdr::Off => false,
            VnetHdr::Auto => features.vnet_hdr(),
            VnetHdr::Required if features.vnet_hdr() => true,
            VnetHdr::Required => return Err(Error::VnetHdrUnsupported { name: requested }),
        };
        if vnet_hdr {
            flags |= sys::IFF_VNET_HDR;
        }
        if self.queues > 1 {
            if !features.multi_queue() {
                return Err(Error::MultiqueueUnsupported { name: requested });
            }
            flags |= sys::IFF_MULTI_QUEUE;
        }

        let name = set_iff(&first, &requested, flags)?;
        let mut fds = Vec::with_capacity(usize::from(self.queues));
        fds.push(first);
        for _ in 1..self.queues {
            let fd = open_tun(&self.tun_path)?;
            set_iff(&fd, &name, flags)?;
            fds.push(fd);
        }
        Ok(Tap {
            name,
            fds,
            vnet_hdr,
        })
    }
}

fn open_tun(path: &str) -> Result<OwnedFd> {
    // std opens with O_CLOEXEC.
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => Ok(f.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::TunMissing {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(Error::PermissionDenied {
                name: path.to_owned(),
            })
        }
        Err(source) => Err(Error::Io {
            op: "open",
            name: path.to_owned(),
            source,
        }),
    }
}

fn set_iff(fd: &OwnedFd, name: &str, flags: u32) -> Result<String> {
    match sys::tun_set_iff(fd.as_raw_fd(), name, flags) {
        Ok(real) => Ok(real),
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
                name: name.to_owned(),
            },
            Some(libc::EBUSY) | Some(libc::EEXIST) => Error::NameInUse {
                name: name.to_owned(),
            },
            // An existing interface that is not a TAP makes TUNSETIFF fail with EINVAL.
            Some(libc::EINVAL) if sys::if_index(name).is_ok() => Error::NameInUse {
                name: name.to_owned(),
            },
            _ => Error::Io {
                op: "TUNSETIFF",
                name: name.to_owned(),
                source: e,
            },
        }),
    }
}

/// Checks an interface name (or a template with `%d`) the way the kernel
/// will, without touching the kernel.
pub fn validate_name(name: &str, template: bool) -> Result<()> {
    let bad = |reason: &'static str| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 15 bytes (IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return bad("contains '/', ':', whitespace or a control character");
    }
    if !name.is_ascii() {
        return bad("contains non-ASCII characters");
    }
    let percents = name.matches('%').count();
    if template {
        if percents != 1 || !name.contains("%d") {
            return bad("a template needs exactly one %d");
        }
    } else if percents != 0 {
        return bad("contains '%' (use a template for kernel-chosen names)");
    }
    Ok(())
}

/// An open TAP interface: its name and one descriptor per queue.
///
/// Dropping it closes the descriptors, which removes the interface (TAPs
/// created here are never persistent).
#[derive(Debug)]
pub struct Tap {
    name: String,
    fds: Vec<OwnedFd>,
    vnet_hdr: bool,
}

impl Tap {
    /// The interface name the kernel assigned.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue descriptors, one per queue.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// Gives up the interface's descriptors; it lives as long as they do.
    pub fn into_fds(self) -> Vec<OwnedFd> {
        self.fds
    }

    /// Whether `IFF_VNET_HDR` was requested for this interface.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// The interface flags as the kernel reports them (`TUNGETIFF`).
    pub fn kernel_flags(&self) -> Result<u32> {
        sys::tun_get_iff(self.fds[0].as_raw_fd()).map_err(|source| Error::Io {
            op: "TUNGETIFF",
            name: self.name.clone(),
            source,
        })
    }

    /// The kernel's interface index.
    pub fn index(&self) -> Result<u32> {
        interface_index(&self.name)
    }

    /// Brings the link up (`SIOCSIFFLAGS` with `IFF_UP`).
    pub fn set_up(&self) -> Result<()> {
        set_link_up(&self.name)
    }

    /// Adds the interface to a Linux bridge (`SIOCBRADDIF`).
    pub fn attach_to_bridge(&self, bridge: &str) -> Result<()> {
        bridge_add_interface(bridge, &self.name)
    }

    /// Removes the interface from a Linux bridge (`SIOCBRDELIF`).
    pub fn detach_from_bridge(&self, bridge: &str) -> Result<()> {
        bridge_remove_interface(bridge, &self.name)
    }

    /// Makes every queue descriptor available to a child spawned from `cmd`
    /// under its current number, and returns those numbers (for QEMU's
    /// `fd=` / `fds=` options). Close-on-exec stays set in this process.
    pub fn pass_to_child(&self, cmd: &mut std::process::Command) -> Vec<RawFd> {
        self.fds
            .iter()
            .map(|fd| pass_fd_to_child(cmd, fd.as_fd()))
            .collect()
    }
}

/// The kernel's index of interface `name`.
pub fn interface_index(name: &str) -> Result<u32> {
    validate_name(name, false)?;
    sys::if_index(name).map_err(|_| Error::InterfaceNotFound {
        name: name.to_owned(),
    })
}

/// Brings interface `name` up.
pub fn set_link_up(name: &str) -> Result<()> {
    validate_name(name, false)?;
    sys::set_up(name).map_err(|e| match e.raw_os_error() {
        Some(libc::ENODEV) => Error::InterfaceNotFound {
            name: name.to_owned(),
        },
        Some(libc::EPERM) => Error::PermissionDenied {
            name: name.to_owned(),
        },
        _ => Error::Io {
            op: "SIOCSIFFLAGS",
            name: name.to_owned(),
            source: e,
        },
    })
}

/// Adds interface `name` to `bridge`.
pub fn bridge_add_interface(bridge: &str, name: &str) -> Result<()> {
    bridge_op(bridge, name, true)
}

/// Removes interface `name` from `bridge`.
pub fn bridge_remove_interface(bridge: &str, name: &str) -> Result<()> {
    bridge_op(bridge, name, false)
}

fn bridge_op(bridge: &str, name: &str, add: bool) -> Result<()> {
    validate_name(bridge, false)?;
    let index = interface_index(name)?;
    let op = if add { "SIOCBRADDIF" } else { "SIOCBRDELIF" };
    sys::bridge_ctl(bridge, index, add).map_err(|e| match e.raw_os_error() {
        Some(libc::ENODEV) => Error::BridgeNotFound {
            bridge: bridge.to_owned(),
            name: name.to_owned(),
        },
        Some(libc::EOPNOTSUPP) => Error::NotABridge {
            bridge: bridge.to_owned(),
            name: name.to_owned(),
        },
        Some(libc::EPERM) => Error::PermissionDenied {
            name: name.to_owned(),
        },
        _ => Error::Io {
            op,
            name: format!("{name} on bridge {bridge}"),
            source: e,
        },
    })
}

/// Whether an interface of this name exists (looks in `/sys/class/net`).
pub fn interface_exists(name: &str) -> bool {
    validate_name(name, false).is_ok() && Path::new("/sys/class/net").join(name).exists()
}

/// The `IFF_VNET_HDR` bit, for reading [`Tap::kernel_flags`].
pub const IFF_VNET_HDR: u32 = sys::IFF_VNET_HDR;
/// The `IFF_MULTI_QUEUE` bit, for reading [`Tap::kernel_flags`].
pub const IFF_MULTI_QUEUE: u32 = sys::IFF_MULTI_QUEUE;
/// The `IFF_TAP` bit, for reading [`Tap::kernel_flags`].
pub const IFF_TAP: u32 = sys::IFF_TAP;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
