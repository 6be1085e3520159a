//! Live migration, Ganeti's protocol on both sides — followed through
//! QMP `MIGRATION` events instead of polling HMP text every 2 s, so a
//! migration that takes 250 ms is reported done after 250 ms.
//!
//! Source: [`KvmHypervisor::migration_info`] → (destination:
//! [`KvmHypervisor::accept_instance`]) → [`KvmHypervisor::migrate`] →
//! [`KvmHypervisor::finalize_migration_source`]; destination:
//! [`KvmHypervisor::wait_incoming`] → [`KvmHypervisor::finalize_migration_dst`].
//! A failure anywhere leaves the source running and the destination clean.

use std::time::{Duration, Instant};

use gkvm_qmp::commands::{self, RunState};
use gkvm_qmp::{Qmp, TypedEvent};
use kvm_runtime::{InstancePaths, RuntimeRecord};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::guard::{kill_and_clean_blocking, RollbackGuard};
use crate::lifecycle::{refuse_cont, set_marker, spec_from_record, StartOpts, INCOMING, MIGRATING};
use crate::ops::{MigrationMode, MigrationOutcome, StopMode};
use crate::types::{MigrationState, StartReport};
use crate::KvmHypervisor;

/// Where a migration stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// QEMU's state of the migration.
    pub status: MigrationState,
    /// RAM bytes sent.
    pub transferred_bytes: u64,
    /// RAM bytes left.
    pub remaining_bytes: u64,
    /// Guest RAM in bytes.
    pub total_bytes: u64,
    /// Progress from 0 to 1.
    pub progress: f64,
    /// Transfer rate in Mbit/s.
    pub mbps: f64,
    /// Milliseconds since the start (total when done).
    pub total_time_ms: Option<u64>,
    /// The guest's downtime in milliseconds, once completed.
    pub downtime_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

impl MigrationStatus {
    fn from_info(info: &commands::MigrationInfo) -> MigrationStatus {
        let ram = info.ram.unwrap_or_default();
        let status = info
            .status
            .as_deref()
            .map_or(MigrationState::None, MigrationState::parse);
        let done = status == MigrationState::Completed;
        let progress = if done {
            1.0
        } else if ram.total > 0 {
            {
                // Per-mille in integers, then one exact conversion.
                let done = ram.total.saturating_sub(ram.remaining).min(ram.total);
                let permille = u32::try_from(done.saturating_mul(1000) / ram.total).unwrap_or(1000);
                f64::from(permille) / 1000.0
            }
        } else {
            0.0
        };
        MigrationStatus {
            status,
            transferred_bytes: ram.transferred,
            remaining_bytes: ram.remaining,
            total_bytes: ram.total,
            progress,
            mbps: ram.mbps,
            total_time_ms: info.total_time,
            downtime_ms: info.downtime,
            error: info.error_desc.clone(),
        }
    }

    /// Whether the migration has ended, one way or the other.
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }
}

pub(crate) fn qmp_err(instance: &str, op: &str) -> impl Fn(gkvm_qmp::Error) -> Error {
    let (instance, op) = (instance.to_owned(), op.to_owned());
    move |source| Error::Qmp {
        instance: instance.clone(),
        op: op.clone(),
        source,
    }
}

/// `tcp:HOST:PORT`, with brackets for IPv6.
fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

/// An incoming instance, checked: its definition, its files, and the
/// source guest's CPU when the info says.
struct Incoming {
    spec: crate::InstanceSpec,
    paths: InstancePaths,
    source_cpu: Option<Vec<crate::cpu::FeatureWord>>,
}

/// Whether the source migrates over TLS, in the migration info's payload.
const MIGRATION_TLS_KEY: &str = "migration_tls";

/// The migration info's record of the accelerator the source QEMU really
/// runs (`kvm` or `tcg`), as QMP `query-kvm` says: guest state differs
/// between them (e.g. `kvmclock`), and Ganeti's driver leaves it to the
/// binary (Debian's `/usr/bin/kvm` enables KVM whatever `kvm_flag` says).
const ACCEL_KEY: &str = "accel";

/// Turns on, before a transfer and on either side, MIGRATION events
/// (off by default in QEMU; gkvm follows migrations by them) and the
/// instance's `migration_caps` (Ganeti 3.1), in one command, after
/// checking each against what this QEMU has (`query-migrate-capabilities`:
/// an unknown one is refused naming it and listing the known ones). With
/// `multifd`, both sides use [`MULTIFD_CHANNELS`] channels.
/// Whether an incoming instance starts with `-incoming defer` and listens
/// only once its migration capabilities are set (`migrate-incoming`):
/// QEMU 10 refuses `multifd` once it listens ("Multifd must be set before
/// incoming starts"). Without capabilities to set it listens at once, as
/// Ganeti's driver has it.
pub(crate) fn defers_incoming(spec: &crate::InstanceSpec) -> bool {
    !spec.hvparams.migration_capabilities().is_empty()
}

async fn set_migration_caps(qmp: &Qmp, spec: &crate::InstanceSpec) -> Result<()> {
    let wanted = spec.hvparams.migration_capabilities();
    if !wanted.is_empty() {
        let known = qmp
            .run(&commands::QueryMigrateCapabilities)
            .await
            .map_err(qmp_err(&spec.name, "query-migrate-capabilities"))?;
        if let Some(bad) = wanted
            .iter()
            .find(|w| !known.iter().any(|k| k.capability == **w))
        {
            let names: Vec<&str> = known.iter().map(|k| k.capability.as_str()).collect();
            return Err(Error::Params {
                instance: spec.name.clone(),
                source: kvm_cmdline::Error::Host {
                    key: "migration_caps".into(),
                    reason: format!(
                        "this QEMU has no migration capability {bad:?} (it has: {})",
                        names.join(", ")
                    ),
                },
            });
        }
    }
    let caps = std::iter::once("events").chain(wanted.iter().copied());
    let op = match spec.hvparams.migration_caps.as_str() {
        "" => "enable migration events".to_owned(),
        caps => format!("set migration capabilities events:{caps}"),
    };
    qmp.run(&commands::MigrateSetCapabilities {
        capabilities: caps
            .map(|c| commands::MigrationCapabilityStatus {
                capability: c.to_owned(),
                state: true,
            })
            .collect(),
    })
    .await
    .map_err(qmp_err(&spec.name, &op))?;
    if wanted.contains(&"multifd") {
        qmp.run(&commands::MigrateSetParameters {
            multifd_channels: Some(MULTIFD_CHANNELS),
            ..Default::default()
        })
        .await
        .map_err(qmp_err(&spec.name, "set multifd-channels"))?;
    }
    Ok(())
}

