//! The facade's operation surface, declared once: every operation on a
//! node as a typed [`Request`], every answer as a [`Response`], handled by
//! [`KvmHypervisor::handle`] (firecracker's `VmmAction`, cloud-hypervisor's
//! `RequestHandler`). The typed methods (`start`, `stop`, `migrate_to`,
//! ...) are the same operations called directly; cluster software and the
//! CLI may use either.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::{
    Capabilities, ConsoleInfo, InstanceInfo, InstanceSpec, KvmHypervisor, LaunchPlan,
    MigrationStatus, NodeInfo, StartReport, StopOutcome, VerifyReport,
};

/// Whether a started guest runs at once.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Resume the vCPUs once configured.
    #[default]
    Running,
    /// Leave the vCPUs stopped (resume later).
    Paused,
}

/// How to stop an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StopMode {
    /// Press the ACPI power button and wait up to `timeout` for the guest
    /// to power off (an instance without ACPI is killed); a zero timeout
    /// presses it and returns ([`crate::StopOutcome::PowerButtonPressed`]),
    /// for callers that poll and force later, as Ganeti does.
    Acpi {
        /// How long the guest may take.
        #[serde(rename = "timeout_secs", with = "secs")]
        #[schemars(with = "f64")]
        timeout: Duration,
    },
    /// Kill QEMU, preempting any operation that holds the instance.
    Force,
}

/// How to move the guest's memory.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    /// Copy while the guest runs; it pauses only for the last round.
    #[default]
    Live,
    /// Pause the guest for the whole transfer.
    Offline,
}

impl MigrationMode {
    /// From the `migration_mode` hvparam.
    pub fn from_hvparam(mode: kvm_cmdline::hvparams::MigrationMode) -> MigrationMode {
        match mode {
            kvm_cmdline::hvparams::MigrationMode::Live => MigrationMode::Live,
            kvm_cmdline::hvparams::MigrationMode::NonLive => MigrationMode::Offline,
        }
    }
}

/// How a migration ended, as the side finalizing it learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationOutcome {
    /// The guest landed on the destination.
    Completed,
    /// It did not: the source keeps (or gets back) the guest.
    Failed,
}

/// A migration progress callback.
pub type Progress<'a> = &'a mut (dyn FnMut(&MigrationStatus) + Send);

