//! A node's on-disk state for QEMU/KVM instances.
//!
//! A hypervisor manager must never lie about what runs on its node, even
//! after a crash, a power cut or two commands racing. This crate owns every
//! file kept about instances under one run directory, with the layout of
//! Ganeti's KVM driver (`pid/`, `uid/`, `ctrl/`, `conf/`, `nic/`,
//! `keymap/`, `chroot/`, `chroot-quarantine/`), so instances started by
//! Ganeti can be adopted:
//!
//! - names are checked once ([`validate_name`]) before any path is built;
//! - files are replaced atomically (temp file, fsync, rename, fsync dir),
//!   mode 0600, never through a planted symlink;
//! - liveness comes from `/proc`, not from the pid file alone, and a zombie
//!   counts as dead;
//! - flock-based locks keep operations on one instance (and allocations on
//!   the node) from interleaving;
//! - the uid pool hands each instance its own uid;
//! - cleanup is idempotent and quarantines a non-empty chroot.
//!
//! ```
//! use kvm_runtime::{RunDir, RuntimeRecord};
//! # fn main() -> Result<(), kvm_runtime::Error> {
//! # let tmp = std::env::temp_dir().join(format!("kvm-runtime-doc-{}", std::process::id()));
//! let run = RunDir::new(&tmp);
//! run.ensure()?;
//! let web1 = run.instance("web1")?;
//! let _lock = web1.lock(std::time::Duration::from_secs(5))?;
//! web1.write_runtime(&RuntimeRecord {
//!     argv: vec!["qemu-system-x86_64".into(), "-name".into(), "web1".into()],
//!     ..Default::default()
//! })?;
//! assert_eq!(web1.read_runtime()?.unwrap().argv[2], "web1");
//! web1.cleanup()?;
//! # std::fs::remove_dir_all(&tmp).ok();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod cgroup;
mod error;
pub mod fsutil;
mod helper;
mod layout;
mod live;
mod lock;
mod memo;
mod name;
mod pidfd;
mod record;
mod uid;

pub use error::{human_duration, Error};
pub use layout::{CleanupReport, InstancePaths, RunDir, DEFAULT_ROOT, GANETI_ROOT};
pub use live::{
    is_zombie_or_gone, proc_stat, process_runs_instance, thread_stats, Liveness, ProcStat,
};
pub use lock::{InstanceLock, LockGuard};
pub use name::{validate_name, MAX_NAME_LEN};
pub use pidfd::{kill_and_wait_pidfd, pidfd_open, wait_pidfd};
pub use record::{Origin, RuntimeRecord, FORMAT_VERSION};
pub use uid::{read_uid, UidPool};

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
