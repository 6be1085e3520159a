//! Typed QMP commands: one serde struct per command, its arguments as
//! fields and its reply as [`Command::Output`]. Booleans are booleans and
//! numbers are numbers, so QEMU never sees `"on"` where it wants `true`.
//!
//! Anything not here goes through `execute_raw` on either client.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::codec::{VersionInfo, VersionTriple};

/// A QMP command with typed arguments and reply.
pub trait Command: Serialize {
    /// The QMP command name.
    const NAME: &'static str;
    /// The decoded `return` value.
    type Output: DeserializeOwned;
}

/// Decodes a `return` value into a command's output. QEMU answers `{}` for
/// commands without a result; that decodes into `()` as well as into
/// structs whose fields are all optional.
pub(crate) fn decode_output<C: Command>(value: Value) -> Result<C::Output, crate::Error> {
    match serde_json::from_value::<C::Output>(value.clone()) {
        Ok(v) => Ok(v),
        Err(first) => match value {
            Value::Object(m) if m.is_empty() => {
                serde_json::from_value(Value::Null).map_err(|_| crate::Error::Decode {
                    command: C::NAME.to_owned(),
                    source: first,
                })
            }
            _ => Err(crate::Error::Decode {
                command: C::NAME.to_owned(),
                source: first,
            }),
        },
    }
}

macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Output = ();
        }
    };
}

unit_command!(
    /// `system_powerdown`: press the ACPI power button.
    SystemPowerdown,
    "system_powerdown"
);
unit_command!(
    /// `system_reset`: reset the machine.
    SystemReset,
    "system_reset"
);
unit_command!(
    /// `quit`: make QEMU exit at once.
    Quit,
    "quit"
);
unit_command!(
    /// `stop`: pause the vCPUs.
    Stop,
    "stop"
);
unit_command!(
    /// `cont`: resume the vCPUs.
    Cont,
    "cont"
);
unit_command!(
    /// `migrate_cancel`: cancel the outgoing migration.
    MigrateCancel,
    "migrate_cancel"
);

/// `query-status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus;
impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Output = StatusInfo;
}

/// The VM's run state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The detailed state.
    pub status: RunState,
}

/// QEMU's `RunState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this crate does not know yet.
    #[serde(other)]
    Unknown,
}

/// `query-version`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryVersion;
impl Command for QueryVersion {
    const NAME: &'static str = "query-version";
    type Output = VersionInfo;
}

/// `query-cpus-fast`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryCpusFast;
impl Command for QueryCpusFast {
    const NAME: &'static str = "query-cpus-fast";
    type Output = Vec<CpuInfoFast>;
}

/// One vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    /// The vCPU's index.
    pub cpu_index: u32,
    /// Its QOM path.
    pub qom_path: String,
    /// The host thread that runs it.
    pub thread_id: i64,
}

/// `query-balloon`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBalloon;
impl Command for QueryBalloon {
    const NAME: &'static str = "query-balloon";
    type Output = BalloonInfo;
}

/// `query-blockstats`: the I/O counters of every block device.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockstats;
impl Command for QueryBlockstats {
    const NAME: &'static str = "query-blockstats";
    type Output = Vec<BlockStats>;
}

/// One block device's counters (`query-blockstats`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
pub struct BlockStats {
    /// The legacy drive name (empty for `-blockdev` devices).
    #[serde(default)]
    pub device: String,
    /// The block node's name, when it has one.
    #[serde(default, rename = "node-name")]
    pub node_name: Option<String>,
    /// The guest device's QOM path or id (`/machine/peripheral/ID/...`).
    #[serde(default)]
    pub qdev: Option<String>,
    /// The counters.
    pub stats: BlockDeviceStats,
}

/// Block I/O counters since the device was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BlockDeviceStats {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Read requests.
    pub rd_operations: u64,
    /// Write requests.
    pub wr_operations: u64,
    /// Flush requests.
    pub flush_operations: u64,
    /// Time spent on reads, in nanoseconds.
    pub rd_total_time_ns: u64,
    /// Time spent on writes, in nanoseconds.
    pub wr_total_time_ns: u64,
}

/// The balloon's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct BalloonInfo {
    /// Memory the guest has, in bytes.
    pub actual: u64,
}

/// `balloon`: ask the guest to have `value` bytes of memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Balloon {
    /// Target guest memory in bytes.
    pub value: u64,
}
impl Command for Balloon {
    const NAME: &'static str = "balloon";
    type Output = ();
}

/// `query-kvm`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryKvm;
impl Command for QueryKvm {
    const NAME: &'static str = "query-kvm";
    type Output = KvmInfo;
}

/// Whether KVM is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct KvmInfo {
    /// KVM acceleration is active.
    pub enabled: bool,
    /// KVM is available.
    pub present: bool,
}

