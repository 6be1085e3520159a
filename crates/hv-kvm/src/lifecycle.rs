//! Starting, stopping, rebooting and cleaning up instances.

use std::time::Duration;

use gkvm_qmp::{commands, Options, Qmp};
use kvm_cmdline::hvparams::{RebootBehavior, SecurityModel};
use kvm_cmdline::{InstanceSpec, Launch, NicBackend};
use kvm_runtime::{InstanceLock, InstancePaths, Liveness, RuntimeRecord};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::StartReport;
use crate::{node_paths, process, KvmHypervisor};

/// How a stop ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// The guest powered off after the ACPI power button.
    PoweredOff,
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
        let p = paths.clone();
        let timeout = self.config.lock_timeout;
        let name = paths.name.clone();
        self.config.run_dir.ensure().map_err(|e| Error::Runtime {
            instance: name.clone(),
            source: e,
        })?;
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
        Qmp::connect(socket, options).await.map_err(|e| Error::Qmp {
            instance: instance.to_owned(),
            op: "connect to QMP".into(),
            source: e,
        })
    }

    /// The instance definition saved at start (for instances started by the
    /// seed driver: rebuilt from its runtime file and argv).
    pub(crate) fn saved_spec(&self, paths: &InstancePaths) -> Result<Option<InstanceSpec>> {
        let record = paths.read_runtime().map_err(|e| Error::Runtime {
            instance: paths.name.clone(),
            source: e,
        })?;
        Ok(record.map(|r| spec_from_record(&paths.name, &r)))
    }

    /// Starts an instance: validates it, creates its TAPs and configures
    /// them, starts QEMU (daemonized, stopped), sets VNC/SPICE passwords
    /// over QMP, pins vCPUs, balloons to the startup memory, resumes it
    /// unless `paused`, and saves its runtime file. On any failure,
    /// everything created is removed and the error names the step.
    pub async fn start(&self, spec: &InstanceSpec, paused: bool) -> Result<StartReport> {
        let paths = self.paths(&spec.name)?;
        let _lock = self.lock(&paths).await?;
        self.start_locked(
            spec,
            &paths,
            StartOpts {
                paused,
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
        let params = |e| Error::Params {
            instance: spec.name.clone(),
            source: e,
        };
        spec.validate().map_err(params)?;
        spec.hvparams.check_syntax().map_err(params)?;
        match self.liveness(paths)? {
            Liveness::Running { pid } => {
                return Err(Error::AlreadyRunning {
                    instance: spec.name.clone(),
                    pid,
                })
            }
            // Leftovers of an instance that died: clear them first.
            Liveness::Stale { .. } => {
                paths.cleanup().map_err(|e| Error::Runtime {
                    instance: spec.name.clone(),
                    source: e,
                })?;
            }
            Liveness::NoPidFile => {}
        }
        let mut pid = None;
        let result = self.start_steps(spec, paths, &opts, &mut pid).await;
        if result.is_err() {
            if let Some(pid) = pid {
                let _ = process::kill_instance(pid, &spec.name);
                process::wait_exit(pid, Duration::from_secs(10)).await;
            }
            if let Err(e) = paths.cleanup() {
                tracing::warn!(instance = %spec.name, error = %e, "cleanup after a failed start");
            }
        }
        result
    }

    async fn start_steps(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        opts: &StartOpts,
        pid_out: &mut Option<i32>,
    ) -> Result<StartReport> {
        let name = &spec.name;
        let params = |e| Error::Params {
            instance: name.clone(),
            source: e,
        };
        let step = |step: &'static str, reason: String| Error::Start {
            instance: name.clone(),
            step,
            reason,
        };
        let kvm_path = self.kvm_path_for(spec);
        let caps = self.capabilities(&kvm_path).await?;
        let mut spec = spec.clone();
        spec.hvparams.kvm_path = kvm_path;
        let hv = &spec.hvparams;
        hv.validate_host(&RealHost, &caps).map_err(params)?;
        let cmd = kvm_cmdline::build(&spec, &caps, &self.config.build_env).map_err(params)?;
        tracing::debug!(instance = %name, "argv built");

        let pool_user = if hv.security_model == SecurityModel::Pool {
            let pool = self.config.uid_pool.ok_or_else(|| {
                step(
                    "uid pool",
                    "security_model=pool but this node has no uid pool configured".into(),
                )
            })?;
            let run = self.config.run_dir.clone();
            let p = paths.clone();
            let lock_timeout = self.config.lock_timeout;
            let uid = tokio::task::spawn_blocking(move || pool.allocate(&run, &p, lock_timeout))
                .await
                .map_err(|e| step("uid pool", e.to_string()))?
                .map_err(|e| Error::Runtime {
                    instance: name.clone(),
                    source: e,
                })?;
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .ok_or_else(|| step("uid pool", format!("uid {uid} has no user name")))?;
            Some(user.name)
        } else {
            None
        };

        let virtio = hv.nic_type == kvm_cmdline::hvparams::NicType::Paravirtual
            && caps.features.virtio_net_pci;
        let taps = crate::nic::open_taps(&spec, &self.config.tap_template, virtio)?;
        for (i, tap) in taps.iter().enumerate() {
            let routed = spec.nics[i].mode != kvm_cmdline::NicMode::Bridged;
            // As the seed: an incoming instance's routed NICs wait for the
            // migration to finish (the source still owns the route).
            if opts.incoming.is_some() && routed {
                continue;
            }
            crate::nic::configure(&spec, i, tap.name(), self.config.nic_script.as_deref()).await?;
        }
        for (i, tap) in taps.iter().enumerate() {
            paths.write_nic(i, tap.name()).map_err(|e| Error::Runtime {
                instance: name.clone(),
                source: e,
            })?;
        }
        if let Some(content) = kvm_cmdline::keymap_file(hv, &caps) {
            paths.write_keymap(&content).map_err(|e| Error::Runtime {
                instance: name.clone(),
                source: e,
            })?;
        }
        if hv.use_chroot {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&paths.chroot)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| step("chroot", format!("{}: {e}", paths.chroot.display())))?;
        }

        let mut std_cmd = std::process::Command::new(&spec.hvparams.kvm_path);
        let nics: Vec<NicBackend> = taps
            .iter()
            .map(|t| NicBackend {
                tap_fds: t.pass_to_child(&mut std_cmd),
            })
            .collect();
        let launch = Launch {
            node: node_paths(paths),
            // Always stopped at first: pinning, ballooning and passwords come
            // before the guest runs (as the seed does).
            paused: true,
            daemonize: true,
            incoming: opts.incoming.clone(),
            nics,
            pool_user,
            vhost_net_available: crate::vhost_net_available(),
        };
        let argv = cmd.launch_argv(&spec, &caps, &launch).map_err(params)?;
        std_cmd
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut qemu = tokio::process::Command::from(std_cmd);
        qemu.kill_on_drop(true);
        tracing::debug!(instance = %name, argv = ?argv, "starting QEMU");
        let out = tokio::time::timeout(self.config.start_timeout, qemu.output())
            .await
            .map_err(|_| {
                step(
                    "spawn QEMU",
                    format!(
                        "QEMU did not finish initializing within {:?}",
                        self.config.start_timeout
                    ),
                )
            })?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::QemuMissing {
                    path: spec.hvparams.kvm_path.clone(),
                },
                _ => step("spawn QEMU", e.to_string()),
            })?;
        tracing::debug!(instance = %name, "QEMU initialized");
        // QEMU holds its own descriptors now; the interfaces live with it.
        let tap_names: Vec<String> = taps.iter().map(|t| t.name().to_owned()).collect();
        drop(taps);
        // The pid file exists as soon as QEMU started, even if it then failed.
        if let Ok(Some(pid)) = paths.read_pid() {
            *pid_out = Some(pid);
        }
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let msg: Vec<&str> = stderr
                .lines()
                .filter(|l| {
                    !l.contains("host doesn't support requested feature")
                        && !l.contains("failed to open module")
                })
                .collect();
            return Err(step(
                "spawn QEMU",
                format!("QEMU exited with {}: {}", out.status, msg.join("; ")),
            ));
        }
        let pid = match self.liveness(paths)? {
            Liveness::Running { pid } => pid,
            other => {
                return Err(step(
                    "spawn QEMU",
                    format!("QEMU is not running after its start ({other:?})"),
                ))
            }
        };
        *pid_out = Some(pid);

        let qmp = self
            .qmp(paths)
            .await
            .map_err(|e| step("QMP", e.to_string()))?;
        tracing::debug!(instance = %name, "QMP connected");
        let qmp_err = |op: &str, e: gkvm_qmp::Error| Error::Qmp {
            instance: name.clone(),
            op: op.to_owned(),
            source: e,
        };
        for (protocol, file) in [
            ("vnc", &hv.vnc_password_file),
            ("spice", &hv.spice_password_file),
        ] {
            if let Some(file) = file {
                let password = read_password(file).map_err(|e| step("password", e))?;
                qmp.run(&commands::SetPassword {
                    protocol: protocol.into(),
                    password,
                })
                .await
                .map_err(|e| qmp_err(&format!("set the {protocol} password"), e))?;
            }
        }
        if !hv.cpu_mask.is_all() {
            let cpus = qmp
                .run(&commands::QueryCpusFast)
                .await
                .map_err(|e| qmp_err("query-cpus-fast", e))?;
            pin_vcpus(pid, &hv.cpu_mask, &cpus).map_err(|e| step("CPU pinning", e))?;
        }
        if let Some(startup) = spec.startup_memory.filter(|&m| m < spec.memory) {
            qmp.run(&commands::Balloon {
                value: startup << 20,
            })
            .await
            .map_err(|e| qmp_err("balloon to startup memory", e))?;
        }
        let stay_paused = opts.paused || opts.incoming.is_some();
        if !stay_paused {
            qmp.run(&commands::Cont)
                .await
                .map_err(|e| qmp_err("cont", e))?;
        }
        qmp.close().await;
        tracing::debug!(instance = %name, "configured over QMP");

        let record = RuntimeRecord {
            argv: cmd.argv.clone(),
            nics: spec
                .nics
                .iter()
                .filter_map(|n| serde_json::to_value(n).ok())
                .collect(),
            hvparams: spec.hvparams.to_map(),
            disks: spec
                .disks
                .iter()
                .filter_map(|d| serde_json::to_value(d).ok())
                .collect(),
            payload: serde_json::json!({
                "spec": spec,
                "machine": cmd.machine,
                "taps": tap_names,
                "qemu_version": caps.version.text,
            }),
            origin: Default::default(),
        };
        paths.write_runtime(&record).map_err(|e| Error::Runtime {
            instance: name.clone(),
            source: e,
        })?;
        tracing::info!(instance = %name, pid, "started");
        Ok(StartReport {
            name: name.clone(),
            pid,
            taps: tap_names,
            machine: cmd.machine,
            paused: stay_paused,
        })
    }

    /// Stops an instance: gracefully (ACPI power button, then wait up to
    /// `timeout` for QEMU to exit) or by force (kill), then cleans up.
    /// A graceful stop that times out leaves the instance running and
    /// returns [`Error::Timeout`]; an instance without ACPI is killed.
    pub async fn stop(&self, name: &str, force: bool, timeout: Duration) -> Result<StopOutcome> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        self.stop_locked(&paths, force, timeout).await
    }

    pub(crate) async fn stop_locked(
        &self,
        paths: &InstancePaths,
        force: bool,
        timeout: Duration,
    ) -> Result<StopOutcome> {
        let name = &paths.name;
        let pid = match self.liveness(paths)? {
            Liveness::Running { pid } => pid,
            _ => {
                self.cleanup_files(paths)?;
                return Ok(StopOutcome::NotRunning);
            }
        };
        let acpi = self
            .saved_spec(paths)
            .ok()
            .flatten()
            .map(|s| s.hvparams.acpi)
            .unwrap_or(true);
        let outcome = if force || !acpi {
            self.kill(paths, pid).await?;
            StopOutcome::Killed
        } else {
            let qmp = self.qmp(paths).await?;
            qmp.run(&commands::SystemPowerdown)
                .await
                .map_err(|e| Error::Qmp {
                    instance: name.clone(),
                    op: "system_powerdown".into(),
                    source: e,
                })?;
            drop(qmp);
            if !process::wait_exit(pid, timeout).await {
                return Err(Error::Timeout {
                    instance: name.clone(),
                    op: "graceful stop (the guest did not power off; use force)".into(),
                    after: timeout,
                });
            }
            StopOutcome::PoweredOff
        };
        self.cleanup_files(paths)?;
        tracing::info!(instance = %name, ?outcome, "stopped");
        Ok(outcome)
    }

    pub(crate) async fn kill(&self, paths: &InstancePaths, pid: i32) -> Result<()> {
        process::kill_instance(pid, &paths.name).map_err(|e| Error::Io {
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

    pub(crate) fn cleanup_files(&self, paths: &InstancePaths) -> Result<()> {
        paths.cleanup().map(|_| ()).map_err(|e| Error::Runtime {
            instance: paths.name.clone(),
            source: e,
        })
    }

    /// Removes what a stopped instance left behind (pid file, sockets,
    /// runtime file, NIC records, uid...). Refuses a running instance.
    pub async fn cleanup(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        if let Liveness::Running { pid } = self.liveness(&paths)? {
            return Err(Error::AlreadyRunning {
                instance: name.to_owned(),
                pid,
            });
        }
        self.cleanup_files(&paths)
    }

    /// Reboots an instance. With `reboot_behavior=allow` the machine is
    /// reset in place (QMP `system_reset`); with `exit` QEMU runs with
    /// `-no-reboot`, so it is stopped and started again from its saved
    /// definition, as the seed does.
    pub async fn reboot(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        if !matches!(self.liveness(&paths)?, Liveness::Running { .. }) {
            return Err(Error::NotRunning {
                instance: name.into(),
            });
        }
        let spec = self.saved_spec(&paths)?;
        match spec {
            Some(spec) if spec.hvparams.reboot_behavior == RebootBehavior::Exit => {
                self.stop_locked(&paths, true, Duration::from_secs(10))
                    .await?;
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

    /// Resumes a paused instance (`cont`).
    pub async fn resume(&self, name: &str) -> Result<()> {
        self.simple_command(name, "cont", &commands::Cont).await
    }

    /// Sets the balloon target to `mib` MiB.
    pub async fn balloon(&self, name: &str, mib: u64) -> Result<()> {
        if mib == 0 {
            return Err(Error::Params {
                instance: name.into(),
                source: kvm_cmdline::Error::Instance {
                    instance: name.into(),
                    field: "balloon".into(),
                    reason: "target memory must be at least 1 MiB".into(),
                },
            });
        }
        self.simple_command(name, "balloon", &commands::Balloon { value: mib << 20 })
            .await
    }

    async fn simple_command<C: commands::Command<Output = ()>>(
        &self,
        name: &str,
        op: &str,
        cmd: &C,
    ) -> Result<()> {
        let paths = self.paths(name)?;
        if !matches!(self.liveness(&paths)?, Liveness::Running { .. }) {
            return Err(Error::NotRunning {
                instance: name.into(),
            });
        }
        let qmp = self.qmp(&paths).await?;
        qmp.run(cmd).await.map_err(|e| Error::Qmp {
            instance: name.into(),
            op: op.into(),
            source: e,
        })
    }
}

/// The instance definition kept in a runtime record, or one rebuilt from a
/// seed driver's record (its argv and hvparams).
pub(crate) fn spec_from_record(name: &str, r: &RuntimeRecord) -> InstanceSpec {
    if let Some(spec) = r
        .payload
        .get("spec")
        .and_then(|s| serde_json::from_value::<InstanceSpec>(s.clone()).ok())
    {
        return spec;
    }
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
    spec
}

fn read_password(file: &std::path::Path) -> std::result::Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let line = text.lines().next().unwrap_or("").to_owned();
    if line.is_empty() {
        return Err(format!("{} holds no password", file.display()));
    }
    Ok(line)
}

fn pin_vcpus(
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
            process::set_affinity(cpu.thread_id as i32, set)
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
