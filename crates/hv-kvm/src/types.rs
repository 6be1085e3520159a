//! What the facade answers (serde types: the JSON cluster software reads).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// An instance this node has a record of: running, or stopped without
/// having been stopped by gkvm (`shutdown` or `crashed`, `pid` 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct InstanceInfo {
    /// Its name.
    pub name: String,
    /// QEMU's pid.
    pub pid: i32,
    /// What it is doing (QMP's run state, or gkvm's view).
    pub state: InstanceState,
    /// Guest memory in MiB (the balloon's actual size when known).
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// CPU time QEMU has used, in seconds.
    pub cpu_time_secs: f64,
    /// Why it is not running, for `shutdown` and `crashed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How the guest ended, as QEMU named it in its event log
    /// (`guest-shutdown`: it powered off; `guest-reset`: it rebooted under
    /// `reboot_behavior=exit`, which ends the instance; `guest-panic`;
    /// `host-qmp-quit`; `host-signal`; ...), for `shutdown` and `crashed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// QEMU's log on this node (from `info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// Whether the guest agent answers `guest-ping` (`info NAME` of an
    /// instance with `use_guest_agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<bool>,
    /// For `shutdown` with `user_shutdown` on: the guest powered itself
    /// off, or a signal on the host ended QEMU — not gkvm's power button
    /// (`stop`). Ganeti's "user down" (its kvmd draws the same line): the
    /// cluster leaves such an instance down instead of calling it an error.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_down: bool,
    /// The host-side helpers it owns (`info NAME`; a swtpm for
    /// `tpm=tpm2`), each with its pid, or none when it has died under the
    /// running instance (the device it serves then fails in the guest
    /// until the instance is stopped and started).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub helpers: Vec<HelperInfo>,
    /// Whether it starts when the node boots, for an instance defined on
    /// this node (`list --all`); absent for one that is not defined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
}

/// A host-side helper process of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct HelperInfo {
    /// What it is (`swtpm`).
    pub kind: String,
    /// Its pid; `None` when it is not running.
    pub pid: Option<i32>,
}

/// The node's resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct NodeInfo {
    /// Total memory in MiB.
    pub memory_total_mib: u64,
    /// Memory available for instances in MiB.
    pub memory_free_mib: u64,
    /// Memory used by the node itself (total - free - instances) in MiB.
    pub memory_dom0_mib: u64,
    /// Online CPUs.
    pub cpu_total: u32,
    /// Physical sockets.
    pub cpu_sockets: u32,
    /// NUMA nodes.
    pub cpu_nodes: u32,
    /// QEMU version (major, minor, micro) of the default binary.
    pub hv_version: Option<(u32, u32, u32)>,
}

/// How to reach an instance's console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[non_exhaustive]
pub enum ConsoleInfo {
    /// The serial console on a Unix socket.
    Serial {
        /// The instance.
        instance: String,
        /// The socket.
        socket: PathBuf,
        /// A command that attaches a terminal to it.
        command: Vec<String>,
    },
    /// VNC.
    Vnc {
        /// The instance.
        instance: String,
        /// Address (or Unix socket directory).
        host: String,
        /// TCP port.
        port: u16,
        /// VNC display (port - 5900).
        display: u16,
    },
    /// SPICE.
    Spice {
        /// The instance.
        instance: String,
        /// Address or interface.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// No console.
    Message {
        /// The instance.
        instance: String,
        /// Why not.
        message: String,
    },
}

/// Problems `verify` found; empty means healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct VerifyReport {
    /// One line per problem.
    pub problems: Vec<String>,
    /// Parameter values that work but are rarely wanted (Ganeti 3.1's
    /// `AssessParameters`), when parameters were given to assess.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The problems (also in `problems`) of the hypervisor parameters given
    /// to check, by parameter: what a caller acts on (Ganeti's
    /// `ValidateParameters` refuses exactly these), the node's own problems
    /// aside.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_params: Vec<ParamProblem>,
}

/// A hypervisor parameter that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct ParamProblem {
    /// The parameter (`kvm_path`), or `-` when the error names none.
    pub key: String,
    /// Why, in one line.
    pub message: String,
}

impl ParamProblem {
    /// A problem of `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> ParamProblem {
        ParamProblem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl VerifyReport {
    /// A report of these problems.
    pub fn with_problems(problems: Vec<String>) -> VerifyReport {
        VerifyReport {
            problems,
            warnings: Vec::new(),
            invalid_params: Vec::new(),
        }
    }

    /// Adds a problem of the parameters given to check.
    pub fn add_param_problem(&mut self, key: Option<&str>, message: String) {
        self.problems.push(message.clone());
        self.invalid_params
            .push(ParamProblem::new(key.unwrap_or("-"), message));
    }
}

/// What a successful start did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct StartReport {
    /// The instance.
    pub name: String,
    /// QEMU's pid.
    pub pid: i32,
    /// The TAP interface of each NIC.
    pub taps: Vec<String>,
    /// The concrete machine type.
    pub machine: String,
    /// Whether it was left paused.
    pub paused: bool,
}