/// `query-machines`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMachines;
impl Command for QueryMachines {
    const NAME: &'static str = "query-machines";
    type Output = Vec<MachineInfo>;
}

/// One machine type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    /// The concrete name, e.g. `pc-i440fx-7.2`.
    pub name: String,
    /// Its alias, e.g. `pc`.
    #[serde(default)]
    pub alias: Option<String>,
    /// Whether it is the default machine.
    #[serde(default)]
    pub is_default: bool,
    /// Maximum vCPUs.
    #[serde(default)]
    pub cpu_max: u32,
    /// Whether it is deprecated.
    #[serde(default)]
    pub deprecated: bool,
}

/// `query-commands`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryCommands;
impl Command for QueryCommands {
    const NAME: &'static str = "query-commands";
    type Output = Vec<CommandInfo>;
}

/// One supported QMP command.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CommandInfo {
    /// Its name.
    pub name: String,
}

/// `query-command-line-options`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryCommandLineOptions {
    /// Only this option (e.g. `machine`), or all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub option: Option<String>,
}
impl Command for QueryCommandLineOptions {
    const NAME: &'static str = "query-command-line-options";
    type Output = Vec<CommandLineOptionInfo>;
}

/// One command-line option and its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CommandLineOptionInfo {
    /// The option name without the dash.
    pub option: String,
    /// Its parameters.
    #[serde(default)]
    pub parameters: Vec<CommandLineParameterInfo>,
}

/// One parameter of a command-line option.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CommandLineParameterInfo {
    /// Its name.
    pub name: String,
    /// Its type (`string`, `boolean`, `number`, `size`).
    #[serde(rename = "type")]
    pub kind: String,
}

/// `qom-list-types`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QomListTypes {
    /// Only types implementing this one (e.g. `device`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub implements: Option<String>,
    /// Include abstract types.
    #[serde(rename = "abstract", skip_serializing_if = "Option::is_none")]
    pub include_abstract: Option<bool>,
}
impl Command for QomListTypes {
    const NAME: &'static str = "qom-list-types";
    type Output = Vec<ObjectTypeInfo>;
}

/// One QOM type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ObjectTypeInfo {
    /// The type name, e.g. `virtio-net-pci`.
    pub name: String,
    /// Its parent type.
    #[serde(default)]
    pub parent: Option<String>,
}

/// `migrate`: start an outgoing migration.
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    /// Where to, e.g. `tcp:10.0.0.2:8102`.
    pub uri: String,
}
impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Output = ();
}

/// `migrate-incoming`: listen for an incoming migration (QEMU started with `-incoming defer`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    /// Where to listen, e.g. `tcp:10.0.0.2:8102`.
    pub uri: String,
}
impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Output = ();
}

/// `migrate-set-parameters`; unset fields are left as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Maximum downtime in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub downtime_limit: Option<u64>,
    /// Maximum bandwidth in bytes per second.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_bandwidth: Option<u64>,
    /// The id of a `tls-creds-*` object: migrate over TLS ("" for none).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls_creds: Option<String>,
    /// The name the destination's certificate must carry.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tls_hostname: Option<String>,
    /// Bandwidth limit once in postcopy, bytes per second (0: none).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Parallel channels with the `multifd` capability (both sides).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub multifd_channels: Option<u64>,
}
impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Output = ();
}

/// `query-migrate-parameters`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrateParameters;
impl Command for QueryMigrateParameters {
    const NAME: &'static str = "query-migrate-parameters";
    type Output = MigrateSetParameters;
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to change.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}
impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Output = ();
}

/// `query-migrate-capabilities`: every capability this QEMU has.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrateCapabilities;
impl Command for QueryMigrateCapabilities {
    const NAME: &'static str = "query-migrate-capabilities";
    type Output = Vec<MigrationCapabilityStatus>;
}

/// `migrate-start-postcopy`: switch a running migration (with the
/// `postcopy-ram` capability on) to postcopy.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigrateStartPostcopy;
impl Command for MigrateStartPostcopy {
    const NAME: &'static str = "migrate-start-postcopy";
    type Output = ();
}

/// One migration capability and whether it is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// Its name, e.g. `events`, `xbzrle`.
    pub capability: String,
    /// On or off.
    pub state: bool,
}

/// `query-migrate`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate;
impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Output = MigrationInfo;
}

/// The migration's state and figures (all absent before any migration).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// RAM transfer figures.
    #[serde(default)]
    pub ram: Option<MigrationStats>,
    /// Milliseconds since the migration started (or its total when done).
    #[serde(default)]
    pub total_time: Option<u64>,
    /// Downtime in milliseconds, once completed.
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Expected downtime in milliseconds, while active.
    #[serde(default)]
    pub expected_downtime: Option<u64>,
    /// Setup time in milliseconds.
    #[serde(default)]
    pub setup_time: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error_desc: Option<String>,
}