/// One operation on this node. As JSON (the API of `gkvm api` and `gkvm
/// serve`, schema in `schemas/v1/api.json`): an object whose `op` names
/// the operation in snake case, with the variant's fields beside it, e.g.
/// `{"op": "stop", "instance": "web1", "mode": {"kind": "force"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// Start an instance ([`KvmHypervisor::start`]).
    Start {
        /// The instance definition.
        spec: InstanceSpec,
        /// Running or paused.
        mode: StartMode,
    },
    /// Stop an instance ([`KvmHypervisor::stop`]).
    Stop {
        /// The instance.
        instance: String,
        /// ACPI or force.
        mode: StopMode,
    },
    /// Reboot an instance ([`KvmHypervisor::reboot`]).
    Reboot {
        /// The instance.
        instance: String,
        /// The cluster's configuration now: a restart takes the
        /// parameters that may change between starts from it
        /// ([`kvm_cmdline::RESTART_SAFE_HVPARAMS`]).
        config: Option<crate::HvParams>,
    },
    /// Resume a paused instance ([`KvmHypervisor::resume`]).
    Resume {
        /// The instance.
        instance: String,
    },
    /// Set the balloon target ([`KvmHypervisor::balloon`]).
    Balloon {
        /// The instance.
        instance: String,
        /// Target memory in MiB.
        mib: u64,
    },
    /// Plug a NIC into a running instance ([`KvmHypervisor::nic_add`]).
    NicAdd {
        /// The instance.
        instance: String,
        /// The NIC (placed by gkvm).
        nic: kvm_cmdline::NicSpec,
    },
    /// Change a NIC's mode, link, IP or VLAN ([`KvmHypervisor::nic_modify`]).
    NicModify {
        /// The instance.
        instance: String,
        /// The NIC's device id (or index).
        id: String,
        /// The new settings. A MAC other than the NIC's replugs it (the
        /// guest sees a new device), unless `keep_mac`.
        nic: kvm_cmdline::NicSpec,
        /// Keep the NIC's own MAC, whatever `nic` says.
        keep_mac: bool,
    },
    /// Unplug a NIC ([`KvmHypervisor::nic_remove`]).
    NicRemove {
        /// The instance.
        instance: String,
        /// The NIC's device id (or index).
        id: String,
    },
    /// Plug a disk into a running instance ([`KvmHypervisor::disk_add`]).
    DiskAdd {
        /// The instance.
        instance: String,
        /// The disk (placed by gkvm).
        disk: kvm_cmdline::DiskSpec,
    },
    /// Unplug a disk ([`KvmHypervisor::disk_remove`]).
    DiskRemove {
        /// The instance.
        instance: String,
        /// The disk's device id (or index).
        id: String,
    },
    /// Grow a disk ([`KvmHypervisor::disk_grow`]).
    DiskGrow {
        /// The instance.
        instance: String,
        /// The disk's device id (or index).
        id: String,
        /// Its new size in bytes.
        bytes: u64,
    },
    /// Change a running instance's cgroup limits (`cgroup_*` hvparams),
    /// live ([`KvmHypervisor::set_limits`]).
    SetLimits {
        /// The instance.
        instance: String,
        /// The limits to change, by hvparam (0 lifts one).
        limits: std::collections::BTreeMap<String, serde_json::Value>,
    },
    /// Set the limits of a throttle group of a running instance, live
    /// ([`KvmHypervisor::set_io_limits`]).
    SetIoLimits {
        /// The instance.
        instance: String,
        /// The group (a key of the instance's `io_limits`).
        group: String,
        /// Its limits (unset ones are lifted).
        limits: kvm_cmdline::IoLimits,
    },
    /// Whether devices can be hot-plugged into a running instance
    /// ([`KvmHypervisor::hotplug_supported`]): done, or an error saying
    /// why not.
    HotplugSupported {
        /// The instance.
        instance: String,
    },
    /// Remove what a stopped instance left ([`KvmHypervisor::cleanup`]).
    Cleanup {
        /// The instance.
        instance: String,
    },
    /// Remove what an instance keeps on this node between runs (its UEFI
    /// variable store and its TPM's state; [`KvmHypervisor::remove_state`]);
    /// refused while it runs here.
    RemoveState {
        /// The instance.
        instance: String,
    },
    /// Hand a running instance over to Ganeti 3.1's own KVM driver
    /// ([`KvmHypervisor::release_to_ganeti`]).
    ReleaseToGaneti {
        /// The instance.
        instance: String,
    },
    /// Names of the running instances.
    List,
    /// Every running instance from the node's records and `/proc`, without
    /// asking each QEMU ([`KvmHypervisor::overview`]); with `all`, the
    /// instances defined on this node that are not running too
    /// ([`KvmHypervisor::overview_with`]).
    Overview {
        /// Also the defined instances that are not running.
        #[serde(default)]
        all: bool,
    },
    /// Instance details; all running instances when the list is empty.
    Info {
        /// The instances.
        instances: Vec<String>,
    },
    /// The node's resources.
    NodeInfo,
    /// Per-instance counters (vCPU times, resident memory, block and NIC
    /// counters, balloon); all running instances when the list is empty
    /// ([`KvmHypervisor::stats`]).
    Stats {
        /// The instances.
        instances: Vec<String>,
        /// Also QEMU's proportional memory (PSS; costs the kernel a walk
        /// of QEMU's page tables, see [`crate::StatsOptions::pss`]).
        #[serde(default)]
        pss: bool,
    },
    /// Power-cycle this node at once (fencing), or with `dry_run` only
    /// say how.
    PowercycleNode {
        /// Do nothing; return the steps.
        dry_run: bool,
    },
    /// How to reach an instance's console.
    Console {
        /// The instance.
        instance: String,
    },
    /// Check the node.
    Verify,
    /// Check hypervisor parameters against this node (Ganeti's
    /// `ValidateParameters`): the QEMU they name and what it supports,
    /// users, addresses, files. Syntax is checked first.
    ValidateParams {
        /// The parameters.
        hvparams: kvm_cmdline::HvParams,
    },
    /// The command line a start would run, without starting.
    Plan {
        /// The instance definition.
        spec: InstanceSpec,
    },
    /// What a QEMU binary supports (the node's default when `None`).
    Capabilities {
        /// The binary.
        kvm_path: Option<PathBuf>,
    },
    /// What a migration destination needs.
    MigrationInfo {
        /// The instance.
        instance: String,
        /// In a form Ganeti's own KVM driver takes too
        /// ([`KvmHypervisor::migration_info_for_ganeti`]).
        for_ganeti: bool,
    },
    /// Destination, whole sequence: accept, wait, finalize
    /// ([`KvmHypervisor::receive_reporting`]: progress is told once, with
    /// state `none`, when QEMU listens).
    Receive {
        /// The source's migration info.
        info: String,
        /// Listen address.
        address: String,
        /// Listen port; `None`: the instance's `migration_port`.
        port: Option<u16>,
        /// How long to wait for the guest.
        #[serde(rename = "timeout_secs", with = "secs")]
        #[schemars(with = "f64")]
        timeout: Duration,
        /// This node's configuration of the instance now (see
        /// [`KvmHypervisor::incoming_spec_with`]).
        config: Option<crate::CurrentConfig>,
    },
    /// Source, whole sequence: migrate, then finalize the source
    /// ([`KvmHypervisor::migrate_to`]).
    Migrate {
        /// The instance.
        instance: String,
        /// The destination's address.
        target: String,
        /// The destination's port; `None`: the instance's `migration_port`.
        port: Option<u16>,
        /// Live or offline.
        mode: MigrationMode,
    },
    /// Save a running instance into a file and stop it
    /// ([`KvmHypervisor::save`]).
    Save {
        /// The instance.
        instance: String,
        /// The file to make (it must not exist).
        file: std::path::PathBuf,
    },
    /// Bring back an instance saved in a file ([`KvmHypervisor::restore`]).
    Restore {
        /// The saved instance's file.
        file: std::path::PathBuf,
    },
    /// A hot plug's dry run: the device as it would be plugged, checked,
    /// nothing changed ([`KvmHypervisor::hotplug_plan`]).
    PlanHotplug {
        /// The instance.
        instance: String,
        /// The NIC or disk.
        device: crate::HotplugDevice,
    },
    /// Define (or redefine) an instance on this node
    /// ([`KvmHypervisor::define`]).
    Define {
        /// The instance definition.
        spec: InstanceSpec,
        /// Start it when the node boots; absent keeps what an earlier
        /// definition said (off for a new one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        autostart: Option<bool>,
    },
    /// Remove an instance's definition ([`KvmHypervisor::undefine`]).
    Undefine {
        /// The instance.
        instance: String,
        /// Also remove its managed save and what it keeps between runs.
        #[serde(default)]
        remove_state: bool,
    },
    /// Turn a defined instance's autostart on or off
    /// ([`KvmHypervisor::set_autostart`]).
    SetAutostart {
        /// The instance.
        instance: String,
        /// On or off.
        enabled: bool,
    },
    /// The instances defined on this node ([`KvmHypervisor::definitions`]).
    Definitions,
    /// Start a defined instance by name, from its managed save when one
    /// waits ([`KvmHypervisor::start_defined`]).
    StartDefined {
        /// The instance.
        instance: String,
        /// Running or paused.
        #[serde(default)]
        mode: StartMode,
    },
    /// The node's boot: start every autostart instance, restore every
    /// managed save ([`KvmHypervisor::start_guests`]).
    StartGuests,
    /// The node's shutdown: stop (or save) every running instance
    /// ([`KvmHypervisor::shutdown_guests`]).
    ShutdownGuests {
        /// Stop, or save those with a definition.
        #[serde(default)]
        action: crate::ShutdownAction,
        /// How long each guest may take to power off before it is killed.
        #[serde(rename = "timeout_secs", with = "secs")]
        #[schemars(with = "f64")]
        timeout: Duration,
    },
    /// Where a migration stands.
    MigrationStatus {
        /// The instance.
        instance: String,
    },
    /// Cancel a running migration; the source keeps running.
    CancelMigration {
        /// The instance.
        instance: String,
    },
    /// Destination, first of the steps (Ganeti's AcceptInstance): start
    /// a QEMU that waits for the guest, and return once it listens; the
    /// instance is finished by [`Request::FinalizeDestination`]
    /// ([`KvmHypervisor::accept_instance`]). [`Request::Receive`] is the
    /// whole destination sequence in one.
    AwaitMigration {
        /// The source's migration info.
        info: String,
        /// Listen address.
        address: String,
        /// Listen port; `None`: the instance's `migration_port`.
        port: Option<u16>,
        /// The cluster's configuration of the instance now (see
        /// [`KvmHypervisor::incoming_spec_with`]).
        config: Option<crate::CurrentConfig>,
    },
    /// Source, the middle step (Ganeti's MigrateInstance): migrate and
    /// leave the source unfinalized ([`KvmHypervisor::migrate`]): on
    /// success its QEMU stays, handed over and never to run again, until
    /// [`Request::FinalizeSource`]. [`Request::Migrate`] is the whole
    /// source sequence in one.
    MigrateUnfinalized {
        /// The instance.
        instance: String,
        /// The destination's address.
        target: String,
        /// The destination's port; `None`: the instance's `migration_port`.
        port: Option<u16>,
        /// Live or offline.
        mode: MigrationMode,
    },
    /// Destination, Ganeti's last step.
    FinalizeDestination {
        /// The instance.
        instance: String,
        /// How the migration ended.
        outcome: MigrationOutcome,
    },
    /// Source, Ganeti's last step.
    FinalizeSource {
        /// The instance.
        instance: String,
        /// How the migration ended.
        outcome: MigrationOutcome,
    },
}