/// Parallel channels of a `multifd` migration (QEMU's default is 2; the
/// same on both sides, as QEMU requires).
pub const MULTIFD_CHANNELS: u64 = 4;

/// With `postcopy-ram`, the precopy passes after which a migration that
/// has not converged switches to postcopy (Ganeti 3.1's threshold).
const POSTCOPY_AFTER_PASSES: u64 = 2;

impl KvmHypervisor {
    /// A connection on the watch socket (falls back to the main one for
    /// instances started without it, e.g. by Ganeti's KVM driver).
    pub(crate) async fn watch_qmp(&self, paths: &InstancePaths) -> Result<Qmp> {
        let path = if paths.qmp_watch.exists() {
            &paths.qmp_watch
        } else {
            &paths.qmp
        };
        self.qmp_at(&paths.name, path).await
    }

    /// The migration port: `given`, else the incoming instance's
    /// `migration_port` hvparam (as Ganeti's AcceptInstance uses it).
    pub fn port_for_info(&self, info: &str, given: Option<u16>) -> Result<u16> {
        match given {
            Some(p) => Ok(p),
            None => Ok(self.incoming_spec(info)?.hvparams.migration_port),
        }
    }

    /// The migration port: `given`, else the running instance's
    /// `migration_port` hvparam (as Ganeti's MigrateInstance uses it).
    pub fn port_for_instance(&self, name: &str, given: Option<u16>) -> Result<u16> {
        if let Some(p) = given {
            return Ok(p);
        }
        let paths = self.paths(name)?;
        Ok(self
            .saved_spec(&paths)?
            .map(|s| s.hvparams.migration_port)
            .unwrap_or_else(|| kvm_cmdline::HvParams::default().migration_port))
    }

    /// What the destination needs: the source's runtime file — sealed with
    /// the node's migration key when one is configured
    /// ([`crate::Config::migration_key`]), so the destination can tell it
    /// was not edited on the way.
    ///
    /// Refused while an interrupted hot plug is unsettled (the record may
    /// lack a device QEMU has): [`Self::settle_hotplug`] first, as
    /// [`crate::Request::MigrationInfo`] does.
    pub fn migration_info(&self, name: &str) -> Result<String> {
        let record = self.migration_record(&self.paths(name)?, None)?;
        Ok(self.sealed(&record))
    }

    /// [`Self::migration_info`] with what the source QEMU says: its
    /// accelerator (`query-kvm`), so that the destination runs the same.
    pub async fn migration_info_live(&self, name: &str) -> Result<String> {
        let (_, _, record) = self.migration_record_live(name).await?;
        Ok(self.sealed(&record))
    }

    /// [`Self::migration_info_live`] that Ganeti 3.1's own KVM driver
    /// takes too (a cluster switching node by node): Ganeti's runtime list
    /// (the command line, NICs, hvparams, disks as its driver writes them,
    /// see [`Self::release_to_ganeti`]) with gkvm's info as a fifth element,
    /// which Ganeti's driver ignores and gkvm reads. Not sealed (Ganeti's
    /// driver could not read it): refused on a node with a migration key.
    pub async fn migration_info_for_ganeti(&self, name: &str) -> Result<String> {
        if self.config.migration_key.is_some() {
            return Err(Error::MigrationInfo {
                instance: name.to_owned(),
                reason: "this node seals migration info (migration_key), and Ganeti's \
                         driver reads no sealed file"
                    .into(),
            });
        }
        let (paths, pid, record) = self.migration_record_live(name).await?;
        let inner: serde_json::Value =
            serde_json::from_slice(&record.to_json()).map_err(|e| Error::MigrationInfo {
                instance: name.to_owned(),
                reason: format!("gkvm's migration info: {e}"),
            })?;
        let ganeti = self.ganeti_record(&paths, pid, record).await?;
        let mut list: serde_json::Value = serde_json::from_slice(&ganeti.to_ganeti_json())
            .map_err(|e| Error::MigrationInfo {
                instance: name.to_owned(),
                reason: format!("Ganeti's runtime of the instance: {e}"),
            })?;
        if let Some(items) = list.as_array_mut() {
            // Ganeti's fourth element is the disks (none: an empty list).
            if items.len() == 3 {
                items.push(serde_json::json!([]));
            }
            items.push(serde_json::json!({ crate::trust::EMBEDDED: inner }));
        }
        Ok(list.to_string())
    }

    /// [`Self::migration_record`], the accelerator asked of the running
    /// QEMU; with its paths and pid.
    pub(crate) async fn migration_record_live(
        &self,
        name: &str,
    ) -> Result<(InstancePaths, i32, kvm_runtime::RuntimeRecord)> {
        let paths = self.paths(name)?;
        let pid = self.running_pid(&paths)?;
        let (kvm, cpu) = match self.qmp(&paths).await {
            Ok(qmp) => (
                qmp.run(&commands::QueryKvm).await.ok().map(|k| k.enabled),
                crate::cpu::feature_words(&qmp).await,
            ),
            Err(e) => {
                tracing::debug!(instance = %name, error = %e.report(), "query-kvm");
                (None, None)
            }
        };
        let mut record = self.migration_record(&paths, kvm)?;
        if let (Some(payload), Some(cpu)) = (record.payload.as_object_mut(), cpu) {
            payload.insert(
                crate::cpu::CPU_FEATURES_KEY.into(),
                serde_json::to_value(cpu).unwrap_or_default(),
            );
        }
        Ok((paths, pid, record))
    }