/// RAM transfer figures of a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes left to send.
    pub remaining: u64,
    /// Guest RAM in bytes.
    pub total: u64,
    /// Transfer rate in megabits per second.
    #[serde(default)]
    pub mbps: f64,
    /// Passes over guest memory so far (precopy iterations).
    #[serde(default)]
    pub dirty_sync_count: u64,
}

/// `set_password` for VNC or SPICE.
#[derive(Clone, Serialize)]
pub struct SetPassword {
    /// `vnc` or `spice`.
    pub protocol: String,
    /// The password (never logged: this type's `Debug` hides it).
    pub password: String,
}
impl std::fmt::Debug for SetPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetPassword")
            .field("protocol", &self.protocol)
            .field("password", &"<hidden>")
            .finish()
    }
}
impl Command for SetPassword {
    const NAME: &'static str = "set_password";
    type Output = ();
}

/// `expire_password`.
#[derive(Debug, Clone, Serialize)]
pub struct ExpirePassword {
    /// `vnc` or `spice`.
    pub protocol: String,
    /// `now`, `never`, `+SECONDS` or an absolute time.
    pub time: String,
}
impl Command for ExpirePassword {
    const NAME: &'static str = "expire_password";
    type Output = ();
}

/// `netdev_add`: a backend with typed properties (`type` and `id` plus the rest).
#[derive(Debug, Clone, Serialize)]
pub struct NetdevAdd {
    /// The backend type, e.g. `tap`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its id.
    pub id: String,
    /// Other properties, with JSON types (`"vhost": true`, not `"on"`).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}
impl Command for NetdevAdd {
    const NAME: &'static str = "netdev_add";
    type Output = ();
}

/// `netdev_del`.
#[derive(Debug, Clone, Serialize)]
pub struct NetdevDel {
    /// The backend's id.
    pub id: String,
}
impl Command for NetdevDel {
    const NAME: &'static str = "netdev_del";
    type Output = ();
}

/// `device_add`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceAdd {
    /// The device model, e.g. `virtio-net-pci`.
    pub driver: String,
    /// Its id.
    pub id: String,
    /// Other properties.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}
impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Output = ();
}

/// `device_del`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceDel {
    /// The device's id.
    pub id: String,
}
impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    type Output = ();
}

/// `getfd`: name the descriptor sent with this command (SCM_RIGHTS).
#[derive(Debug, Clone, Serialize)]
pub struct GetFd {
    /// The name to refer to it by, e.g. in `netdev_add ... fd=NAME`.
    pub fdname: String,
}
impl Command for GetFd {
    const NAME: &'static str = "getfd";
    type Output = ();
}

/// `closefd`.
#[derive(Debug, Clone, Serialize)]
pub struct CloseFd {
    /// The name given with `getfd`.
    pub fdname: String,
}
impl Command for CloseFd {
    const NAME: &'static str = "closefd";
    type Output = ();
}

/// `add-fd`: put the descriptor sent with this command into an fd set.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFd {
    /// The set to add to (a new one when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fdset_id: Option<i64>,
    /// A free-form note kept with the descriptor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}
impl Command for AddFd {
    const NAME: &'static str = "add-fd";
    type Output = AddFdInfo;
}

/// Where `add-fd` put the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFdInfo {
    /// The fd set.
    pub fdset_id: i64,
    /// The descriptor's number inside QEMU.
    pub fd: i64,
}

/// `qom-set`.
#[derive(Debug, Clone, Serialize)]
pub struct QomSet {
    /// The object's QOM path.
    pub path: String,
    /// The property.
    pub property: String,
    /// The new value.
    pub value: Value,
}
impl Command for QomSet {
    const NAME: &'static str = "qom-set";
    type Output = ();
}

/// `qom-get`: a property of a QOM object (`type` of
/// `/machine/peripheral/ID` is a device's driver).
#[derive(Debug, Clone, Serialize)]
pub struct QomGet {
    /// The object's QOM path.
    pub path: String,
    /// The property.
    pub property: String,
}
impl Command for QomGet {
    const NAME: &'static str = "qom-get";
    type Output = Value;
}

/// `qom-list`: the properties (children among them) of a QOM object.
#[derive(Debug, Clone, Serialize)]
pub struct QomList {
    /// The object's QOM path, e.g. `/machine/peripheral`.
    pub path: String,
}
impl Command for QomList {
    const NAME: &'static str = "qom-list";
    type Output = Vec<ObjectPropertyInfo>;
}

