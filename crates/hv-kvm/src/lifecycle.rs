//! Starting, stopping, rebooting and cleaning up instances.

use std::time::Duration;

use gkvm_qmp::commands::RunState;
use gkvm_qmp::{commands, Options, Qmp};
use kvm_cmdline::hvparams::RebootBehavior;
use kvm_cmdline::HvParams;
use kvm_cmdline::InstanceSpec;
use kvm_runtime::{InstanceLock, InstancePaths, Liveness, RuntimeRecord};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::guard::RollbackGuard;
use crate::ops::{StartMode, StopMode};
use crate::types::StartReport;
use crate::{process, KvmHypervisor};

/// How a stop ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StopOutcome {
    /// The guest powered off after the ACPI power button.
    PoweredOff,
    /// The ACPI power button was pressed and not waited for (a timeout
    /// of zero, as Ganeti's non-forced stop: it polls, then forces).
    PowerButtonPressed,
    /// QEMU was killed.
    Killed,
    /// It was not running (stale files, if any, were removed).
    NotRunning,
}

/// Start-time choices beyond the instance definition.
#[derive(Debug, Clone, Default)]
pub(crate) struct StartOpts {
    /// Leave the vCPUs stopped.
    pub paused: bool,
    /// Wait for an incoming migration at this URI.
    pub incoming: Option<String>,
}

impl KvmHypervisor {
    pub(crate) fn paths(&self, name: &str) -> Result<InstancePaths> {
        self.config
            .run_dir
            .instance(name)
            .map_err(|e| Error::Runtime {
                instance: name.to_owned(),
                source: e,
            })
    }

    pub(crate) async fn lock(&self, paths: &InstancePaths) -> Result<InstanceLock> {
        self.lock_for(paths, self.config.lock_timeout).await
    }

    /// Takes the instance's lock, waiting up to `timeout`.
    pub(crate) async fn lock_for(
        &self,
        paths: &InstancePaths,
        timeout: Duration,
    ) -> Result<InstanceLock> {
        let p = paths.clone();
        let name = paths.name.clone();
        self.config.run_dir.ensure().map_err(|e| Error::Runtime {
            instance: name.clone(),
            source: e,
        })?;
        // Uncontended (the usual case): taken at once, without a thread hop.
        match p.lock(Duration::ZERO) {
            Err(kvm_runtime::Error::Busy { .. }) if !timeout.is_zero() => {}
            r => {
                return r.map_err(|e| Error::Runtime {
                    instance: name,
                    source: e,
                })
            }
        }
        tokio::task::spawn_blocking(move || p.lock(timeout))
            .await
            .map_err(|e| Error::Io {
                context: format!("locking instance {name}"),
                source: std::io::Error::other(e),
            })?
            .map_err(|e| Error::Runtime {
                instance: name,
                source: e,
            })
    }

    pub(crate) fn liveness(&self, paths: &InstancePaths) -> Result<Liveness> {
        paths.liveness().map_err(|e| Error::Runtime {
            instance: paths.name.clone(),
            source: e,
        })
    }

    pub(crate) async fn qmp(&self, paths: &InstancePaths) -> Result<Qmp> {
        self.qmp_at(&paths.name, &paths.qmp).await
    }

    /// A QMP connection on `socket` with this node's timeouts.
    pub(crate) async fn qmp_at(&self, instance: &str, socket: &std::path::Path) -> Result<Qmp> {
        let options = Options {
            connect_timeout: Duration::from_secs(5),
            command_timeout: self.config.qmp_timeout,
            ..Options::default()
        };
        Qmp::connect(socket, options).await.map_err(|e| {
            // "Not running" is only true if the process is gone too.
            let pid = self
                .paths(instance)
                .ok()
                .and_then(|p| p.liveness().ok())
                .and_then(|l| l.running_pid());
            let op = match (&e, pid) {
                (gkvm_qmp::Error::NotRunning { .. }, Some(pid)) => format!(
                    "connect to QMP (QEMU pid {pid} runs, but its socket is gone or refuses connections)"
                ),
                _ => "connect to QMP".into(),
            };
            Error::Qmp {
                instance: instance.to_owned(),
                op,
                source: e,
            }
        })
    }

    /// The runtime record of an instance that runs: [`Error::NotRunning`]
    /// when it has none.
    pub(crate) fn running_record(&self, paths: &InstancePaths) -> Result<RuntimeRecord> {
        paths
            .read_runtime()
            .map_err(|e| Error::Runtime {
                instance: paths.name.clone(),
                source: e,
            })?
            .ok_or_else(|| Error::NotRunning {
                instance: paths.name.clone(),
            })
    }