/// What a running instance is doing: QEMU's run state (`prelaunch` shown
/// as paused), or gkvm's own view of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum InstanceState {
    /// The guest runs.
    Running,
    /// The vCPUs are stopped (by `--paused`, a resume pending, or QMP `stop`).
    Paused,
    /// A start in progress, or one whose gkvm was killed: the guest never ran.
    Starting,
    /// Waiting for an incoming migration: no guest yet.
    Incoming,
    /// In the last stage of an outgoing migration.
    Migrating,
    /// Handed over to the destination: never runs here again.
    Migrated,
    /// The guest shut down: QEMU kept running (`user_shutdown`), or it
    /// exited cleanly (`pid` 0; the guest powered off, or QEMU was told to
    /// quit). `cleanup` (or `stop`) clears it.
    Shutdown,
    /// QEMU died without shutting down (`pid` 0): killed, or crashed; the
    /// reason says what its log last said. `cleanup` (or `stop`) clears it.
    Crashed,
    /// The guest is suspended (ACPI S3).
    Suspended,
    /// QEMU hit an internal error.
    InternalError,
    /// Stopped on an I/O error.
    IoError,
    /// The guest panicked.
    GuestPanicked,
    /// Stopped by the watchdog.
    Watchdog,
    /// Stopped for a debugger.
    Debug,
    /// Defined on this node and not running (`list --all`).
    ShutOff,
    /// Restoring a snapshot.
    RestoreVm,
    /// Saving a snapshot.
    SaveVm,
    /// COLO fault tolerance.
    Colo,
    /// QMP did not answer in time.
    Unknown,
}

impl From<gkvm_qmp::commands::RunState> for InstanceState {
    fn from(s: gkvm_qmp::commands::RunState) -> InstanceState {
        use gkvm_qmp::commands::RunState as R;
        match s {
            R::Running => InstanceState::Running,
            // Started with -S and never run yet: paused, to a user.
            R::Paused | R::Prelaunch => InstanceState::Paused,
            R::Inmigrate => InstanceState::Incoming,
            R::FinishMigrate => InstanceState::Migrating,
            R::Postmigrate => InstanceState::Migrated,
            R::Shutdown => InstanceState::Shutdown,
            R::Suspended => InstanceState::Suspended,
            R::InternalError => InstanceState::InternalError,
            R::IoError => InstanceState::IoError,
            R::GuestPanicked => InstanceState::GuestPanicked,
            R::Watchdog => InstanceState::Watchdog,
            R::Debug => InstanceState::Debug,
            R::RestoreVm => InstanceState::RestoreVm,
            R::SaveVm => InstanceState::SaveVm,
            R::Colo => InstanceState::Colo,
            _ => InstanceState::Unknown,
        }
    }
}

/// Where a migration stands, as QEMU's `query-migrate` says.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigrationState {
    /// No migration.
    #[default]
    None,
    /// Setting up.
    Setup,
    /// Copying.
    Active,
    /// Copying after the switch-over (post-copy).
    PostcopyActive,
    /// Post-copy, paused on a network failure.
    PostcopyPaused,
    /// Post-copy recovering.
    PostcopyRecover,
    /// Waiting before the switch-over.
    PreSwitchover,
    /// Copying device state.
    Device,
    /// Waiting for devices to unplug.
    WaitUnplug,
    /// Done: the guest runs on the destination.
    Completed,
    /// Failed: the source keeps the guest.
    Failed,
    /// Being cancelled.
    Cancelling,
    /// Cancelled: the source keeps the guest.
    Cancelled,
    /// COLO fault tolerance.
    Colo,
    /// A state this build does not know.
    #[serde(other)]
    Unknown,
}

impl MigrationState {
    /// Parses QEMU's name of a state (`unknown` for a new one).
    pub fn parse(name: &str) -> MigrationState {
        serde_json::from_value(serde_json::Value::String(name.to_owned()))
            .unwrap_or(MigrationState::Unknown)
    }

    /// Whether the migration has ended, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

/// The serde name of a unit variant, for `Display`.
fn serde_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_name(self))
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_name(self))
    }
}

/// What a node power-cycle does, step by step (Ganeti 3.1's fencing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct PowercyclePlan {
    /// The steps, in order.
    pub steps: Vec<String>,
    /// Whether nothing was done.
    pub dry_run: bool,
}