    /// The runtime record that travels as migration info: what the
    /// destination must agree on (TLS, the accelerator when known) added
    /// to its payload.
    fn migration_record(
        &self,
        paths: &InstancePaths,
        kvm: Option<bool>,
    ) -> Result<kvm_runtime::RuntimeRecord> {
        self.running_pid(paths)?;
        self.refuse_unsettled_hotplug(paths)?;
        let mut record = self.running_record(paths)?;
        if record.payload.is_null() {
            // A runtime file of Ganeti's driver has no payload.
            record.payload = serde_json::Value::Object(serde_json::Map::new());
        }
        if let Some(payload) = record.payload.as_object_mut() {
            // The destination must speak TLS iff this node does.
            payload.insert(
                MIGRATION_TLS_KEY.into(),
                self.config.migration_tls_dir.is_some().into(),
            );
            if let Some(kvm) = kvm {
                payload.insert(ACCEL_KEY.into(), if kvm { "kvm" } else { "tcg" }.into());
            }
        }
        Ok(record)
    }

    /// `record` as migration info: sealed when this node has a key.
    pub(crate) fn sealed(&self, record: &kvm_runtime::RuntimeRecord) -> String {
        let runtime = String::from_utf8_lossy(&record.to_json()).into_owned();
        match &self.config.migration_key {
            Some(key) => crate::trust::seal(key, &runtime),
            None => runtime,
        }
    }

    /// The instance a migration info file describes, once it is trusted:
    /// its seal checked when this node has a migration key, and every
    /// node-local hvparam (QEMU binary, extra arguments, password and
    /// certificate files, chroot and security settings) equal to this
    /// node's own value — the file decides nothing this node runs as root.
    pub fn incoming_spec(&self, info: &str) -> Result<crate::InstanceSpec> {
        self.incoming_spec_with(info, None)
    }

    /// [`Self::incoming_spec`], the parameters that may change between
    /// starts taken from `current` (the cluster's configuration of the
    /// instance now, as Ganeti 3.1's AcceptInstance has it) before the
    /// checks.
    pub fn incoming_spec_with(
        &self,
        info: &str,
        current: Option<&CurrentConfig>,
    ) -> Result<crate::InstanceSpec> {
        self.incoming_spec_from(info, current, false)
    }