/// The answer to a [`Request`]. As JSON: `{"answer": "stopped", "value":
/// ...}` (`value` absent for `done`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "answer", content = "value", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Response {
    /// Done; nothing to report.
    Done,
    /// An instance started (or arrived).
    Started(StartReport),
    /// A disk was plugged in, as placed.
    DiskAdded(Box<kvm_cmdline::DiskSpec>),
    /// A NIC was plugged in, as placed.
    NicAdded(Box<kvm_cmdline::NicSpec>),
    /// What a node power-cycle did or would do.
    Powercycle(crate::PowercyclePlan),
    /// How a stop ended.
    Stopped(StopOutcome),
    /// Instance names.
    Names(Vec<String>),
    /// Instance details.
    Info(Vec<InstanceInfo>),
    /// Per-instance counters.
    Stats(Vec<crate::InstanceStats>),
    /// The node's resources.
    Node(NodeInfo),
    /// How to reach a console.
    Console(ConsoleInfo),
    /// What `verify` found.
    Verify(VerifyReport),
    /// A dry-run command line.
    Plan(LaunchPlan),
    /// A QEMU's capabilities.
    Capabilities(Arc<Capabilities>),
    /// Migration info for the destination.
    MigrationInfo(String),
    /// Where a migration stands (or how it ended).
    Migration(MigrationStatus),
    /// What a save made.
    Saved(crate::SaveReport),
    /// A device as a hot plug would place it.
    Device(crate::HotplugDevice),
    /// An instance's definition, as kept.
    Defined(Box<crate::Definition>),
    /// The instances defined on this node.
    Definitions(Vec<crate::Definition>),
    /// What the node's boot or shutdown did with each instance.
    Guests(Vec<crate::GuestOutcome>),
}

