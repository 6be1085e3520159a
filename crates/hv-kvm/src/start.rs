//! The steps of a start, in order: build the argv and mark the start
//! unfinished, allocate a pool user, prepare the node (TAPs, NIC scripts,
//! keymap, chroot), spawn QEMU, configure it over QMP, complete the record
//! and let the guest run. Each step leaves what it created to the
//! caller's [`RollbackGuard`].

use std::os::fd::AsFd;
use std::sync::Arc;

use gkvm_qmp::{commands, Qmp};
use kvm_cmdline::hvparams::SecurityModel;
use kvm_cmdline::{Capabilities, InstanceSpec, Launch, NicBackend, QemuCommand};
use kvm_runtime::{InstancePaths, Liveness};

use crate::error::{Error, Result};
use crate::guard::RollbackGuard;
use crate::lifecycle::{
    mark, pin_vcpus, read_password, runtime_record, set_starting, RealHost, StartOpts, INCOMING,
    PAUSED,
};
use crate::types::StartReport;
use crate::{node_paths, process, KvmHypervisor};

/// What the first step settled: the instance as it will run, its QEMU's
/// capabilities and its argv.
struct Built {
    spec: InstanceSpec,
    caps: Arc<Capabilities>,
    cmd: QemuCommand,
}

fn step_error(name: &str, step: &'static str, reason: String) -> Error {
    Error::Start {
        instance: name.to_owned(),
        step,
        reason,
    }
}

fn runtime_error(name: &str) -> impl Fn(kvm_runtime::Error) -> Error + '_ {
    move |source| Error::Runtime {
        instance: name.to_owned(),
        source,
    }
}

impl KvmHypervisor {
    pub(crate) async fn start_steps(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        opts: &StartOpts,
        guard: &RollbackGuard,
    ) -> Result<StartReport> {
        let built = self.build_start(spec, paths, opts).await?;
        let pool_user = self.pool_user(&built.spec, paths).await?;
        let taps = self.prepare_node(&built, paths, opts, guard).await?;
        // The instance's cgroup, when it has limits, before anything runs
        // in it; the rollback's cleanup removes it.
        let cgroup = self.prepare_cgroup(&built.spec, paths)?;
        // Helpers (a swtpm) before QEMU, which connects to them; the
        // rollback's cleanup ends them.
        self.start_helpers(&built.spec, paths, pool_user.as_deref(), &cgroup)
            .await?;
        let pid = self
            .spawn_qemu(
                &built,
                paths,
                opts,
                taps.as_slice(),
                (pool_user, &cgroup),
                guard,
            )
            .await?;
        let tap_names: Vec<String> = taps.iter().map(|t| t.name().to_owned()).collect();
        // QEMU holds its own descriptors now; the interfaces live with it.
        drop(taps);
        let qmp = self
            .configure_over_qmp(&built.spec, paths, pid, opts)
            .await?;
        let paused = self
            .complete_start(&built, paths, opts, &tap_names, qmp)
            .await?;
        tracing::info!(instance = %built.spec.name, pid, "started");
        Ok(StartReport {
            name: built.spec.name.clone(),
            pid,
            taps: tap_names,
            machine: built.cmd.machine,
            paused,
        })
    }

    /// The instance as it will run (QEMU binary, device places), its argv,
    /// and a runtime record marking the start unfinished until the guest
    /// may run: if this process is SIGKILLed, the next operation knows the
    /// QEMU it finds never ran the guest and may be removed.
    async fn build_start(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        opts: &StartOpts,
    ) -> Result<Built> {
        let params = |e| Error::Params {
            instance: spec.name.clone(),
            source: e,
        };
        let kvm_path = self.kvm_path_for(spec);
        let caps = self.capabilities(&kvm_path).await?;
        let mut spec = spec.clone();
        spec.hvparams.kvm_path = kvm_path;
        // A new start places its NICs and disks; an incoming instance keeps
        // the source's places (none, if an earlier release started it), so
        // the guest lands on identical hardware.
        if opts.incoming.is_none() {
            spec.shape_new(&caps).map_err(params)?;
        }
        spec.hvparams
            .validate_host(&RealHost, &caps)
            .map_err(params)?;
        crate::media::check_image_urls(&spec.hvparams)
            .await
            .map_err(params)?;
        crate::helper::check_helpers(&spec)?;
        let env = crate::media::build_env_for(&self.config.build_env, &spec.hvparams);
        let cmd = kvm_cmdline::build(&spec, &caps, &env).map_err(params)?;
        tracing::debug!(instance = %spec.name, "argv built");
        let mut record = runtime_record(&spec, &cmd, &caps, &[]);
        set_starting(&mut record, true);
        paths
            .write_runtime(&record)
            .map_err(runtime_error(&spec.name))?;
        Ok(Built { spec, caps, cmd })
    }