    /// [`Self::incoming_spec_with`]; `own_file` for info this node's
    /// administrator kept in a file only they can write (a saved
    /// instance), which an unsealed node takes as it takes its own.
    pub(crate) fn incoming_spec_from(
        &self,
        info: &str,
        current: Option<&CurrentConfig>,
        own_file: bool,
    ) -> Result<crate::InstanceSpec> {
        let mut spec = parse_migration_info(info, self.config.migration_key.as_deref())?;
        if self.config.migration_key.is_none()
            && !self.config.trust_unsealed_migration_info
            && !own_file
        {
            return Err(Error::MigrationInfo {
                instance: spec.name.clone(),
                reason: "this node has no migration key, so nothing vouches for the file, \
                         and it chooses the disks and files QEMU opens here as root: share \
                         a migration key between the nodes (migration_key), or accept \
                         unsealed files explicitly (--trust-unsealed) where they travel \
                         over a channel you trust"
                    .into(),
            });
        }
        if let Some(current) = current {
            spec.hvparams.take_restart_safe(&current.hvparams);
            if let Some(disks) = &current.disks {
                take_local_disks(&mut spec, disks)?;
            }
        }
        // The accelerator the source really runs, when its info says.
        let body = crate::trust::unseal(self.config.migration_key.as_deref(), info)?;
        let accel = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("payload")?
                    .get(ACCEL_KEY)?
                    .as_str()
                    .map(str::to_owned)
            });
        match accel.as_deref() {
            Some("kvm") => spec.hvparams.kvm_flag = kvm_cmdline::hvparams::KvmFlag::Enabled,
            Some("tcg") => spec.hvparams.kvm_flag = kvm_cmdline::hvparams::KvmFlag::Disabled,
            _ => {}
        }
        crate::trust::check_node_local(
            &spec,
            &self.node_local_hvparams(),
            self.config.kvm_path.is_some(),
        )?;
        spec.hvparams.kvm_path = self.kvm_path_for(&spec);
        Ok(spec)
    }

    /// Refuses a migration whose source and this node disagree on TLS:
    /// it could only fail half way, with an unhelpful error.
    fn check_tls_agrees(&self, name: &str, info: &str) -> Result<()> {
        let body = crate::trust::unseal(self.config.migration_key.as_deref(), info)?;
        let source_tls = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("payload")?.get(MIGRATION_TLS_KEY)?.as_bool())
            .unwrap_or(false);
        let reason = match (source_tls, self.config.migration_tls_dir.is_some()) {
            (true, false) => "the source migrates over TLS, and this node has no migration certificates (migration_tls_dir)",
            (false, true) => "this node accepts migrations over TLS only, and the source has no migration certificates",
            _ => return Ok(()),
        };
        Err(Error::MigrationInfo {
            instance: name.to_owned(),
            reason: reason.to_owned(),
        })
    }

    /// This node's values of the node-local hvparams.
    fn node_local_hvparams(&self) -> kvm_cmdline::HvParams {
        let mut hv = kvm_cmdline::HvParams::default();
        for (k, v) in &self.config.node_hvparams {
            if let Err(e) = hv.set(k, v.clone()) {
                tracing::warn!(key = %k, error = %e, "node hvparam ignored");
            }
        }
        if let Some(p) = &self.config.kvm_path {
            hv.kvm_path = p.clone();
        }
        hv
    }

    /// On the destination, the whole of Ganeti's accept → wait → finalize
    /// sequence under the instance's lock: starts QEMU from the trusted
    /// migration info listening on `address:port`, waits up to `timeout`
    /// for the guest to land (it runs as soon as it has), then configures
    /// routed NICs. If the migration fails, times out, or this future is
    /// dropped (SIGINT) before the guest landed, the waiting QEMU is killed
    /// and its files removed; once landed, the guest is kept.
    pub async fn receive(
        &self,
        info: &str,
        address: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<StartReport> {
        self.receive_reporting(info, address, port, timeout, None, &mut |_| {})
            .await
    }

    /// [`Self::receive`], with this node's own configuration of the
    /// instance when it has one (see [`Self::incoming_spec_with`]),
    /// reporting once (a status of state `none`, no migration yet) when
    /// QEMU listens on `address:port`: from then on a source may connect.
    pub async fn receive_reporting(
        &self,
        info: &str,
        address: &str,
        port: u16,
        timeout: Duration,
        current: Option<&CurrentConfig>,
        listening: crate::Progress<'_>,
    ) -> Result<StartReport> {
        let incoming = self.incoming(info, address, port, current)?;
        let (spec, paths) = (&incoming.spec, &incoming.paths);
        let _lock = self.lock(paths).await?;
        // A QEMU of this instance that already runs is another
        // operation's (an accept waiting for its migration, a guest that
        // landed): refused here, before the guard below could end it.
        if let kvm_runtime::Liveness::Running { pid } = self.liveness(paths)? {
            return Err(Error::AlreadyRunning {
                instance: spec.name.clone(),
                pid,
            });
        }
        let _guard = IncomingGuard {
            paths: paths.clone(),
            qmp_timeout: self.config.qmp_timeout,
        };
        let report = self.accept_locked(&incoming, address, port).await?;
        // QEMU opened its listening socket before its start returned
        // (-incoming is set up before it daemonizes).
        listening(&MigrationStatus::default());
        self.wait_incoming(&spec.name, timeout).await?;
        self.finalize_dst_locked(paths, MigrationOutcome::Completed)
            .await?;
        Ok(report)
    }

    /// On the destination: starts QEMU from the source's runtime (or an
    /// instance definition), waiting for the migration on `address:port`;
    /// the guest runs as soon as it has landed. The machine type is the
    /// source's, so guest state fits; a QEMU that lacks it is refused here
    /// with an error naming the machine. The info is checked as
    /// [`KvmHypervisor::incoming_spec`] says.
    pub async fn accept_instance(
        &self,
        info: &str,
        address: &str,
        port: u16,
    ) -> Result<StartReport> {
        self.accept_instance_with(info, address, port, None).await
    }

    /// [`Self::accept_instance`] with the cluster's current configuration
    /// of the instance (see [`Self::incoming_spec_with`]).
    pub async fn accept_instance_with(
        &self,
        info: &str,
        address: &str,
        port: u16,
        current: Option<&CurrentConfig>,
    ) -> Result<StartReport> {
        let incoming = self.incoming(info, address, port, current)?;
        let _lock = self.lock(&incoming.paths).await?;
        self.accept_locked(&incoming, address, port).await
    }

    /// The checks of an incoming instance before anything is created for
    /// it: trusted info, a real listen address, a valid definition.
    fn incoming(
        &self,
        info: &str,
        address: &str,
        port: u16,
        current: Option<&CurrentConfig>,
    ) -> Result<Incoming> {
        let spec = self.incoming_spec_with(info, current)?;
        self.check_tls_agrees(&spec.name, info)?;
        check_listen(&spec.name, address, port)?;
        crate::lifecycle::check_spec(&spec)?;
        let paths = self.paths(&spec.name)?;
        // The source guest's CPU, when its info says (a trusted info: a
        // tampered list could only make this check refuse).
        let body = crate::trust::unseal(self.config.migration_key.as_deref(), info)?;
        let source_cpu = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                serde_json::from_value(v.get("payload")?.get(crate::cpu::CPU_FEATURES_KEY)?.clone())
                    .ok()
            });
        Ok(Incoming {
            spec,
            paths,
            source_cpu,
        })
    }

    async fn accept_locked(
        &self,
        incoming: &Incoming,
        address: &str,
        port: u16,
    ) -> Result<StartReport> {
        let (spec, paths) = (&incoming.spec, &incoming.paths);
        let report = self
            .start_locked(
                spec,
                paths,
                StartOpts {
                    paused: true,
                    incoming: Some(tcp_uri(address, port)),
                },
            )
            .await?;
        // Once QEMU waits, a step that fails ends it: nothing is left for
        // a migration that cannot come.
        match self.ready_incoming(incoming, address, port).await {
            Ok(()) => Ok(report),
            Err(e) => {
                if let Err(stop) = self.stop_locked(paths, StopMode::Force).await {
                    tracing::error!(instance = %spec.name, error = %stop.report(), "the refused incoming QEMU could not be stopped");
                }
                Err(e)
            }
        }
    }

    /// An incoming QEMU made ready: its guest CPU checked against the
    /// source's, migration events and capabilities set, listening.
    async fn ready_incoming(&self, incoming: &Incoming, address: &str, port: u16) -> Result<()> {
        let spec = &incoming.spec;
        let qmp = self.qmp(&incoming.paths).await?;
        if let Some(source) = &incoming.source_cpu {
            if let Some(here) = crate::cpu::feature_words(&qmp).await {
                let missing = crate::cpu::missing(source, &here);
                if !missing.is_empty() {
                    return Err(Error::MigrationInfo {
                        instance: spec.name.clone(),
                        reason: format!(
                            "this node cannot give the guest the CPU it has (cpu_type={:?}): \
                             it lacks {}; migrate between nodes with the same CPU, or give \
                             the instance a named model every node has",
                            spec.hvparams.cpu_type,
                            missing.join(", ")
                        ),
                    });
                }
            }
        }
        // Migration events on this side too, for wait_incoming.
        set_migration_caps(&qmp, spec).await?;
        if defers_incoming(spec) {
            qmp.run(&commands::MigrateIncoming {
                uri: tcp_uri(address, port),
            })
            .await
            .map_err(qmp_err(&spec.name, "migrate-incoming"))?;
        }
        Ok(())
    }

    /// On the source: sets bandwidth and downtime from the hvparams,
    /// starts the migration to `target:port` (stopping the guest first when
    /// not `live`) and follows it by events, calling `progress` on each
    /// change and every ~200 ms while active. Returns the final status;
    /// on failure or cancellation the source is running again (unless the
    /// guest had already been handed over) and the error says why. Holds
    /// the instance's lock throughout. If this future is dropped (SIGINT),
    /// a migration in flight is cancelled and the source resumed, and one
    /// that completed finalizes the source: it never runs again.
    pub async fn migrate(
        &self,
        name: &str,
        target: &str,
        port: u16,
        mode: MigrationMode,
        mut progress: impl FnMut(&MigrationStatus),
    ) -> Result<MigrationStatus> {
        if port == 0 {
            return Err(Error::Migration {
                instance: name.into(),
                status: "refused".into(),
                reason: "port 0 is not a migration target".into(),
            });
        }
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        let pid = self.running_pid(&paths)?;
        let spec = self
            .saved_spec(&paths)?
            .unwrap_or_else(|| crate::InstanceSpec::new(name, 0));
        let qmp = self.watch_qmp(&paths).await?;
        let state = qmp
            .run(&commands::QueryStatus)
            .await
            .map_err(qmp_err(name, "query-status"))?;
        refuse_cont(name, pid, state.status)?;
        let was_running = state.running;
        let mut guard = MigrationGuard {
            paths: paths.clone(),
            was_running,
            qmp_timeout: self.config.qmp_timeout,
            armed: false,
        };
        set_migration_caps(&qmp, &spec).await?;
        // Over TLS when this node has migration certificates, the
        // destination's certificate checked against the name dialled.
        let tls = self.config.migration_tls_dir.is_some();
        let postcopy = spec
            .hvparams
            .migration_capabilities()
            .contains(&"postcopy-ram");
        qmp.run(&commands::MigrateSetParameters {
            downtime_limit: Some(u64::from(spec.hvparams.migration_downtime)),
            max_bandwidth: Some(u64::from(spec.hvparams.migration_bandwidth) << 20),
            tls_creds: Some(if tls {
                kvm_cmdline::MIGRATION_TLS_OUT.to_owned()
            } else {
                String::new()
            }),
            tls_hostname: tls.then(|| target.to_owned()),
            // Postcopy keeps to the instance's bandwidth too.
            max_postcopy_bandwidth: postcopy
                .then(|| u64::from(spec.hvparams.migration_bandwidth) << 20),
            multifd_channels: None,
        })
        .await
        .map_err(qmp_err(name, "migrate-set-parameters"))?;
        guard.armed = true;
        if mode == MigrationMode::Offline {
            qmp.run(&commands::Stop)
                .await
                .map_err(qmp_err(name, "stop"))?;
        }
        let uri = tcp_uri(target, port);
        tracing::info!(instance = %name, %uri, ?mode, "migrating");
        // Until it ends, `list` asks QEMU about this instance.
        set_marker(&paths, MIGRATING, true).map_err(|e| Error::Runtime {
            instance: name.into(),
            source: e,
        })?;
        if let Err(e) = qmp.run(&commands::Migrate { uri: uri.clone() }).await {
            guard.armed = false;
            self.resume_after_failure(&qmp, name, was_running).await;
            clear_marker(&paths, MIGRATING);
            return Err(qmp_err(name, &format!("migrate to {uri}"))(e));
        }
        let result = self.follow(&qmp, name, postcopy, &mut progress).await;
        guard.armed = false;
        match result {
            Ok(status) if status.status == MigrationState::Completed => {
                tracing::info!(instance = %name, total_ms = ?status.total_time_ms, downtime_ms = ?status.downtime_ms, "migration completed");
                Ok(status)
            }
            Ok(status) => {
                self.resume_after_failure(&qmp, name, was_running).await;
                clear_marker(&paths, MIGRATING);
                Err(Error::Migration {
                    instance: name.into(),
                    status: status.status.to_string(),
                    reason: status
                        .error
                        .unwrap_or_else(|| format!("migration {}", status.status)),
                })
            }
            Err(e) => {
                self.resume_after_failure(&qmp, name, was_running).await;
                clear_marker(&paths, MIGRATING);
                Err(e)
            }
        }
    }

    /// The source side of a migration as one call: [`KvmHypervisor::migrate`]
    /// then [`KvmHypervisor::finalize_migration_source`] — on success the
    /// source QEMU is stopped and its files removed (even if this future
    /// is dropped between the two), on failure it runs again.
    pub async fn migrate_to(
        &self,
        name: &str,
        target: &str,
        port: u16,
        mode: MigrationMode,
        progress: impl FnMut(&MigrationStatus),
    ) -> Result<MigrationStatus> {
        match self.migrate(name, target, port, mode, progress).await {
            Ok(status) => {
                let paths = self.paths(name)?;
                let mut guard = RollbackGuard::new(&paths, "finalize migration source");
                self.finalize_migration_source(name, MigrationOutcome::Completed)
                    .await?;
                guard.disarm();
                Ok(status)
            }
            Err(e) => {
                if let Err(resume) = self
                    .finalize_migration_source(name, MigrationOutcome::Failed)
                    .await
                {
                    tracing::warn!(instance = %name, error = %resume.report(), "after a failed migration");
                }
                Err(e)
            }
        }
    }

    pub(crate) async fn follow(
        &self,
        qmp: &Qmp,
        name: &str,
        postcopy: bool,
        progress: &mut impl FnMut(&MigrationStatus),
    ) -> Result<MigrationStatus> {
        let mut switched = false;
        loop {
            let event = qmp
                .wait_for_event(Duration::from_millis(200), |e| e.name == "MIGRATION")
                .await
                .map_err(qmp_err(name, "follow migration"))?;
            let info = qmp
                .run(&commands::QueryMigrate)
                .await
                .map_err(qmp_err(name, "query-migrate"))?;
            let mut status = MigrationStatus::from_info(&info);
            if let Some(TypedEvent::Migration { status: s }) = event.as_ref().map(|e| e.typed()) {
                // The event may be newer than the figures.
                let s = MigrationState::parse(&s);
                if status.status != s && s.is_final() {
                    status.status = s;
                }
            }
            progress(&status);
            if status.is_final() {
                return Ok(status);
            }
            // As Ganeti 3.1: a migration allowed postcopy that has not
            // converged in its first passes goes on as postcopy.
            let passes = info.ram.map_or(0, |r| r.dirty_sync_count);
            if postcopy
                && !switched
                && status.status == MigrationState::Active
                && passes >= POSTCOPY_AFTER_PASSES
            {
                tracing::info!(instance = %name, passes, "switching to postcopy");
                qmp.run(&commands::MigrateStartPostcopy)
                    .await
                    .map_err(qmp_err(name, "migrate-start-postcopy"))?;
                switched = true;
            }
        }
    }

    /// After a failed migration: the source must run again if it ran
    /// before. QEMU resumes a live migration's source by itself; only a
    /// guest this call paused (non-live) needs `cont`. A source in
    /// `postmigrate`/`finish-migrate` has handed its guest over and is
    /// never resumed.
    async fn resume_after_failure(&self, qmp: &Qmp, name: &str, was_running: bool) {
        if !was_running {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match qmp.run(&commands::QueryStatus).await {
                Ok(s) if s.running => return,
                Ok(s) if s.status == RunState::Paused => {
                    if let Err(e) = qmp.run(&commands::Cont).await {
                        tracing::warn!(instance = %name, error = %e.report(), "cont after failed migration");
                    }
                }
                Ok(s) if s.status == RunState::Postmigrate => {
                    tracing::error!(instance = %name,
                        "the migration failed after the guest was handed over; not resuming it here");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(instance = %name, error = %e.report(), "cannot check the source after a failed migration");
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The migration's status now (a snapshot from `query-migrate`).
    pub async fn migration_status(&self, name: &str) -> Result<MigrationStatus> {
        let paths = self.paths(name)?;
        self.running_pid(&paths)?;
        let qmp = self.qmp(&paths).await?;
        let info = qmp
            .run(&commands::QueryMigrate)
            .await
            .map_err(qmp_err(name, "query-migrate"))?;
        Ok(MigrationStatus::from_info(&info))
    }

    /// Cancels the running migration of `name` (the source keeps running).
    pub async fn cancel_migration(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        self.running_pid(&paths)?;
        let qmp = self.qmp(&paths).await?;
        qmp.run(&commands::MigrateCancel)
            .await
            .map_err(qmp_err(name, "migrate_cancel"))
    }

    /// On the destination: waits until the incoming migration has landed
    /// (QEMU left `inmigrate`) or failed (QEMU exited), up to `timeout`.
    pub async fn wait_incoming(&self, name: &str, timeout: Duration) -> Result<()> {
        let paths = self.paths(name)?;
        let pid = self.running_pid(&paths)?;
        let qmp = self.watch_qmp(&paths).await?;
        let deadline = Instant::now() + timeout;
        loop {
            match qmp.run(&commands::QueryStatus).await {
                Ok(s) if s.status != RunState::Inmigrate => return Ok(()),
                Ok(_) => {}
                Err(_) if kvm_runtime::is_zombie_or_gone(pid) => {
                    return Err(Error::Migration {
                        instance: name.into(),
                        status: "failed".into(),
                        reason:
                            "the incoming QEMU exited (the migration stream broke or was refused)"
                                .into(),
                    })
                }
                Err(e) => return Err(qmp_err(name, "query-status")(e)),
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    instance: name.into(),
                    op: "incoming migration".into(),
                    after: timeout,
                });
            }
            let _ = qmp
                .wait_for_event(Duration::from_millis(100), |e| {
                    e.name == "MIGRATION" || e.name == "RESUME"
                })
                .await;
        }
    }

    /// On the destination: on success, configures the routed NICs (bridged
    /// ones were done at accept, as Ganeti does) and makes sure the guest
    /// runs; on failure, kills the incoming QEMU and removes its files.
    pub async fn finalize_migration_dst(
        &self,
        name: &str,
        outcome: MigrationOutcome,
    ) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        self.finalize_dst_locked(&paths, outcome).await
    }

    pub(crate) async fn finalize_dst_locked(
        &self,
        paths: &InstancePaths,
        outcome: MigrationOutcome,
    ) -> Result<()> {
        let name = paths.name.as_str();
        if outcome == MigrationOutcome::Failed {
            self.stop_locked(paths, StopMode::Force).await?;
            return Ok(());
        }
        self.running_pid(paths)?;
        let spec = self.saved_spec(paths)?.ok_or_else(|| Error::NotRunning {
            instance: name.into(),
        })?;
        let taps = paths.read_nics().map_err(|e| Error::Runtime {
            instance: name.into(),
            source: e,
        })?;
        for (i, (nic, tap)) in spec.nics.iter().zip(&taps).enumerate() {
            if nic.mode != kvm_cmdline::NicMode::Bridged {
                crate::nic::configure(&spec, i, tap, &self.config).await?;
            }
        }
        let qmp = self.qmp(paths).await?;
        let status = qmp
            .run(&commands::QueryStatus)
            .await
            .map_err(qmp_err(name, "query-status"))?;
        if status.status == RunState::Inmigrate {
            return Err(Error::Migration {
                instance: name.into(),
                status: "active".into(),
                reason: "the incoming migration has not finished".into(),
            });
        }
        // A non-live migration's guest arrives paused, as it left.
        if !status.running {
            qmp.run(&commands::Cont)
                .await
                .map_err(qmp_err(name, "cont"))?;
        }
        clear_marker(paths, INCOMING);
        Ok(())
    }

    /// On the source: on success, stops the (now idle) source QEMU and
    /// removes its files; on failure, makes sure the guest runs again —
    /// unless it was handed over ([`Error::HandedOver`]).
    pub async fn finalize_migration_source(
        &self,
        name: &str,
        outcome: MigrationOutcome,
    ) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        if outcome == MigrationOutcome::Completed {
            // If this process dies between the kill and the cleanup, the
            // record says why its QEMU is gone.
            if let Err(e) = set_marker(&paths, crate::lifecycle::HANDED_OVER, true) {
                tracing::warn!(instance = %name, error = %e.report(), "handed-over marker not written");
            }
            self.stop_locked(&paths, StopMode::Force).await?;
            return Ok(());
        }
        let pid = self.running_pid(&paths)?;
        let qmp = self.qmp(&paths).await?;
        let status = qmp
            .run(&commands::QueryStatus)
            .await
            .map_err(qmp_err(name, "query-status"))?;
        if !status.running {
            refuse_cont(name, pid, status.status)?;
            qmp.run(&commands::Cont)
                .await
                .map_err(qmp_err(name, "cont"))?;
        }
        Ok(())
    }
}