impl Request {
    /// Parses an API request, refusing unknown fields everywhere (serde
    /// alone lets them pass beside an operation without fields, such as
    /// `{"op": "list", "surprise": 1}`).
    pub fn from_json(text: &str) -> std::result::Result<Request, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let request = Request::deserialize(&value).map_err(|e| e.to_string())?;
        let known = serde_json::to_value(&request).map_err(|e| e.to_string())?;
        if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
            if let Some(extra) = given.keys().find(|k| !known.contains_key(*k)) {
                return Err(format!("unknown field `{extra}` of `{}`", known["op"]));
            }
        }
        Ok(request)
    }

    /// Whether the request only reads the node (what runs, how to reach
    /// it, what a start would do): it changes nothing, so a caller may
    /// repeat it after a lost answer, and `gkvm serve` answers it in
    /// process, many at once.
    pub fn only_reads(&self) -> bool {
        use Request as R;
        matches!(
            self,
            R::List
                | R::Overview { .. }
                | R::Info { .. }
                | R::NodeInfo
                | R::Stats { .. }
                | R::Console { .. }
                | R::HotplugSupported { .. }
                | R::MigrationStatus { .. }
                | R::ValidateParams { .. }
                | R::Plan { .. }
                | R::Capabilities { .. }
                | R::Definitions
                | R::PlanHotplug { .. }
        )
    }
}