    /// The instance definition saved at start (for instances started by the
    /// Ganeti KVM driver: rebuilt from its runtime file and argv).
    pub(crate) fn saved_spec(&self, paths: &InstancePaths) -> Result<Option<InstanceSpec>> {
        let record = paths.read_runtime().map_err(|e| Error::Runtime {
            instance: paths.name.clone(),
            source: e,
        })?;
        record
            .map(|r| spec_from_record(&paths.name, &r, &paths.runtime))
            .transpose()
    }

    /// Starts an instance: validates it, creates its TAPs and configures
    /// them, starts QEMU (daemonized, stopped), sets VNC/SPICE passwords
    /// over QMP, pins vCPUs, balloons to the startup memory, saves its
    /// runtime file and resumes it unless [`StartMode::Paused`]. On any failure — or if
    /// this future is dropped (SIGINT, a timeout) — everything created is
    /// removed and the error names the step. Leftovers of a start that was
    /// SIGKILLed (a QEMU that never ran its guest) are removed first.
    pub async fn start(&self, spec: &InstanceSpec, mode: StartMode) -> Result<StartReport> {
        check_spec(spec)?;
        let paths = self.paths(&spec.name)?;
        let _lock = self.lock(&paths).await?;
        self.start_locked(
            spec,
            &paths,
            StartOpts {
                paused: mode == StartMode::Paused,
                incoming: None,
            },
        )
        .await
    }

    pub(crate) async fn start_locked(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        opts: StartOpts,
    ) -> Result<StartReport> {
        check_spec(spec)?;
        self.reconcile_before_start(paths).await?;
        let mut guard = RollbackGuard::new(paths, "start");
        let report = self.start_steps(spec, paths, &opts, &guard).await?;
        guard.disarm();
        Ok(report)
    }

    /// Under the instance's lock, before a start: a running instance is
    /// refused (with why, when it was migrated away), one that a killed
    /// gkvm left half-started is removed, stale files are cleared.
    async fn reconcile_before_start(&self, paths: &InstancePaths) -> Result<()> {
        let name = &paths.name;
        // A save whose gkvm was killed: its guest runs on (then the start
        // is refused below), or is in its file (then its QEMU is gone).
        match self.settle_interrupted_save(paths).await {
            Ok(()) | Err(Error::NotRunning { .. }) => {}
            Err(e) => return Err(e),
        }
        match self.liveness(paths)? {
            Liveness::Running { pid } => match self.condition(paths, pid).await {
                Condition::HalfStarted => {
                    tracing::warn!(instance = %name, pid,
                        "removing a QEMU left half-started by an interrupted gkvm");
                    self.kill(paths, pid).await?;
                    self.clear_state(paths)
                }
                // `user_shutdown`: the guest powered itself off and QEMU
                // waited; a start replaces that QEMU (as Ganeti 3.1 does).
                Condition::Live(RunState::Shutdown) => {
                    tracing::info!(instance = %name, pid,
                        "the guest had shut down; replacing its QEMU");
                    self.kill(paths, pid).await?;
                    self.clear_state(paths)
                }
                Condition::MigratedAway => Err(Error::HandedOver {
                    instance: name.clone(),
                    pid,
                }),
                _ => Err(Error::AlreadyRunning {
                    instance: name.clone(),
                    pid,
                }),
            },
            // Stale, no pid file, or anything a newer kvm-runtime adds: no QEMU.
            _ => self.clear_state(paths),
        }
    }

    /// What a running QEMU of this instance is, beyond "a process".
    pub(crate) async fn condition(&self, paths: &InstancePaths, pid: i32) -> Condition {
        let record = paths.read_runtime().ok().flatten();
        let starting = record.as_ref().is_some_and(is_starting);
        let status = match self.qmp(paths).await {
            Ok(qmp) => qmp.run(&commands::QueryStatus).await.ok(),
            Err(_) => None,
        };
        let state = status.map(|s| s.status);
        tracing::debug!(instance = %paths.name, pid, starting, ?state, "condition");
        match state {
            // The guest never ran: a start that did not finish.
            _ if starting => Condition::HalfStarted,
            Some(RunState::Prelaunch) if record.is_none() => Condition::HalfStarted,
            Some(RunState::Postmigrate) => Condition::MigratedAway,
            Some(RunState::FinishMigrate) => Condition::MigratingAway,
            Some(RunState::Inmigrate) => Condition::Incoming,
            Some(s) => Condition::Live(s),
            None => Condition::Unknown,
        }
    }