/// A listen address must be an IP address, and the port a real one.
fn check_listen(instance: &str, address: &str, port: u16) -> Result<()> {
    let bad = |reason: String| Error::Start {
        instance: instance.into(),
        step: "accept",
        reason,
    };
    if address.parse::<std::net::IpAddr>().is_err() {
        return Err(bad(format!(
            "{address:?} is not an IP address to listen on"
        )));
    }
    if port == 0 {
        return Err(bad("port 0 is not a port to listen on".into()));
    }
    Ok(())
}

/// What the destination itself says of an incoming instance (Ganeti's
/// configuration of it now, as its AcceptInstance has it): it decides
/// what may differ between nodes or change between starts, the migration
/// info file only the hardware the guest already has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CurrentConfig {
    #[serde(default)]
    /// The instance's hvparams now: keymap, password files, chroot and
    /// security model come from them
    /// ([`kvm_cmdline::HvParams::take_restart_safe`]).
    pub hvparams: kvm_cmdline::HvParams,
    /// The instance's disks as this node reaches them, in the guest's
    /// order, when this node knows them: each host path (and access mode)
    /// comes from here, not from the file, which must have as many disks.
    /// A disk here with neither path nor URI keeps the file's URI (QEMU's
    /// own network client, no host file), never a host path of the file's.
    /// `None`: the file's disks, as far as the file is trusted.
    #[serde(default)]
    pub disks: Option<Vec<crate::DiskSpec>>,
}