/// One property of `qom-list`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ObjectPropertyInfo {
    /// Its name (a device's id under `/machine/peripheral`).
    pub name: String,
    /// Its type: `child<virtio-net-pci>` for a child object.
    #[serde(rename = "type")]
    pub kind: String,
}

/// `blockdev-add`: a block node, its options as QEMU's schema has them
/// (`driver`, `node-name`, nested `file`, ...).
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevAdd {
    /// The node's options.
    #[serde(flatten)]
    pub options: Map<String, Value>,
}
impl Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    type Output = ();
}

/// `blockdev-del`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node's name.
    pub node_name: String,
}
impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    type Output = ();
}

/// `block_resize`: grow (or shrink) a block node.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockResize {
    /// The node's name.
    pub node_name: String,
    /// Its new size in bytes.
    pub size: u64,
}
impl Command for BlockResize {
    const NAME: &'static str = "block_resize";
    type Output = ();
}

/// `query-named-block-nodes`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Only the nodes themselves, not their backing chains.
    pub flat: bool,
}
impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    type Output = Vec<BlockNodeInfo>;
}

/// One node of `query-named-block-nodes` (what gkvm reads of it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockNodeInfo {
    /// The node's name.
    pub node_name: String,
    /// Its image.
    pub image: BlockImageInfo,
}

/// The image of a block node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockImageInfo {
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
}

/// `query-fdsets`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryFdsets;
impl Command for QueryFdsets {
    const NAME: &'static str = "query-fdsets";
    type Output = Vec<FdsetInfo>;
}

/// One fd set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FdsetInfo {
    /// The set's id.
    pub fdset_id: i64,
    /// Its descriptors.
    pub fds: Vec<FdsetFdInfo>,
}

/// One descriptor of an fd set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdsetFdInfo {
    /// Its number inside QEMU.
    pub fd: i64,
    /// The note `add-fd` kept with it.
    #[serde(default)]
    pub opaque: Option<String>,
}

/// `remove-fd`: a descriptor of an fd set, or the whole set.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoveFd {
    /// The set.
    pub fdset_id: i64,
    /// One descriptor of it (all when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i64>,
}
impl Command for RemoveFd {
    const NAME: &'static str = "remove-fd";
    type Output = ();
}

/// `set-action` (QEMU 6.0+): what QEMU does on a guest's shutdown, reboot,
/// panic or watchdog, changed while it runs (`-action` on its command
/// line). Members left `None` keep their current action.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SetAction {
    /// On a guest's shutdown: `poweroff` (QEMU exits) or `pause` (QEMU
    /// stays, as `-no-shutdown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<String>,
    /// On a guest's reboot: `reset` or `shutdown` (as `-no-reboot`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot: Option<String>,
    /// On a guest's panic: `pause`, `shutdown`, `exit-failure` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panic: Option<String>,
}
impl Command for SetAction {
    const NAME: &'static str = "set-action";
    type Output = ();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_output_decodes_from_empty_object() {
        decode_output::<Quit>(serde_json::json!({})).unwrap();
        let m = decode_output::<QueryMigrate>(serde_json::json!({})).unwrap();
        assert_eq!(m, MigrationInfo::default());
    }

    #[test]
    fn wrong_shape_is_a_decode_error_naming_the_command() {
        match decode_output::<QueryBalloon>(serde_json::json!({"actual": "x"})) {
            Err(crate::Error::Decode { command, .. }) => assert_eq!(command, "query-balloon"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn netdev_add_keeps_json_types() {
        let mut props = Map::new();
        props.insert("fd".into(), "tapfd0".into());
        props.insert("vhost".into(), false.into());
        let cmd = NetdevAdd {
            kind: "tap".into(),
            id: "n0".into(),
            props,
        };
        let v = serde_json::to_value(&cmd).unwrap();
        assert_eq!(v["vhost"], Value::Bool(false));
        assert_eq!(v["type"], "tap");
    }

    #[test]
    fn set_action_sends_only_what_changes() {
        let cmd = SetAction {
            shutdown: Some("poweroff".into()),
            ..SetAction::default()
        };
        assert_eq!(
            serde_json::to_value(&cmd).unwrap(),
            serde_json::json!({"shutdown": "poweroff"})
        );
    }

    #[test]
    fn password_is_hidden_from_debug() {
        let p = SetPassword {
            protocol: "vnc".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn run_states_decode() {
        let s: StatusInfo = serde_json::from_value(
            serde_json::json!({"running": false, "status": "internal-error"}),
        )
        .unwrap();
        assert_eq!(s.status, RunState::InternalError);
        let s: StatusInfo = serde_json::from_value(
            serde_json::json!({"running": false, "status": "new-state-2030"}),
        )
        .unwrap();
        assert_eq!(s.status, RunState::Unknown);
    }
}