    /// Stops an instance: gracefully (ACPI power button, then wait up to
    /// `timeout` for QEMU to exit) or by force (kill), then cleans up.
    /// A graceful stop that times out leaves the instance running and
    /// returns [`Error::Timeout`]; an instance without ACPI is killed.
    /// A forced stop does not queue behind another operation: if the lock
    /// is held (a graceful stop waiting for the guest, a hung start), it
    /// kills QEMU first — which ends that operation — then takes the lock
    /// and cleans up.
    pub async fn stop(&self, name: &str, mode: StopMode) -> Result<StopOutcome> {
        let paths = self.paths(name)?;
        if mode == StopMode::Force {
            match self.lock_for(&paths, Duration::from_millis(100)).await {
                Ok(_lock) => return self.stop_locked(&paths, mode).await,
                Err(Error::Runtime {
                    source: kvm_runtime::Error::Busy { .. },
                    ..
                }) => {
                    let killed = self.preempt(&paths).await?;
                    let _lock = self.lock(&paths).await?;
                    let outcome = self.stop_locked(&paths, mode).await?;
                    return Ok(if killed { StopOutcome::Killed } else { outcome });
                }
                Err(e) => return Err(e),
            }
        }
        let _lock = self.lock(&paths).await?;
        self.stop_locked(&paths, mode).await
    }