/// Puts this node's own storage under the incoming instance's disks (see
/// [`CurrentConfig::disks`]): the file keeps only where each disk sits in
/// the guest.
fn take_local_disks(spec: &mut crate::InstanceSpec, local: &[crate::DiskSpec]) -> Result<()> {
    let bad = |reason: String| Error::MigrationInfo {
        instance: spec.name.clone(),
        reason,
    };
    if local.len() != spec.disks.len() {
        return Err(bad(format!(
            "the file has {} disks, and this node's definition of the instance {}",
            spec.disks.len(),
            local.len()
        )));
    }
    let mut disks = spec.disks.clone();
    for (i, (disk, mine)) in disks.iter_mut().zip(local).enumerate() {
        if let (Some(a), Some(b)) = (&disk.uuid, &mine.uuid) {
            if a != b {
                return Err(bad(format!(
                    "disk {i} is {a} in the file and {b} in this node's definition"
                )));
            }
        }
        if mine.uri.is_some() || !mine.path.as_os_str().is_empty() {
            disk.path.clone_from(&mine.path);
            disk.uri.clone_from(&mine.uri);
        } else if disk.uri.is_none() {
            return Err(bad(format!(
                "disk {i}: the file names the host path {}, and this node's definition \
                 gives none (only a network URI may come from the file)",
                disk.path.display()
            )));
        }
        disk.mode = mine.mode;
        disk.template.clone_from(&mine.template);
    }
    spec.disks = disks;
    Ok(())
}