/// An error as the API tells it (the CLI's `--json` error object without
/// its exit code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// What kind of error ([`crate::Error::kind`]): callers decide by it,
    /// never by the message.
    pub kind: String,
    /// The instance concerned, when there is one.
    pub instance: Option<String>,
    /// What went wrong, for people.
    pub message: String,
}

impl From<&crate::Error> for ErrorReply {
    fn from(e: &crate::Error) -> ErrorReply {
        ErrorReply {
            kind: e.kind().to_owned(),
            instance: e.instance().map(str::to_owned),
            message: e.report(),
        }
    }
}

/// One line of an answer over the API: any number of `progress` lines
/// (a migration's), then one `response` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Where a long operation stands.
    Progress(MigrationStatus),
    /// The operation's answer.
    Response(Response),
    /// Why it failed.
    Error(ErrorReply),
}

/// gkvm's API, version 1: a [`Request`] (one JSON object) is answered by
/// [`Reply`] lines (JSON Lines).
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct Api {
    /// One operation.
    request: Request,
    /// One line of its answer.
    reply: Reply,
}

/// The API's JSON Schema (`schemas/v1/api.json`), generated from the
/// types themselves.
pub fn api_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Api)).unwrap_or_default();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("$id".into(), "urn:gkvm:schema:v1:api".into());
        obj.insert("title".into(), "gkvm API v1".into());
    }
    schema
}

impl KvmHypervisor {
    /// Carries out one request.
    pub async fn handle(&self, request: Request) -> Result<Response> {
        self.handle_with_progress(request, &mut |_| {}).await
    }