    /// Kills the instance's QEMU without its lock (a forced stop's right).
    async fn preempt(&self, paths: &InstancePaths) -> Result<bool> {
        match self.liveness(paths)? {
            Liveness::Running { pid } => {
                tracing::info!(instance = %paths.name, pid,
                    "another operation holds the lock; killing QEMU to preempt it");
                self.kill(paths, pid).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub(crate) async fn stop_locked(
        &self,
        paths: &InstancePaths,
        mode: StopMode,
    ) -> Result<StopOutcome> {
        let name = &paths.name;
        let pid = match self.liveness(paths)? {
            Liveness::Running { pid } => pid,
            _ => {
                self.cleanup_files(paths)?;
                return Ok(StopOutcome::NotRunning);
            }
        };
        let spec = self.saved_spec(paths).ok().flatten();
        let acpi = spec.as_ref().map(|s| s.hvparams.acpi).unwrap_or(true);
        let kept = spec.as_ref().is_some_and(|s| s.hvparams.user_shutdown);
        let timeout = match mode {
            StopMode::Acpi { timeout } if acpi => Some(timeout),
            _ => None,
        };
        // `user_shutdown`: a QEMU whose guest already shut down waits for
        // nothing more; it ends at once, whatever the mode.
        if kept && timeout.is_some() && self.guest_has_shut_down(paths, pid).await {
            tracing::info!(instance = %name, pid, "the guest had shut down; ending its QEMU");
            self.kill(paths, pid).await?;
            self.cleanup_files(paths)?;
            return Ok(StopOutcome::PoweredOff);
        }
        let outcome = if let Some(timeout) = timeout {
            let qmp = self.qmp(paths).await?;
            if kept {
                // An administrator's stop ends QEMU when the guest powers
                // off (QEMU was started with -no-shutdown to keep it after
                // the guest's own poweroff): as Ganeti's kvmd tells the
                // two apart by the power button, so does QEMU's event log.
                if let Err(e) = qmp
                    .run(&commands::SetAction {
                        shutdown: Some("poweroff".into()),
                        ..Default::default()
                    })
                    .await
                {
                    tracing::warn!(instance = %name, error = %e,
                        "set-action shutdown=poweroff failed; QEMU will stay after the guest powers off");
                }
            }
            qmp.run(&commands::SystemPowerdown)
                .await
                .map_err(|e| Error::Qmp {
                    instance: name.clone(),
                    op: "system_powerdown".into(),
                    source: e,
                })?;
            drop(qmp);
            if timeout.is_zero() {
                tracing::info!(instance = %name, "power button pressed; not waiting");
                return Ok(StopOutcome::PowerButtonPressed);
            }
            if !process::wait_exit(pid, timeout).await {
                return Err(Error::Timeout {
                    instance: name.clone(),
                    op: "graceful stop (the guest did not power off; use force)".into(),
                    after: timeout,
                });
            }
            // QEMU ended; the guest powered off only if its log says so
            // (a forced stop may have killed it meanwhile).
            if crate::events::answered_power_button(paths) == Some(false) {
                tracing::info!(instance = %name, "QEMU ended before the guest powered off (killed)");
                StopOutcome::Killed
            } else {
                StopOutcome::PoweredOff
            }
        } else {
            self.kill(paths, pid).await?;
            StopOutcome::Killed
        };
        self.cleanup_files(paths)?;
        tracing::info!(instance = %name, ?outcome, "stopped");
        Ok(outcome)
    }

    /// Whether QEMU says its guest shut down (QEMU kept by `user_shutdown`).
    async fn guest_has_shut_down(&self, paths: &InstancePaths, pid: i32) -> bool {
        matches!(
            self.condition(paths, pid).await,
            Condition::Live(RunState::Shutdown)
        )
    }

    pub(crate) async fn kill(&self, paths: &InstancePaths, pid: i32) -> Result<()> {
        process::kill_instance(pid, paths).map_err(|e| Error::Io {
            context: format!("killing instance {} (pid {pid})", paths.name),
            source: e,
        })?;
        tracing::debug!(instance = %paths.name, pid, "SIGKILL sent");
        let exited = process::wait_exit(pid, Duration::from_secs(10)).await;
        tracing::debug!(instance = %paths.name, pid, exited, "waited for exit");
        if !exited {
            return Err(Error::Timeout {
                instance: paths.name.clone(),
                op: format!("exit after SIGKILL (pid {pid})"),
                after: Duration::from_secs(10),
            });
        }
        Ok(())
    }

    /// Tears down the NICs an instance had (down script or native undo,
    /// see [`crate::nic::deconfigure`]) and removes its files.
    pub(crate) fn cleanup_files(&self, paths: &InstancePaths) -> Result<()> {
        self.teardown_nics(paths);
        paths.cleanup().map(|_| ()).map_err(|e| Error::Runtime {
            instance: paths.name.clone(),
            source: e,
        })
    }

    /// Runs the NIC teardown of each TAP the run dir records for the
    /// instance, from its saved definition.
    fn teardown_nics(&self, paths: &InstancePaths) {
        let Ok(taps) = paths.read_nics() else {
            return;
        };
        let Ok(Some(spec)) = self.saved_spec(paths) else {
            return;
        };
        for (i, tap) in taps.iter().enumerate() {
            crate::nic::deconfigure(&spec, i, tap, self.config.nic_down_script.as_deref());
        }
        self.teardown_journal(paths, &spec, &taps);
    }

    /// Clears leftovers but keeps the (held) lock file.
    pub(crate) fn clear_state(&self, paths: &InstancePaths) -> Result<()> {
        paths.clear_state().map(|_| ()).map_err(|e| Error::Runtime {
            instance: paths.name.clone(),
            source: e,
        })
    }

    /// Removes what an instance left behind (pid file, sockets, runtime
    /// file, NIC records, uid...). A QEMU that holds no guest of its own —
    /// a start interrupted before the guest ran, a source whose migration
    /// completed, a destination still waiting for its migration, one whose
    /// guest shut down (`user_shutdown`) — is killed first; an instance
    /// whose guest runs here is refused.
    pub async fn cleanup(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        if let Liveness::Running { pid } = self.liveness(&paths)? {
            match self.condition(&paths, pid).await {
                Condition::HalfStarted
                | Condition::MigratedAway
                | Condition::Incoming
                | Condition::Live(RunState::Shutdown) => {
                    tracing::info!(instance = %name, pid, "cleanup: killing a QEMU without a guest of its own");
                    self.kill(&paths, pid).await?;
                }
                _ => {
                    return Err(Error::AlreadyRunning {
                        instance: name.to_owned(),
                        pid,
                    })
                }
            }
        }
        self.cleanup_files(&paths)
    }

    /// Reboots an instance. With `reboot_behavior=reboot` the machine is
    /// reset in place (QMP `system_reset`); with `exit` QEMU runs with
    /// `-no-reboot`, so it is stopped and started again from its saved
    /// definition, as Ganeti does.
    pub async fn reboot(&self, name: &str) -> Result<()> {
        self.reboot_with(name, None).await
    }

    /// [`Self::reboot`], where a restart (`reboot_behavior=exit`) takes
    /// the parameters that may change between starts from `current` (the
    /// cluster's configuration now: keymap, password files, chroot,
    /// security model and domain) and everything else from the running
    /// instance, as Ganeti 3.1 does.
    pub async fn reboot_with(&self, name: &str, current: Option<&HvParams>) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        self.running_pid(&paths)?;
        let spec = self.saved_spec(&paths)?;
        match spec {
            Some(mut spec) if spec.hvparams.reboot_behavior == RebootBehavior::Exit => {
                if let Some(current) = current {
                    spec.hvparams.take_restart_safe(current);
                    check_spec(&spec)?;
                }
                self.stop_locked(&paths, StopMode::Force).await?;
                self.start_locked(&spec, &paths, StartOpts::default())
                    .await
                    .map(|_| ())
            }
            _ => {
                let qmp = self.qmp(&paths).await?;
                qmp.run(&commands::SystemReset)
                    .await
                    .map_err(|e| Error::Qmp {
                        instance: name.into(),
                        op: "system_reset".into(),
                        source: e,
                    })
            }
        }
    }

    /// Resumes a paused instance (`cont`). Refused for a source whose
    /// migration completed or is completing (the guest lives on the
    /// destination) and for a destination still waiting for its migration.
    pub async fn resume(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        // A save its gkvm did not finish: settled first (the guest may run
        // on by now, or be in its file).
        self.settle_interrupted_save(&paths).await?;
        let pid = self.running_pid(&paths)?;
        let qmp = self.qmp(&paths).await?;
        let status = qmp
            .run(&commands::QueryStatus)
            .await
            .map_err(|e| Error::Qmp {
                instance: name.into(),
                op: "query-status".into(),
                source: e,
            })?;
        refuse_cont(name, pid, status.status)?;
        qmp.run(&commands::Cont).await.map_err(|e| Error::Qmp {
            instance: name.into(),
            op: "cont".into(),
            source: e,
        })?;
        set_marker(&paths, PAUSED, false).map_err(|e| Error::Runtime {
            instance: name.into(),
            source: e,
        })
    }

    /// Sets the balloon target to `mib` MiB (between 1 MiB and the
    /// instance's memory).
    pub async fn balloon(&self, name: &str, mib: u64) -> Result<()> {
        let paths = self.paths(name)?;
        let pid = self.running_pid(&paths)?;
        let memory = match self.saved_spec(&paths).ok().flatten() {
            Some(spec) if spec.memory > 0 => spec.memory,
            _ => crate::query::cmdline_resources(pid).0,
        };
        let bytes = mib.checked_mul(1 << 20).filter(|_| mib >= 1);
        let bytes = match bytes {
            Some(b) if memory == 0 || mib <= memory => b,
            _ => {
                return Err(Error::Params {
                    instance: name.into(),
                    source: kvm_cmdline::Error::Instance {
                        instance: name.into(),
                        field: "balloon".into(),
                        reason: format!(
                            "target {mib} MiB is not between 1 MiB and the instance's memory ({memory} MiB)"
                        ),
                    },
                })
            }
        };
        self.simple_command(name, "balloon", &commands::Balloon { value: bytes })
            .await
    }

    pub(crate) fn running_pid(&self, paths: &InstancePaths) -> Result<i32> {
        match self.liveness(paths)? {
            Liveness::Running { pid } => Ok(pid),
            _ => Err(Error::NotRunning {
                instance: paths.name.clone(),
            }),
        }
    }

    async fn simple_command<C: commands::Command<Output = ()>>(
        &self,
        name: &str,
        op: &str,
        cmd: &C,
    ) -> Result<()> {
        let paths = self.paths(name)?;
        self.running_pid(&paths)?;
        let qmp = self.qmp(&paths).await?;
        qmp.run(cmd).await.map_err(|e| Error::Qmp {
            instance: name.into(),
            op: op.into(),
            source: e,
        })
    }
}

/// The instance definition kept in a runtime record, or one rebuilt from a
/// Ganeti KVM driver's record (its argv and hvparams).
/// The instance a runtime record describes: gkvm's own spec, or, for a
/// file Ganeti's driver wrote, its argv's memory and vCPUs, its hvparams,
/// NICs and disks (with Ganeti 3.1's device places). A NIC or disk that
/// cannot be read is an error naming it (`source` names the file): starting
/// without it would lose it silently.
pub(crate) fn spec_from_record(
    name: &str,
    r: &RuntimeRecord,
    source: &std::path::Path,
) -> Result<InstanceSpec> {
    let corrupt = |reason: String| Error::Runtime {
        instance: name.to_owned(),
        source: kvm_runtime::Error::Corrupt {
            path: source.to_owned(),
            reason,
        },
    };
    // gkvm's own record has the definition; one that does not parse was
    // tampered with or written by another gkvm: an error, never a guess
    // rebuilt from the argv (which would lose what only the spec has).
    if let Some(spec) = r.payload.get("spec") {
        return InstanceSpec::deserialize(spec)
            .map_err(|e| corrupt(format!("its instance definition (\"spec\"): {e}")));
    }
    // Ganeti's own runtime: rebuilt from its parts.
    let (memory, vcpus) = crate::query::argv_resources(&r.argv);
    let mut spec = InstanceSpec::new(name, memory);
    spec.vcpus = vcpus;
    // Keys this build knows; anything else from another Ganeti version is ignored.
    let known = kvm_cmdline::HvParams::keys();
    for (k, v) in &r.hvparams {
        if known.contains(k) {
            let _ = spec.hvparams.set(k, v.clone());
        }
    }
    spec.nics = crate::ganeti_runtime::nics(&r.nics).map_err(corrupt)?;
    spec.disks = crate::ganeti_runtime::disks(&r.disks).map_err(corrupt)?;
    spec.network_port = crate::ganeti_runtime::network_port(&r.argv);
    // A runtime gkvm handed to Ganeti's driver (a rollback, a migration
    // in a mixed cluster) keeps gkvm's lean machine: without it the
    // default devices would move the guest's own (its balloon to another
    // slot) and its migration would not load.
    if r.argv.iter().any(|a| a == "-nodefaults") {
        spec.layout = Some(kvm_cmdline::Layout::Lean);
    }
    Ok(spec)
}

/// Checks an instance definition before anything is created for it.
pub(crate) fn check_spec(spec: &InstanceSpec) -> Result<()> {
    let params = |e| Error::Params {
        instance: spec.name.clone(),
        source: e,
    };
    spec.validate().map_err(params)?;
    spec.hvparams.check_syntax().map_err(params)
}

/// Refuses `cont` where it would run a second copy of a guest, or run a
/// guest that has not arrived.
pub(crate) fn refuse_cont(name: &str, pid: i32, state: RunState) -> Result<()> {
    match state {
        RunState::Postmigrate | RunState::FinishMigrate => Err(Error::HandedOver {
            instance: name.into(),
            pid,
        }),
        RunState::Inmigrate => Err(Error::Migration {
            instance: name.into(),
            status: "incoming".into(),
            reason: "the guest has not arrived yet; it starts by itself when its migration lands"
                .into(),
        }),
        _ => Ok(()),
    }
}

/// What a running QEMU of an instance is, beyond "a process".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Condition {
    /// A start that never finished (its gkvm was killed): the guest never
    /// ran, so the QEMU may be removed.
    HalfStarted,
    /// Its migration completed (QMP `postmigrate`): the guest runs on the
    /// destination now and must never run here again.
    MigratedAway,
    /// Its migration is in its final stage (`finish-migrate`).
    MigratingAway,
    /// Waiting for an incoming migration (`inmigrate`): no guest yet.
    Incoming,
    /// Anything else QEMU says.
    Live(RunState),
    /// QEMU does not answer.
    Unknown,
}

const STARTING: &str = "starting";
/// Marks the record of a source while its migration is in flight.
pub(crate) const MIGRATING: &str = "migrating";
/// Marks the record of a destination until its guest has landed.
pub(crate) const INCOMING: &str = "incoming";
/// Marks the record of an instance started paused, until `resume`.
pub(crate) const PAUSED: &str = "paused";
/// A source whose migration completed, being stopped: once its QEMU is
/// gone the record is leftover to clean up, not a crash.
pub(crate) const HANDED_OVER: &str = "handed-over";

/// Whether a runtime record carries `marker` (see [`set_marker`]).
pub(crate) fn has_marker(record: &RuntimeRecord, marker: &str) -> bool {
    record.payload.get(marker) == Some(&serde_json::Value::Bool(true))
}

/// Sets or clears a marker in the saved runtime record (under the
/// instance's lock): `list` reads markers instead of asking QEMU, and asks
/// QEMU only about an instance whose record says it is in transition.
pub(crate) fn set_marker(
    paths: &InstancePaths,
    marker: &str,
    on: bool,
) -> std::result::Result<(), kvm_runtime::Error> {
    let Some(mut record) = paths.read_runtime()? else {
        return Ok(());
    };
    if !mark(&mut record, marker, on) {
        return Ok(());
    }
    paths.write_runtime(&record)
}

/// Sets or clears `marker` in a record in memory; returns whether that
/// changed it.
pub(crate) fn mark(record: &mut RuntimeRecord, marker: &str, on: bool) -> bool {
    let Some(obj) = record.payload.as_object_mut() else {
        return false;
    };
    if on {
        obj.insert(marker.into(), serde_json::Value::Bool(true))
            != Some(serde_json::Value::Bool(true))
    } else {
        obj.remove(marker).is_some()
    }
}

/// Whether a runtime record marks a start that has not finished.
pub(crate) fn is_starting(record: &RuntimeRecord) -> bool {
    has_marker(record, STARTING)
}

pub(crate) fn set_starting(record: &mut RuntimeRecord, starting: bool) {
    mark(record, STARTING, starting);
}

/// The runtime record of an instance started with `cmd`.
pub(crate) fn runtime_record(
    spec: &InstanceSpec,
    cmd: &kvm_cmdline::QemuCommand,
    caps: &kvm_cmdline::Capabilities,
    taps: &[String],
) -> RuntimeRecord {
    // The instance once, as its definition in the payload (hot plug keeps
    // it current); the NIC, hvparam and disk lists are Ganeti's parts of
    // a record, left empty in gkvm's own.
    RuntimeRecord {
        argv: cmd.argv.clone(),
        nics: Vec::new(),
        hvparams: serde_json::Map::new(),
        disks: Vec::new(),
        payload: serde_json::json!({
            "spec": spec,
            "machine": cmd.machine,
            "taps": taps,
            "qemu_version": caps.version.text,
        }),
        origin: Default::default(),
    }
}

pub(crate) fn read_password(file: &std::path::Path) -> std::result::Result<String, String> {
    let cannot = |e: String| format!("cannot read {}: {e}", file.display());
    let f = std::fs::File::open(file).map_err(|e| cannot(e.to_string()))?;
    let data =
        kvm_runtime::fsutil::read_open_capped(f, file, 4096).map_err(|e| cannot(e.report()))?;
    let text = String::from_utf8(data).map_err(|_| cannot("not UTF-8 text".into()))?;
    let line = text.lines().next().unwrap_or("").to_owned();
    if line.is_empty() {
        return Err(format!("{} holds no password", file.display()));
    }
    Ok(line)
}

pub(crate) fn pin_vcpus(
    pid: i32,
    mask: &kvm_cmdline::CpuMask,
    cpus: &[commands::CpuInfoFast],
) -> std::result::Result<(), String> {
    if mask.sets().len() == 1 {
        // One set for the whole VM: every thread of QEMU.
        if let Some(set) = mask.for_vcpu(0) {
            for tid in process::threads(pid) {
                process::set_affinity(tid, set)
                    .map_err(|e| format!("cpu_mask {mask}: thread {tid}: {e}"))?;
            }
        }
        return Ok(());
    }
    if mask.sets().len() != cpus.len() {
        return Err(format!(
            "cpu_mask {mask} has {} sets but QEMU runs {} vCPUs",
            mask.sets().len(),
            cpus.len()
        ));
    }
    for cpu in cpus {
        if let Some(set) = mask.for_vcpu(cpu.cpu_index as usize) {
            process::set_affinity(
                i32::try_from(cpu.thread_id).map_err(|_| {
                    format!(
                        "vCPU {}: thread id {} out of range",
                        cpu.cpu_index, cpu.thread_id
                    )
                })?,
                set,
            )
            .map_err(|e| format!("cpu_mask {mask}: vCPU {}: {e}", cpu.cpu_index))?;
        }
    }
    Ok(())
}

/// Host facts from the real system.
pub(crate) struct RealHost;

impl kvm_cmdline::HostFacts for RealHost {
    fn is_file(&self, path: &std::path::Path) -> bool {
        path.is_file()
    }
    fn is_dir(&self, path: &std::path::Path) -> bool {
        path.is_dir()
    }
    fn user_exists(&self, name: &str) -> bool {
        nix::unistd::User::from_name(name).ok().flatten().is_some()
    }
    fn interface_exists(&self, name: &str) -> bool {
        gkvm_tap::interface_exists(name)
    }
    fn vhost_net_available(&self) -> bool {
        crate::vhost_net_available()
    }
}

impl KvmHypervisor {
    /// Leaves running instance `name` to Ganeti 3.1's own KVM driver — a
    /// node rolled back from gkvm (`integrations/ganeti/install
    /// --uninstall`) — without restarting its guest: a hot plug a killed
    /// gkvm left is settled, the runtime file is rewritten in the driver's
    /// format (the command line QEMU runs, less what the driver adds
    /// itself; NICs and disks, hot-plugged ones included, with the device
    /// ids and slots they have), and the files only gkvm keeps (event log,
    /// lock) are removed. An instance in a migration, or one that never
    /// finished starting, is refused.
    pub async fn release_to_ganeti(&self, name: &str) -> Result<()> {
        self.settle_hotplug(name).await?;
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        let pid = self.running_pid(&paths)?;
        let state = match self.condition(&paths, pid).await {
            Condition::Live(state) => state,
            other => {
                return Err(Error::Release {
                    instance: name.to_owned(),
                    reason: format!(
                        "it is not simply running ({other:?}): a start or migration is not finished"
                    ),
                })
            }
        };
        let runtime = |e| Error::Runtime {
            instance: name.to_owned(),
            source: e,
        };
        let record = self.running_record(&paths)?;
        let record = self.ganeti_record(&paths, pid, record).await?;
        paths.release_to_ganeti(&record).map_err(runtime)?;
        tracing::info!(instance = %name, pid, ?state, "handed over to Ganeti's own KVM driver");
        Ok(())
    }