/// The instance a migration info file describes: its seal checked with
/// `key` (when given), then read as an instance definition or as a
/// runtime record (gkvm's or Ganeti's format). Pure: no node checks (see
/// [`KvmHypervisor::incoming_spec`]).
pub fn parse_migration_info(info: &str, key: Option<&[u8]>) -> Result<crate::InstanceSpec> {
    let body = crate::trust::unseal(key, info).map_err(|e| match e {
        Error::MigrationInfo { instance, reason } if instance == "(unknown)" => {
            Error::MigrationInfo {
                instance: claimed_name(info).unwrap_or(instance),
                reason,
            }
        }
        e => e,
    })?;
    match serde_json::from_str::<crate::InstanceSpec>(&body) {
        Ok(spec) => Ok(spec),
        Err(_) => spec_from_migration_record(&body),
    }
}

/// The instance a refused file names, unchecked (nothing vouches for it,
/// but an error that names it tells the operator which file it was), if
/// it names a valid one.
fn claimed_name(info: &str) -> Option<String> {
    let mut doc = serde_json::from_str::<serde_json::Value>(info).ok()?;
    if let Some(body) = doc.get("runtime").and_then(|r| r.as_str()) {
        doc = serde_json::from_str(body).ok()?;
    }
    let name = doc
        .get("name")
        .or_else(|| doc.get("payload")?.get("spec")?.get("name"))?
        .as_str()?;
    kvm_runtime::validate_name(name).ok()?;
    Some(name.to_owned())
}

