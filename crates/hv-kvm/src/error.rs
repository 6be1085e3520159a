//! The facade's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// What a hypervisor operation failed with. Every variant names the
/// instance, path or step concerned. A wrapped error is the variant's
/// [`std::error::Error::source`] and is not repeated in its `Display`;
/// [`Error::report`] gives the whole chain as one line for an operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The QEMU binary is not there.
    #[error("QEMU binary {path} not found: install qemu-system-x86 (scripts/install-deps)")]
    QemuMissing {
        /// The path tried.
        path: PathBuf,
    },
    /// Probing QEMU's capabilities failed.
    #[error("probing {path}: {reason}")]
    Probe {
        /// The binary.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Hypervisor parameters not about any instance are invalid here
    /// (`validate_params`); the message names the parameter.
    #[error(transparent)]
    NodeParams(kvm_cmdline::Error),
    /// The instance definition, hvparams or capabilities do not allow a
    /// command line.
    #[error("instance {instance}")]
    Params {
        /// The instance.
        instance: String,
        /// The builder's error.
        #[source]
        source: kvm_cmdline::Error,
    },
    /// The node's state on disk.
    #[error("instance {instance}")]
    Runtime {
        /// The instance.
        instance: String,
        /// The runtime crate's error.
        #[source]
        source: kvm_runtime::Error,
    },
    /// The run directory as a whole (the list of its instances) could not
    /// be read.
    #[error("run directory {}{hint}", path.display())]
    RunDir {
        /// The run directory.
        path: std::path::PathBuf,
        /// What to do about it, when something can be said (" (...)").
        hint: &'static str,
        /// The runtime crate's error.
        #[source]
        source: kvm_runtime::Error,
    },
    /// A QMP exchange failed.
    #[error("instance {instance}: {op}")]
    Qmp {
        /// The instance.
        instance: String,
        /// What was being done.
        op: String,
        /// The QMP error.
        #[source]
        source: gkvm_qmp::Error,
    },
    /// Creating or configuring a TAP failed.
    #[error("instance {instance}: NIC {nic}")]
    Tap {
        /// The instance.
        instance: String,
        /// The NIC index.
        nic: usize,
        /// The TAP error.
        #[source]
        source: gkvm_tap::Error,
    },
    /// The instance is already running.
    #[error("instance {instance} is already running (pid {pid})")]
    AlreadyRunning {
        /// The instance.
        instance: String,
        /// Its QEMU.
        pid: i32,
    },
    /// The instance's migration completed: its guest runs on the
    /// destination and must never run here again.
    #[error("instance {instance} was migrated away (QEMU pid {pid} is in state postmigrate); it must not run here again: `gkvm cleanup {instance}` removes what is left")]
    HandedOver {
        /// The instance.
        instance: String,
        /// The idle source QEMU.
        pid: i32,
    },
    /// A migration info file was refused.
    #[error("migration info for {instance}: {reason}")]
    MigrationInfo {
        /// The instance (or `(unknown)` before the file names one).
        instance: String,
        /// Why it was refused.
        reason: String,
    },
    /// The instance is not running.
    #[error("instance {instance} is not running")]
    NotRunning {
        /// The instance.
        instance: String,
    },
    /// A start failed at one step; everything it had created is gone.
    #[error("instance {instance}: start failed at {step}: {reason}")]
    Start {
        /// The instance.
        instance: String,
        /// The step (e.g. `spawn QEMU`, `NIC script`).
        step: &'static str,
        /// Why.
        reason: String,
    },
    /// What an instance keeps on this node between runs (its UEFI
    /// variable store) could not be changed as asked.
    #[error("instance {instance}: its state on this node: {reason}")]
    State {
        /// The instance.
        instance: String,
        /// Why.
        reason: String,
    },
    /// The instance has no definition on this node.
    #[error("instance {instance} is not defined on this node (gkvm define)")]
    NotDefined {
        /// The instance.
        instance: String,
    },
    /// An instance's definition file could not be read or written.
    #[error("instance {instance}: definition {}: {reason}", path.display())]
    Definition {
        /// The instance.
        instance: String,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A hot plug or unplug failed at one step; what it had done is undone.
    #[error("instance {instance}: hot plug failed at {step}: {reason}")]
    Hotplug {
        /// The instance.
        instance: String,
        /// The step (`getfd`, `netdev_add`, `device_add`, ...).
        step: &'static str,
        /// Why.
        reason: String,
    },
    /// A running instance cannot be handed over to Ganeti's own KVM
    /// driver now ([`crate::KvmHypervisor::release_to_ganeti`]).
    #[error("instance {instance}: not handed over to Ganeti's own KVM driver: {reason}")]
    Release {
        /// The instance.
        instance: String,
        /// Why.
        reason: String,
    },
    /// A save to a file failed; the guest runs on (as it did before).
    #[error("instance {instance}: save failed: {reason}")]
    Save {
        /// The instance.
        instance: String,
        /// Why.
        reason: String,
    },
    /// A saved-instance file was refused (not gkvm's, partial, tampered,
    /// or not this administrator's).
    #[error("saved instance {}: {reason}", path.display())]
    SaveFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A migration failed or was cancelled.
    #[error("instance {instance}: migration {status}: {reason}")]
    Migration {
        /// The instance.
        instance: String,
        /// QEMU's final migration status.
        status: String,
        /// Why.
        reason: String,
    },
    /// An operation did not finish in time.
    #[error("instance {instance}: {op} did not finish within {}", kvm_runtime::human_duration(.after))]
    Timeout {
        /// The instance.
        instance: String,
        /// The operation.
        op: String,
        /// The limit.
        after: Duration,
    },
    /// Anything else the system refused.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One line for a person: an error and its causes joined by `: `. A
/// message that the next one already contains is left out, so the
/// instance is named once ("instance web1 is busy: ...", never "instance
/// web1: instance web1 is busy: ...").
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if parts
            .last()
            .is_some_and(|last| text.contains(last.as_str()))
        {
            parts.pop();
        }
        parts.push(text);
        next = e.source();
    }
    parts.join(": ")
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A stable, machine-readable name of the error's kind (the `kind` of
    /// `gkvm --json` errors): `qemu_missing`, `probe`, `params`, `busy`,
    /// `runtime`, `qmp`, `tap`, `already_running`, `handed_over`,
    /// `migration_info`, `not_running`, `not_defined`, `definition`, `start`, `state`, `hotplug`, `release`, `migration`, `timeout`,
    /// `io`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::QemuMissing { .. } => "qemu_missing",
            Error::Probe { .. } => "probe",
            Error::Params { .. } | Error::NodeParams(_) => "params",
            Error::Runtime {
                source: kvm_runtime::Error::Busy { .. },
                ..
            } => "busy",
            Error::Runtime { .. } | Error::RunDir { .. } => "runtime",
            Error::Qmp { .. } => "qmp",
            Error::Tap { .. } => "tap",
            Error::AlreadyRunning { .. } => "already_running",
            Error::HandedOver { .. } => "handed_over",
            Error::MigrationInfo { .. } => "migration_info",
            Error::NotRunning { .. } => "not_running",
            Error::Start { .. } => "start",
            Error::State { .. } => "state",
            Error::NotDefined { .. } => "not_defined",
            Error::Definition { .. } => "definition",
            Error::Hotplug { .. } => "hotplug",
            Error::Release { .. } => "release",
            Error::Save { .. } => "save",
            Error::SaveFile { .. } => "save_file",
            Error::Migration { .. } => "migration",
            Error::Timeout { .. } => "timeout",
            Error::Io { .. } => "io",
        }
    }

    /// This error and its causes as one line (see [`report`]).
    pub fn report(&self) -> String {
        report(self)
    }

    /// The hypervisor parameter at fault, for a `params` error that names
    /// one (`kvm_path`, `security_domain`, ...).
    pub fn param(&self) -> Option<&str> {
        match self {
            Error::Params { source, .. } | Error::NodeParams(source) => source.key(),
            _ => None,
        }
    }

    /// The instance the error is about, when there is one.
    pub fn instance(&self) -> Option<&str> {
        match self {
            Error::Params { instance, .. }
            | Error::Runtime { instance, .. }
            | Error::Qmp { instance, .. }
            | Error::Tap { instance, .. }
            | Error::AlreadyRunning { instance, .. }
            | Error::HandedOver { instance, .. }
            | Error::MigrationInfo { instance, .. }
            | Error::NotRunning { instance }
            | Error::Start { instance, .. }
            | Error::State { instance, .. }
            | Error::NotDefined { instance }
            | Error::Definition { instance, .. }
            | Error::Hotplug { instance, .. }
            | Error::Release { instance, .. }
            | Error::Save { instance, .. }
            | Error::Migration { instance, .. }
            | Error::Timeout { instance, .. } => {
                Some(instance.as_str()).filter(|i| !i.starts_with('('))
            }
            Error::QemuMissing { .. }
            | Error::Probe { .. }
            | Error::RunDir { .. }
            | Error::Io { .. }
            | Error::SaveFile { .. }
            | Error::NodeParams(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_its_instance_once() {
        let busy = Error::Runtime {
            instance: "web1".into(),
            source: kvm_runtime::Error::Busy {
                instance: "web1".into(),
                waited: Duration::from_millis(1500),
            },
        };
        assert_eq!(
            busy.report(),
            "instance web1 is busy: another operation holds its lock (waited 1.5 s)"
        );
        assert_eq!(busy.to_string(), "instance web1");
        assert_eq!((busy.kind(), busy.instance()), ("busy", Some("web1")));
        let io = Error::Runtime {
            instance: "web1".into(),
            source: kvm_runtime::Error::TooLarge {
                path: "/run/gkvm/conf/web1.runtime".into(),
                max: 10,
            },
        };
        assert!(
            io.report().starts_with("instance web1: /run/gkvm/conf/"),
            "{}",
            io.report()
        );
        let qmp = Error::Qmp {
            instance: "web1".into(),
            op: "cont".into(),
            source: gkvm_qmp::Error::Io {
                context: "write".into(),
                source: std::io::Error::from_raw_os_error(libc::EPIPE),
            },
        };
        assert!(
            qmp.report()
                .starts_with("instance web1: cont: QMP I/O error during write: Broken pipe"),
            "{}",
            qmp.report()
        );
    }
}