    /// The user QEMU runs as under `security_model=pool`.
    async fn pool_user(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
    ) -> Result<Option<String>> {
        if spec.hvparams.security_model != SecurityModel::Pool {
            return Ok(None);
        }
        let name = spec.name.as_str();
        let pool = self.config.uid_pool.ok_or_else(|| {
            step_error(
                name,
                "uid pool",
                "security_model=pool but this node has no uid pool configured".into(),
            )
        })?;
        let run = self.config.run_dir.clone();
        let p = paths.clone();
        let lock_timeout = self.config.lock_timeout;
        let uid = tokio::task::spawn_blocking(move || pool.allocate(&run, &p, lock_timeout))
            .await
            .map_err(|e| step_error(name, "uid pool", e.to_string()))?
            .map_err(runtime_error(name))?;
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .ok_or_else(|| step_error(name, "uid pool", format!("uid {uid} has no user name")))?;
        Ok(Some(user.name))
    }

    /// TAPs (configured by the NIC script, recorded in the run dir), the
    /// keymap file and the chroot directory.
    async fn prepare_node(
        &self,
        built: &Built,
        paths: &InstancePaths,
        opts: &StartOpts,
        guard: &RollbackGuard,
    ) -> Result<Vec<gkvm_tap::Tap>> {
        let spec = &built.spec;
        let hv = &spec.hvparams;
        // What outlives the run (a UEFI variable store), before anything
        // that the rollback removes.
        self.prepare_state(spec)?;
        let virtio = crate::nic::is_virtio(spec, &built.caps);
        let taps = crate::nic::open_taps(spec, &self.config.tap_template, virtio)?;
        for tap in &taps {
            guard.add_tap(tap.name());
        }
        for (i, tap) in taps.iter().enumerate() {
            let routed = spec.nics[i].mode != kvm_cmdline::NicMode::Bridged;
            // As Ganeti: an incoming instance's routed NICs wait for the
            // migration to finish (the source still owns the route).
            if opts.incoming.is_some() && routed {
                continue;
            }
            crate::nic::configure(spec, i, tap.name(), &self.config).await?;
            let (spec, tap, down) = (
                spec.clone(),
                tap.name().to_owned(),
                self.config.nic_down_script.clone(),
            );
            guard.on_rollback(Box::new(move || {
                crate::nic::deconfigure(&spec, i, &tap, down.as_deref());
            }));
        }
        for (i, tap) in taps.iter().enumerate() {
            paths
                .write_nic(i, tap.name())
                .map_err(runtime_error(&spec.name))?;
        }
        if let Some(content) = kvm_cmdline::keymap_file(hv, &built.caps) {
            paths
                .write_keymap(&content)
                .map_err(runtime_error(&spec.name))?;
        }
        if hv.use_chroot {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(&paths.chroot) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    let reason = format!("{}: {e}", paths.chroot.display());
                    return Err(step_error(&spec.name, "chroot", reason));
                }
                _ => {}
            }
        }
        Ok(taps)
    }

    /// Runs QEMU (it daemonizes once initialized) and returns its pid.
    async fn spawn_qemu(
        &self,
        built: &Built,
        paths: &InstancePaths,
        opts: &StartOpts,
        taps: &[gkvm_tap::Tap],
        (pool_user, cgroup): (Option<String>, &[std::path::PathBuf]),
        guard: &RollbackGuard,
    ) -> Result<i32> {
        let spec = &built.spec;
        let name = spec.name.as_str();
        let (log_path, log) = self.open_log(name)?;
        paths.prepare_event_log().map_err(|e| Error::Runtime {
            instance: name.to_owned(),
            source: e,
        })?;
        let mut std_cmd = std::process::Command::new(&spec.hvparams.kvm_path);
        process::die_with_parent(&mut std_cmd);
        process::join_cgroup(&mut std_cmd, cgroup);
        // Kept open until QEMU has been spawned.
        let vhost = crate::nic::open_vhost(spec, taps)?;
        let nics: Vec<NicBackend> = taps
            .iter()
            .zip(&vhost)
            .map(|(t, v)| NicBackend {
                tap_fds: t.pass_to_child(&mut std_cmd),
                vhost_fds: v
                    .iter()
                    .map(|fd| gkvm_tap::pass_fd_to_child(&mut std_cmd, fd.as_fd()))
                    .collect(),
            })
            .collect();
        let launch = Launch {
            node: node_paths(paths, Some(log_path.clone()), self.firmware_files(spec)),
            // Stopped at first: pinning, ballooning and passwords come before
            // the guest runs (as Ganeti does). An incoming instance runs as
            // soon as its migration lands (the source has then stopped for
            // good), so a killed `accept` cannot leave the only copy paused.
            paused: opts.incoming.is_none(),
            daemonize: true,
            incoming: opts.incoming.as_ref().map(|uri| {
                if crate::migration::defers_incoming(spec) {
                    "defer".to_owned()
                } else {
                    uri.clone()
                }
            }),
            nics,
            pool_user,
            migration_tls: self.config.migration_tls_dir.clone(),
        };
        let argv = built
            .cmd
            .launch_argv(spec, &built.caps, &launch)
            .map_err(|e| Error::Params {
                instance: name.to_owned(),
                source: e,
            })?;
        std_cmd
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        tracing::debug!(instance = %name, argv = ?argv, "starting QEMU");
        self.run_until_daemonized(std_cmd, spec, guard, &log_path)
            .await?;
        tracing::debug!(instance = %name, "QEMU initialized");
        match self.liveness(paths)? {
            Liveness::Running { pid } => Ok(pid),
            other => Err(step_error(
                name,
                "spawn QEMU",
                format!("QEMU is not running after its start ({other:?})"),
            )),
        }
    }

    /// Waits for QEMU's first half to exit (it has daemonized, or failed:
    /// then its log says why).
    async fn run_until_daemonized(
        &self,
        std_cmd: std::process::Command,
        spec: &InstanceSpec,
        guard: &RollbackGuard,
        log: &std::path::Path,
    ) -> Result<()> {
        let name = spec.name.as_str();
        let mut qemu = tokio::process::Command::from(std_cmd);
        qemu.kill_on_drop(true);
        let child = qemu.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::QemuMissing {
                path: spec.hvparams.kvm_path.clone(),
            },
            _ => step_error(name, "spawn QEMU", e.to_string()),
        })?;
        // The rollback must see QEMU's first half dead before it looks for
        // the daemonized half: only then can no new one appear.
        if let Some(pid) = child.id() {
            guard.set_child(pid);
        }
        let timeout = self.config.start_timeout;
        let mut child = child;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| {
                let took = kvm_runtime::human_duration(&timeout);
                let reason = format!("QEMU did not finish initializing within {took}");
                step_error(name, "spawn QEMU", reason)
            })?
            .map_err(|e| step_error(name, "spawn QEMU", e.to_string()))?;
        if status.success() {
            return Ok(());
        }
        let said = crate::qemu_log::tail(log, 6);
        let said = if said.is_empty() {
            silent_exit_reason(log, self.config.run_dir.root())
        } else {
            said
        };
        let reason = format!("QEMU exited with {status}: {said} (log: {})", log.display());
        Err(step_error(name, "spawn QEMU", reason))
    }

    /// Passwords, vCPU pinning and the startup balloon, before the guest
    /// runs. Returns the QMP connection for the last step.
    async fn configure_over_qmp(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        pid: i32,
        opts: &StartOpts,
    ) -> Result<Qmp> {
        let name = spec.name.as_str();
        let hv = &spec.hvparams;
        let qmp = self
            .qmp(paths)
            .await
            .map_err(|e| step_error(name, "QMP", e.report()))?;
        tracing::debug!(instance = %name, "QMP connected");
        let qmp_err = |op: &str, e: gkvm_qmp::Error| Error::Qmp {
            instance: name.to_owned(),
            op: op.to_owned(),
            source: e,
        };
        for (protocol, file) in [
            ("vnc", &hv.vnc_password_file),
            ("spice", &hv.spice_password_file),
        ] {
            let Some(file) = file else { continue };
            let password = read_password(file).map_err(|e| step_error(name, "password", e))?;
            let set = commands::SetPassword {
                protocol: protocol.into(),
                password,
            };
            qmp.run(&set)
                .await
                .map_err(|e| qmp_err(&format!("set the {protocol} password"), e))?;
        }
        if !hv.cpu_mask.is_all() {
            let cpus = qmp
                .run(&commands::QueryCpusFast)
                .await
                .map_err(|e| qmp_err("query-cpus-fast", e))?;
            pin_vcpus(pid, &hv.cpu_mask, &cpus).map_err(|e| step_error(name, "CPU pinning", e))?;
        }
        let startup = spec.startup_memory.filter(|&m| m < spec.memory);
        if let (Some(startup), None) = (startup, &opts.incoming) {
            qmp.run(&commands::Balloon {
                value: startup << 20,
            })
            .await
            .map_err(|e| qmp_err("balloon to startup memory", e))?;
        }
        // The guest's balloon driver reports its memory every few seconds
        // for `stats` (best effort: an old QEMU has no such property).
        let _ = qmp
            .run(&commands::QomSet {
                path: crate::stats::BALLOON.into(),
                property: "guest-stats-polling-interval".into(),
                value: crate::stats::GUEST_STATS_INTERVAL_SECS.into(),
            })
            .await;
        tracing::debug!(instance = %name, "configured over QMP");
        Ok(qmp)
    }

    /// Writes the complete runtime record, then lets the guest run unless
    /// it stays paused. Returns whether it did.
    async fn complete_start(
        &self,
        built: &Built,
        paths: &InstancePaths,
        opts: &StartOpts,
        tap_names: &[String],
        qmp: Qmp,
    ) -> Result<bool> {
        let name = built.spec.name.as_str();
        let mut record = runtime_record(&built.spec, &built.cmd, &built.caps, tap_names);
        let stay_paused = opts.paused || opts.incoming.is_some();
        let marker = if opts.incoming.is_some() {
            Some(INCOMING)
        } else {
            stay_paused.then_some(PAUSED)
        };
        if let Some(marker) = marker {
            mark(&mut record, marker, true);
        }
        paths.write_runtime(&record).map_err(runtime_error(name))?;
        if !stay_paused {
            qmp.run(&commands::Cont).await.map_err(|e| Error::Qmp {
                instance: name.to_owned(),
                op: "cont".into(),
                source: e,
            })?;
        }
        qmp.close().await;
        Ok(stay_paused)
    }
}

/// Why QEMU may have failed without a word in its log: most often the
/// file system its log and pid file are on is full.
fn silent_exit_reason(log: &std::path::Path, run_dir: &std::path::Path) -> String {
    // Below this, QEMU cannot write its pid file and log lines.
    const NEARLY_FULL: u64 = 64 * 1024;
    let dirs = [log.parent().unwrap_or(run_dir), run_dir];
    for dir in dirs {
        if let Ok(fs) = nix::sys::statvfs::statvfs(dir) {
            let free = fs.blocks_available().saturating_mul(fs.fragment_size());
            if free < NEARLY_FULL {
                return format!(
                    "it wrote nothing to its log, and the file system of {} is full \
                     ({} KiB free): QEMU could not write its pid file or log there",
                    dir.display(),
                    free / 1024
                );
            }
        }
    }
    "it wrote nothing to its log".to_owned()
}