/// The instance in a runtime record used as migration info (gkvm's or
/// Ganeti's format).
fn spec_from_migration_record(body: &str) -> Result<crate::InstanceSpec> {
    let bad = |reason: String| Error::MigrationInfo {
        instance: "(unknown)".into(),
        reason,
    };
    let record = RuntimeRecord::from_json(body.as_bytes(), std::path::Path::new("migration info"))
        .map_err(|e| bad(e.report()))?;
    let name = record
        .payload
        .get("spec")
        .and_then(|s| s.get("name"))
        .and_then(|n| n.as_str())
        .map(str::to_owned)
        .or_else(|| {
            // `-name NAME`, `-name NAME,debug-threads=on`, `-name guest=NAME,..`.
            let i = record.argv.iter().position(|a| a == "-name")?;
            let first = record.argv.get(i + 1)?.split(',').next()?;
            Some(first.strip_prefix("guest=").unwrap_or(first).to_owned())
        })
        .ok_or_else(|| bad("the runtime names no instance".into()))?;
    kvm_runtime::validate_name(&name).map_err(|e| bad(e.to_string()))?;
    let mut spec = spec_from_record(&name, &record, std::path::Path::new("migration info"))
        .map_err(|e| bad(e.report()))?;
    if let Some(machine) = record.payload.get("machine").and_then(|m| m.as_str()) {
        spec.hvparams.machine_version = machine.to_owned();
    }
    Ok(spec)
}

/// A blocking QMP connection for a guard's `Drop`, bounded by `timeout`.
pub(crate) fn blocking_qmp(
    paths: &InstancePaths,
    timeout: Duration,
) -> Option<gkvm_qmp::blocking::Qmp> {
    let options = gkvm_qmp::Options {
        connect_timeout: timeout.min(Duration::from_secs(2)),
        command_timeout: timeout,
        ..gkvm_qmp::Options::default()
    };
    gkvm_qmp::blocking::Qmp::connect(&paths.qmp, options).ok()
}

/// Cancels an outgoing migration still under way and waits (up to 10 s)
/// until QEMU says it has ended; nothing when none is under way.
pub(crate) fn cancel_and_wait_blocking(qmp: &mut gkvm_qmp::blocking::Qmp) {
    let under_way = |qmp: &mut gkvm_qmp::blocking::Qmp| {
        let status = qmp.run(&commands::QueryMigrate).ok().and_then(|m| m.status);
        !matches!(
            status.as_deref(),
            Some("completed" | "failed" | "cancelled" | "none") | None
        )
    };
    if !under_way(qmp) {
        return;
    }
    let _ = qmp.run(&commands::MigrateCancel);
    let deadline = Instant::now() + Duration::from_secs(10);
    while under_way(qmp) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// While a migration is in flight on the source: if the operation is
/// dropped, cancel it and resume the source — or, if the guest was handed
/// over meanwhile, finalize the source so it never runs again.
struct MigrationGuard {
    paths: InstancePaths,
    was_running: bool,
    qmp_timeout: Duration,
    armed: bool,
}

impl Drop for MigrationGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let name = self.paths.name.clone();
        tracing::warn!(instance = %name, "migration interrupted; cancelling it");
        let Some(mut qmp) = blocking_qmp(&self.paths, self.qmp_timeout) else {
            return;
        };
        let handed_over = |qmp: &mut gkvm_qmp::blocking::Qmp| {
            let migrated = qmp
                .run(&commands::QueryMigrate)
                .ok()
                .and_then(|m| m.status)
                .is_some_and(|s| s == "completed");
            let state = qmp.run(&commands::QueryStatus).ok().map(|s| s.status);
            migrated || state == Some(RunState::Postmigrate)
        };
        if !handed_over(&mut qmp) {
            cancel_and_wait_blocking(&mut qmp);
        }
        if handed_over(&mut qmp) {
            tracing::warn!(instance = %name, "the guest was handed over; finalizing the source");
            qmp.close();
            kill_and_clean_blocking(&self.paths);
            return;
        }
        if self.was_running {
            if let Ok(s) = qmp.run(&commands::QueryStatus) {
                if s.status == RunState::Paused {
                    let _ = qmp.run(&commands::Cont);
                }
            }
        }
        clear_marker(&self.paths, MIGRATING);
    }
}

/// Clears a transition marker; if that fails, `list` asks QEMU instead of
/// trusting the record, which is slower but still right.
fn clear_marker(paths: &InstancePaths, marker: &str) {
    if let Err(e) = set_marker(paths, marker, false) {
        tracing::warn!(instance = %paths.name, error = %e.report(), marker, "runtime record marker not cleared");
    }
}

/// While an incoming migration has not landed: if the operation fails or
/// is dropped, the waiting QEMU is killed and its files removed. A guest
/// that has landed is kept (it is the only copy now).
pub(crate) struct IncomingGuard {
    paths: InstancePaths,
    qmp_timeout: Duration,
}

impl IncomingGuard {
    /// A guard of `paths`' incoming QEMU.
    pub(crate) fn new(paths: &InstancePaths, qmp_timeout: Duration) -> IncomingGuard {
        IncomingGuard {
            paths: paths.clone(),
            qmp_timeout,
        }
    }
}

impl Drop for IncomingGuard {
    fn drop(&mut self) {
        let landed = blocking_qmp(&self.paths, self.qmp_timeout)
            .and_then(|mut q| q.run(&commands::QueryStatus).ok())
            .is_some_and(|s| s.status != RunState::Inmigrate);
        if landed {
            return;
        }
        tracing::warn!(instance = %self.paths.name, "incoming migration did not land; removing the waiting QEMU");
        kill_and_clean_blocking(&self.paths);
    }
}