    /// Carries out one request, reporting a migration's progress.
    pub async fn handle_with_progress(
        &self,
        request: Request,
        progress: Progress<'_>,
    ) -> Result<Response> {
        use Request as R;
        Ok(match request {
            R::Start { spec, mode } => Response::Started(self.start(&spec, mode).await?),
            R::Stop { instance, mode } => Response::Stopped(self.stop(&instance, mode).await?),
            R::Reboot { instance, config } => {
                done(self.reboot_with(&instance, config.as_ref()).await?)
            }
            R::Resume { instance } => done(self.resume(&instance).await?),
            R::Balloon { instance, mib } => done(self.balloon(&instance, mib).await?),
            R::Cleanup { instance } => done(self.cleanup(&instance).await?),
            R::ReleaseToGaneti { instance } => done(self.release_to_ganeti(&instance).await?),
            R::RemoveState { instance } => done(self.remove_state(&instance).await?),
            R::HotplugSupported { instance } => done(self.hotplug_supported(&instance).await?),
            R::NicAdd { instance, nic } => {
                Response::NicAdded(Box::new(self.nic_add(&instance, nic).await?))
            }
            R::NicRemove { instance, id } => done(self.nic_remove(&instance, &id).await?),
            R::NicModify {
                instance,
                id,
                nic,
                keep_mac,
            } => Response::NicAdded(Box::new(
                self.nic_modify_with(&instance, &id, nic, keep_mac).await?,
            )),
            R::DiskAdd { instance, disk } => {
                Response::DiskAdded(Box::new(self.disk_add(&instance, disk).await?))
            }
            R::DiskRemove { instance, id } => done(self.disk_remove(&instance, &id).await?),
            R::DiskGrow {
                instance,
                id,
                bytes,
            } => done(self.disk_grow(&instance, &id, bytes).await?),
            R::SetLimits { instance, limits } => done(self.set_limits(&instance, &limits).await?),
            R::SetIoLimits {
                instance,
                group,
                limits,
            } => done(self.set_io_limits(&instance, &group, limits).await?),
            R::List => Response::Names(self.list()?),
            R::Overview { all } => Response::Info(self.overview_with(all).await?),
            R::Info { instances } => Response::Info(self.info_many(&instances).await?),
            R::NodeInfo => Response::Node(self.node_info().await?),
            R::Stats { instances, pss } => Response::Stats(
                self.stats_with(&instances, crate::StatsOptions::default().with_pss(pss))
                    .await?,
            ),
            R::PowercycleNode { dry_run } => Response::Powercycle(self.powercycle_node(dry_run)?),
            R::Console { instance } => Response::Console(self.console(&instance)?),
            R::Verify => Response::Verify(self.verify().await),
            R::ValidateParams { hvparams } => done(self.validate_params(&hvparams).await?),
            R::Plan { spec } => Response::Plan(self.plan(&spec).await?),
            R::Capabilities { kvm_path } => {
                let path = kvm_path.unwrap_or_else(|| self.default_kvm_path());
                Response::Capabilities(self.capabilities(&path).await?)
            }
            R::MigrationInfo {
                instance,
                for_ganeti,
            } => Response::MigrationInfo(self.migration_info_settled(&instance, for_ganeti).await?),
            R::Receive {
                info,
                address,
                port,
                timeout,
                config,
            } => {
                let port = self.port_for_info(&info, port)?;
                Response::Started(
                    self.receive_reporting(
                        &info,
                        &address,
                        port,
                        timeout,
                        config.as_ref(),
                        progress,
                    )
                    .await?,
                )
            }
            R::Migrate {
                instance,
                target,
                port,
                mode,
            } => {
                let port = self.port_for_instance(&instance, port)?;
                Response::Migration(
                    self.migrate_to(&instance, &target, port, mode, progress)
                        .await?,
                )
            }
            R::MigrationStatus { instance } => {
                Response::Migration(self.migration_status(&instance).await?)
            }
            R::Save { instance, file } => {
                Response::Saved(self.save(&instance, &file, progress).await?)
            }
            R::Restore { file } => Response::Started(self.restore(&file).await?),
            R::PlanHotplug { instance, device } => {
                Response::Device(self.hotplug_plan(&instance, device).await?)
            }
            R::Define { spec, autostart } => {
                Response::Defined(Box::new(self.define(&spec, autostart).await?))
            }
            R::Undefine {
                instance,
                remove_state,
            } => done(self.undefine(&instance, remove_state).await?),
            R::SetAutostart { instance, enabled } => {
                done(self.set_autostart(&instance, enabled).await?)
            }
            R::Definitions => Response::Definitions(self.definitions()?),
            R::StartDefined { instance, mode } => {
                Response::Started(self.start_defined(&instance, mode).await?)
            }
            R::StartGuests => Response::Guests(self.start_guests().await?),
            R::ShutdownGuests { action, timeout } => {
                Response::Guests(self.shutdown_guests(action, timeout).await?)
            }
            R::CancelMigration { instance } => done(self.cancel_migration(&instance).await?),
            R::AwaitMigration {
                info,
                address,
                port,
                config,
            } => {
                let port = self.port_for_info(&info, port)?;
                Response::Started(
                    self.accept_instance_with(&info, &address, port, config.as_ref())
                        .await?,
                )
            }
            R::MigrateUnfinalized {
                instance,
                target,
                port,
                mode,
            } => {
                let port = self.port_for_instance(&instance, port)?;
                Response::Migration(
                    self.migrate(&instance, &target, port, mode, progress)
                        .await?,
                )
            }
            R::FinalizeDestination { instance, outcome } => {
                done(self.finalize_migration_dst(&instance, outcome).await?)
            }
            R::FinalizeSource { instance, outcome } => {
                done(self.finalize_migration_source(&instance, outcome).await?)
            }
        })
    }

    /// What a migration destination needs of a running instance, after
    /// settling a hot plug a killed gkvm left: gkvm's info
    /// ([`Self::migration_info_live`]), or with `for_ganeti` Ganeti's
    /// runtime list with gkvm's inside ([`Self::migration_info_for_ganeti`]).
    pub async fn migration_info_settled(&self, instance: &str, for_ganeti: bool) -> Result<String> {
        self.settle_hotplug(instance).await?;
        if for_ganeti {
            self.migration_info_for_ganeti(instance).await
        } else {
            self.migration_info_live(instance).await
        }
    }

    /// Details of these instances, or of every running one.
    pub async fn info_many(&self, instances: &[String]) -> Result<Vec<InstanceInfo>> {
        if instances.is_empty() {
            return self.info_all().await;
        }
        let mut out = Vec::with_capacity(instances.len());
        for name in instances {
            out.push(self.info(name).await?);
        }
        Ok(out)
    }
}

fn done((): ()) -> Response {
    Response::Done
}

/// A duration as seconds (a JSON number, fractions allowed).
mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}