    /// The runtime record of running instance `paths` (QEMU `pid`) as
    /// Ganeti 3.1's KVM driver writes it (see
    /// [`Self::release_to_ganeti`]); one of Ganeti's stays as it is.
    pub(crate) async fn ganeti_record(
        &self,
        paths: &InstancePaths,
        pid: i32,
        record: kvm_runtime::RuntimeRecord,
    ) -> Result<kvm_runtime::RuntimeRecord> {
        let name = paths.name.as_str();
        Ok(if record.origin == kvm_runtime::Origin::Ganeti {
            record
        } else {
            let spec = spec_from_record(name, &record, &paths.runtime)?;
            let hv = &spec.hvparams;
            if hv.firmware != kvm_cmdline::hvparams::Firmware::Bios {
                // Ganeti's driver boots BIOS only: it would start the guest
                // on other hardware, without its variable store.
                return Err(Error::MigrationInfo {
                    instance: name.to_owned(),
                    reason: format!(
                        "it boots UEFI (firmware={}), which Ganeti 3.1's own KVM driver \
                         cannot run",
                        hv.firmware.as_str()
                    ),
                });
            }
            // Nor has it root ports on q35, or these devices: its QEMU
            // would not take the guest's state for them.
            if spec.pcie_slots == Some(kvm_cmdline::PcieSlots::RootPorts)
                && record
                    .payload
                    .get("machine")
                    .and_then(|m| m.as_str())
                    .is_some_and(|m| m.contains("q35"))
            {
                return Err(Error::MigrationInfo {
                    instance: name.to_owned(),
                    reason: "its q35 machine has PCI Express root ports for hot plug, which \
                             Ganeti 3.1's own KVM driver does not make"
                        .into(),
                });
            }
            // Nor these devices.
            for (key, value, none) in [
                ("rng", hv.rng.as_str(), "none"),
                ("watchdog", hv.watchdog.as_str(), "none"),
            ] {
                if value != none {
                    return Err(Error::MigrationInfo {
                        instance: name.to_owned(),
                        reason: format!(
                            "it has a device Ganeti 3.1's own KVM driver does not know \
                             ({key}={value})"
                        ),
                    });
                }
            }
            let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map_err(|e| Error::Io {
                    context: format!("reading the command line of instance {name} (pid {pid})"),
                    source: e,
                })?
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let qmp = self.qmp(paths).await?;
            let mut drivers = std::collections::HashMap::new();
            let ids = spec
                .nics
                .iter()
                .filter_map(|n| n.address.as_ref())
                .chain(spec.disks.iter().filter_map(|d| d.address.as_ref()));
            for a in ids {
                let ty = qmp
                    .run(&commands::QomGet {
                        path: format!("/machine/peripheral/{}", a.id),
                        property: "type".into(),
                    })
                    .await
                    .map_err(|e| Error::Qmp {
                        instance: name.to_owned(),
                        op: format!("qom-get {} type", a.id),
                        source: e,
                    })?;
                if let Some(ty) = ty.as_str() {
                    drivers.insert(a.id.clone(), ty.to_owned());
                }
            }
            // A record Ganeti wrote keeps all of Ganeti's hvparams (keys
            // gkvm does not know among them); gkvm's has its definition's.
            let hvparams = if record.hvparams.is_empty() {
                // Ganeti's 65 keys only (gkvm's own mean nothing there).
                let mut map = spec.hvparams.to_map();
                for key in kvm_cmdline::GKVM_HVPARAMS {
                    map.remove(key);
                }
                map
            } else {
                record.hvparams.clone()
            };
            crate::ganeti_runtime::to_ganeti(&spec, &hvparams, &argv, &drivers)
        })
    }
}
