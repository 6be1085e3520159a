//! Questions about instances and the node: list, info, console, verify.

use std::path::PathBuf;
use std::time::Duration;

use gkvm_qmp::{commands, Options, Qmp};
use kvm_runtime::{InstancePaths, Liveness, ProcStat, RuntimeRecord};

use crate::error::{Error, Result};
use crate::lifecycle::{has_marker, spec_from_record, INCOMING, MIGRATING, PAUSED};
use crate::types::{
    ConsoleInfo, InstanceInfo, InstanceState, NodeInfo, PowercyclePlan, VerifyReport,
};
use crate::{process, KvmHypervisor};

/// The pid's `-m` and `-smp` from its command line (fallback values).
pub(crate) fn cmdline_resources(pid: i32) -> (u64, u32) {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    argv_resources(&args)
}

/// Memory (MiB) and vCPUs from a QEMU argv's `-m` and `-smp`; 0 MiB and one
/// vCPU when absent.
pub(crate) fn argv_resources(args: &[String]) -> (u64, u32) {
    let arg = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
    };
    let memory = arg("-m")
        .and_then(|m| m.trim_end_matches(['M', 'm']).parse().ok())
        .unwrap_or(0);
    let vcpus = arg("-smp")
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.trim_start_matches("cpus=").parse().ok())
        .unwrap_or(1);
    (memory, vcpus)
}

/// QMP options for a query of a running instance: connecting and each
/// command bounded by `timeout`.
pub(crate) fn bounded(timeout: Duration) -> Options {
    Options {
        connect_timeout: timeout,
        command_timeout: timeout,
        ..Options::default()
    }
}

/// Info of one running instance; QMP answers are bounded by `timeout` and
/// replaced by command-line values (state `unknown`) when they do not come.
async fn instance_info(paths: InstancePaths, pid: i32, timeout: Duration) -> InstanceInfo {
    let record = paths.read_runtime_shared().ok().flatten();
    // As started: the record's command line is the process's.
    let (mut memory_mib, vcpus) = match &record {
        Some(r) => argv_resources(&r.argv),
        None => cmdline_resources(pid),
    };
    let mut state = InstanceState::Unknown;
    let options = bounded(timeout);
    let answers = tokio::time::timeout(timeout, async {
        let qmp = Qmp::connect(&paths.qmp, options).await.ok()?;
        // The vCPU count is the command line's: gkvm does not hot-plug CPUs,
        // so a third round trip would only repeat it.
        let (status, balloon) = tokio::join!(
            qmp.run(&commands::QueryStatus),
            qmp.run(&commands::QueryBalloon)
        );
        Some((status.ok(), balloon.ok()))
    })
    .await
    .ok()
    .flatten();
    let starting = record.as_deref().is_some_and(crate::lifecycle::is_starting);
    if let Some((status, balloon)) = answers {
        if let Some(s) = status {
            state = InstanceState::from(s.status);
        }
        if let Some(b) = balloon {
            memory_mib = b.actual >> 20;
        }
    }
    if starting && state != InstanceState::Incoming {
        // A start in progress, or one whose gkvm was killed (cleanup
        // removes it): the guest has not run.
        state = InstanceState::Starting;
    }
    // QEMU kept after its guest ended (`user_shutdown`): how it ended.
    let ending = (state == InstanceState::Shutdown)
        .then(|| crate::events::last_ending(&paths))
        .flatten();
    let user_down = record.as_deref().is_some_and(user_shutdown)
        && ending
            .as_ref()
            .is_some_and(crate::events::Ending::is_user_down);
    InstanceInfo {
        name: paths.name.clone(),
        pid,
        state,
        memory_mib,
        vcpus,
        cpu_time_secs: process::cpu_time(pid).unwrap_or(0.0),
        reason: ending.as_ref().map(|e| e.reason.clone()),
        cause: ending.map(|e| e.cause),
        log: None,
        guest_agent: None,
        user_down,
        helpers: Vec::new(),
        autostart: None,
    }
}

/// Whether the record's instance keeps QEMU when its guest shuts down.
fn user_shutdown(record: &RuntimeRecord) -> bool {
    hvparam_flag(record, "user_shutdown")
}

/// A boolean hypervisor parameter as the record saved it: gkvm's saved
/// instance, else the hvparams of a record in Ganeti's format.
fn hvparam_flag(record: &RuntimeRecord, key: &str) -> bool {
    let flag = saved_hvparam(record, key).or_else(|| record.hvparams.get(key));
    matches!(flag, Some(serde_json::Value::Bool(true)))
        || flag.and_then(serde_json::Value::as_str) == Some("true")
}

/// Whether a string hypervisor parameter of the record's instance is
/// `value` (gkvm's saved instance).
fn hvparam_is(record: &RuntimeRecord, key: &str, value: &str) -> bool {
    saved_hvparam(record, key).and_then(serde_json::Value::as_str) == Some(value)
}

/// A hypervisor parameter of gkvm's saved instance in the record.
fn saved_hvparam<'a>(record: &'a RuntimeRecord, key: &str) -> Option<&'a serde_json::Value> {
    record
        .payload
        .get("spec")
        .and_then(|s| s.get("hvparams"))
        .and_then(|h| h.get(key))
}

/// An instance's info from its runtime record and `/proc` alone.
/// `stat` is what `/proc` said of the process just now, if it was read.
fn recorded_info(
    paths: &InstancePaths,
    pid: i32,
    record: Option<&RuntimeRecord>,
    stat: Option<ProcStat>,
) -> InstanceInfo {
    let spec = record.and_then(|r| r.payload.get("spec"));
    let field = |k: &str| {
        spec.and_then(|s| s.get(k))
            .and_then(serde_json::Value::as_u64)
    };
    let (argv_memory, argv_vcpus) = match record {
        Some(r) => argv_resources(&r.argv),
        None => cmdline_resources(pid),
    };
    let memory_mib = field("startup_memory")
        .or_else(|| field("memory"))
        .unwrap_or(argv_memory);
    let vcpus = field("vcpus")
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(argv_vcpus);
    let state = match record {
        Some(r) if crate::lifecycle::is_starting(r) => InstanceState::Starting,
        Some(r) if has_marker(r, PAUSED) => InstanceState::Paused,
        _ => InstanceState::Running,
    };
    InstanceInfo {
        name: paths.name.clone(),
        pid,
        state,
        memory_mib,
        vcpus,
        cpu_time_secs: stat
            .map(|s| s.cpu_secs())
            .or_else(|| process::cpu_time(pid))
            .unwrap_or(0.0),
        reason: None,
        cause: None,
        log: None,
        guest_agent: None,
        user_down: false,
        helpers: Vec::new(),
        autostart: None,
    }
}

/// How long `info` waits for the guest agent's answer.
const AGENT_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What the node shows of an instance whose QEMU is gone but whose
/// runtime record remains (gkvm's stop and cleanup remove the record): QEMU
/// removes its pid file when it exits cleanly — the guest powered off, or
/// it was told to quit — so no pid file means `shutdown`; a pid file naming
/// a dead process means it was killed or crashed. `None` for a start that
/// never got as far as QEMU (cleanup's business).
fn stopped_info(
    paths: &InstancePaths,
    liveness: Liveness,
    record: &RuntimeRecord,
    log: &std::path::Path,
) -> Option<InstanceInfo> {
    // A start that never got as far as QEMU, a destination whose guest
    // never landed, or a migrated-away source whose stop was interrupted:
    // leftovers for cleanup, not a guest that shut down or crashed.
    if crate::lifecycle::is_starting(record)
        || has_marker(record, INCOMING)
        || has_marker(record, crate::lifecycle::HANDED_OVER)
    {
        return None;
    }
    let ending = crate::events::last_ending(paths);
    let (state, reason) = match liveness {
        Liveness::NoPidFile => (
            InstanceState::Shutdown,
            match &ending {
                Some(e) => format!("QEMU exited cleanly: {}", e.reason),
                None => "QEMU exited cleanly: the guest powered off, or QEMU was told to quit"
                    .to_owned(),
            },
        ),
        Liveness::Stale { .. } => {
            let last = crate::qemu_log::tail(log, 2);
            let mut r = "QEMU died without shutting down (killed, or crashed)".to_owned();
            if !last.is_empty() {
                r.push_str(&format!("; its log ends: {last}"));
            }
            (InstanceState::Crashed, r)
        }
        _ => return None,
    };
    let mut info = recorded_info(paths, 0, Some(record), None);
    info.state = state;
    info.cpu_time_secs = 0.0;
    info.reason = Some(reason);
    info.user_down = state == InstanceState::Shutdown
        && user_shutdown(record)
        && ending
            .as_ref()
            .is_some_and(crate::events::Ending::is_user_down);
    // A crash's cause only if QEMU said the guest panicked (an earlier
    // shutdown of a QEMU kept by user_shutdown is not why it died).
    info.cause = ending
        .filter(|e| state == InstanceState::Shutdown || e.cause == "guest-panic")
        .map(|e| e.cause);
    info.log = Some(log.to_owned());
    Some(info)
}

impl KvmHypervisor {
    /// Names of the running instances (pid file naming a live QEMU of that
    /// name), sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        Ok(self.running()?.into_iter().map(|(p, _)| p.name).collect())
    }

    /// The running instances with their QEMU pids, checked once each.
    pub(crate) fn running(&self) -> Result<Vec<(InstancePaths, i32)>> {
        Ok(self
            .survey()?
            .into_iter()
            .filter_map(|(p, l)| Some((p, l.running_pid()?)))
            .collect())
    }

    /// Every instance the run dir knows of, with its liveness.
    fn survey(&self) -> Result<Vec<(InstancePaths, Liveness)>> {
        Ok(self
            .survey_stat()?
            .into_iter()
            .map(|(p, l, _)| (p, l))
            .collect())
    }

    /// [`Self::survey`], with what `/proc` said of each running QEMU.
    fn survey_stat(&self) -> Result<Vec<(InstancePaths, Liveness, Option<ProcStat>)>> {
        let names = self.config.run_dir.all_instances().map_err(|e| {
            let denied = matches!(&e, kvm_runtime::Error::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied);
            Error::RunDir {
                path: self.config.run_dir.root().to_owned(),
                hint: if denied {
                    " (readable by root and its owner only: run gkvm as root, or give \
                         another --run-dir)"
                } else {
                    ""
                },
                source: e,
            }
        })?;
        Ok(names
            .into_iter()
            .filter_map(|p| match p.liveness_stat() {
                Ok((l, stat)) => Some((p, l, stat)),
                Err(e) => {
                    tracing::warn!(instance = %p.name, error = %e.report(), "left out of the list");
                    None
                }
            })
            .collect())
    }

    /// The instances whose QEMU is gone without gkvm stopping it:
    /// `shutdown` or `crashed` (see [`stopped_info`]).
    fn stopped(&self, survey: &[(InstancePaths, Liveness)]) -> Vec<InstanceInfo> {
        survey
            .iter()
            .filter(|(_, l)| l.running_pid().is_none())
            .filter_map(|(p, l)| {
                let record = p.read_runtime_shared().ok().flatten()?;
                stopped_info(p, *l, &record, &self.instance_log(&p.name))
            })
            .collect()
    }

    /// Info of one instance: a running one from QMP, one whose QEMU shut
    /// down or died on its own from its record (`shutdown`, `crashed`).
    pub async fn info(&self, name: &str) -> Result<InstanceInfo> {
        let paths = self.paths(name)?;
        let log = self.instance_log(name);
        let liveness = self.liveness(&paths)?;
        let Some(pid) = liveness.running_pid() else {
            let record = paths.read_runtime_shared().ok().flatten();
            return record
                .and_then(|r| stopped_info(&paths, liveness, &r, &log))
                .ok_or_else(|| Error::NotRunning {
                    instance: name.to_owned(),
                });
        };
        // The flags alone, not the whole saved instance (parsing that is
        // a tenth of an info's time).
        let record = paths.read_runtime_shared().ok().flatten();
        let agent = record
            .as_deref()
            .is_some_and(|r| hvparam_flag(r, "use_guest_agent"))
            .then(|| paths.guest_agent.clone());
        let swtpm = record
            .as_deref()
            .is_some_and(|r| hvparam_is(r, "tpm", "tpm2"))
            .then(|| paths.tpm_helper());
        let mut info = instance_info(paths, pid, self.config.qmp_timeout).await;
        if let Some(pid) = swtpm {
            if pid.is_none() {
                tracing::warn!(instance = %info.name,
                    "its TPM emulator (swtpm) has died: the guest's TPM fails until it is stopped and started");
            }
            info.helpers.push(crate::types::HelperInfo {
                kind: "swtpm".into(),
                pid,
            });
        }
        info.log = Some(log);
        if let Some(socket) = agent {
            let bound = self.config.qmp_timeout.min(AGENT_PING_TIMEOUT);
            info.guest_agent = Some(crate::guest_agent::ping(&socket, bound).await);
        }
        Ok(info)
    }

    /// Every running instance from what the node keeps — pid files,
    /// `/proc` and runtime records — without a QMP round trip: memory and
    /// vCPUs as started (startup memory when given), state `starting` for an
    /// unfinished start, `paused` for one started paused and not resumed
    /// since, `running` otherwise (a pause by another QMP client, or a
    /// guest's internal error, shows in [`Self::info`] only). Only an instance whose
    /// record says it is migrating or waiting for a migration is asked over
    /// QMP (bounded), so a handed-over source shows `migrated`. [`Self::info_all`]
    /// asks every QEMU (paused, balloon size, live vCPU count).
    pub async fn overview(&self) -> Result<Vec<InstanceInfo>> {
        let (survey, stats): (Vec<_>, Vec<_>) = self
            .survey_stat()?
            .into_iter()
            .map(|(p, l, s)| ((p, l), s))
            .unzip();
        let mut out = self.stopped(&survey);
        let mut ask = tokio::task::JoinSet::new();
        let running = survey
            .into_iter()
            .zip(stats)
            .filter_map(|((p, l), s)| Some((p, l.running_pid()?, s)));
        for (paths, pid, stat) in running {
            let record = paths.read_runtime_shared().ok().flatten();
            // Also ask about an instance whose guest may have shut itself
            // down (`user_shutdown`): only QEMU knows.
            let in_transition = record.as_ref().is_some_and(|r| {
                has_marker(r, MIGRATING) || has_marker(r, INCOMING) || user_shutdown(r)
            });
            if in_transition {
                ask.spawn(instance_info(paths, pid, self.config.info_timeout));
                continue;
            }
            out.push(recorded_info(&paths, pid, record.as_deref(), stat));
        }
        // Those asked over QMP may have ended meanwhile (a migrated source
        // stops): left out if so. The others were looked at just now.
        while let Some(r) = ask.join_next().await {
            if let Ok(info) = r {
                if !kvm_runtime::is_zombie_or_gone(info.pid) {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Info of every running instance, queried concurrently with a bounded
    /// time each (an instance that dies meanwhile is left out, one that
    /// does not answer shows state `unknown`), and of every one whose QEMU
    /// shut down or died on its own (`shutdown`, `crashed`).
    pub async fn info_all(&self) -> Result<Vec<InstanceInfo>> {
        let survey = self.survey()?;
        let mut out = self.stopped(&survey);
        let mut set = tokio::task::JoinSet::new();
        for (paths, l) in survey {
            if let Some(pid) = l.running_pid() {
                set.spawn(instance_info(paths, pid, self.config.info_timeout));
            }
        }
        while let Some(r) = set.join_next().await {
            if let Ok(info) = r {
                if !kvm_runtime::is_zombie_or_gone(info.pid) {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Memory, CPUs and QEMU version of this node.
    pub async fn node_info(&self) -> Result<NodeInfo> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::Io {
            context: "reading /proc/meminfo".into(),
            source: e,
        })?;
        let field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                >> 10
        };
        let total = field("MemTotal:");
        let available = field("MemAvailable:");
        let instances: u64 = self
            .running()?
            .iter()
            .map(|(_, pid)| cmdline_resources(*pid).0)
            .sum();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let sockets = cpuinfo
            .lines()
            .filter_map(|l| l.strip_prefix("physical id"))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            .max(1);
        let sockets = u32::try_from(sockets).unwrap_or(u32::MAX);
        let nodes = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        n.starts_with("node") && n[4..].parse::<u32>().is_ok()
                    })
                    .count()
            })
            .unwrap_or(1)
            .max(1);
        let nodes = u32::try_from(nodes).unwrap_or(u32::MAX);
        // SAFETY: sysconf cannot fail for this name.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
        let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
        let hv_version = match self.capabilities(&self.default_kvm_path()).await {
            Ok(c) => Some((c.version.major, c.version.minor, c.version.micro)),
            Err(_) => None,
        };
        Ok(NodeInfo {
            memory_total_mib: total,
            memory_free_mib: available,
            memory_dom0_mib: total.saturating_sub(available).saturating_sub(instances),
            cpu_total: cpus,
            cpu_sockets: sockets,
            cpu_nodes: nodes,
            hv_version,
        })
    }

    /// The node's default QEMU: the configured one, `/usr/bin/kvm`, or
    /// `qemu-system-x86_64` on PATH.
    pub fn default_kvm_path(&self) -> PathBuf {
        if let Some(p) = &self.config.kvm_path {
            return p.clone();
        }
        let kvm = PathBuf::from("/usr/bin/kvm");
        if kvm.is_file() {
            return kvm;
        }
        std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("qemu-system-x86_64"))
                    .find(|p| p.is_file())
            })
            .unwrap_or(kvm)
    }

    /// How to reach the console of a running instance, as Ganeti
    /// describes it: the serial socket, else VNC, else SPICE.
    pub fn console(&self, name: &str) -> Result<ConsoleInfo> {
        let paths = self.paths(name)?;
        self.running_pid(&paths)?;
        let record = paths.read_runtime().map_err(|e| Error::Runtime {
            instance: name.into(),
            source: e,
        })?;
        let spec = record
            .map(|r| spec_from_record(name, &r, &paths.runtime))
            .transpose()?;
        let hv = spec
            .as_ref()
            .map(|s| s.hvparams.clone())
            .unwrap_or_default();
        let port = spec.as_ref().and_then(|s| s.network_port).unwrap_or(0);
        if hv.serial_console {
            return Ok(ConsoleInfo::Serial {
                instance: name.into(),
                socket: paths.serial.clone(),
                command: vec![
                    "gkvm".into(),
                    "--run-dir".into(),
                    self.config.run_dir.root().display().to_string(),
                    "console".into(),
                    name.into(),
                ],
            });
        }
        if !hv.vnc_bind_address.is_empty() && port > kvm_cmdline::VNC_BASE_PORT {
            return Ok(ConsoleInfo::Vnc {
                instance: name.into(),
                host: crate::media::display_host(&hv.vnc_bind_address, 0),
                port,
                display: port - kvm_cmdline::VNC_BASE_PORT,
            });
        }
        if !hv.spice_bind.is_empty() {
            return Ok(ConsoleInfo::Spice {
                instance: name.into(),
                host: crate::media::display_host(&hv.spice_bind, hv.spice_ip_version),
                port,
            });
        }
        Ok(ConsoleInfo::Message {
            instance: name.into(),
            message: format!("No serial shell for instance {name}"),
        })
    }

    /// Every file under the run directory except the capability cache and
    /// the QEMU logs:
    /// what instances keep on this node. Empty when nothing runs and
    /// everything was cleaned up.
    pub fn state_files(&self) -> Vec<PathBuf> {
        let root = self.config.run_dir.root().to_owned();
        let (cache, logs) = (self.caps_cache_dir(), self.log_dir());
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p == cache || p == logs {
                    continue;
                }
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    _ => out.push(p),
                }
            }
        }
        out.sort();
        out
    }

    /// Power-cycles this node at once, as Ganeti 3.1's `PowercycleNode`
    /// does when cluster software fences a node: syncs file systems, asks
    /// the kernel for an immediate reboot (`b` to the sysrq trigger), and
    /// if that cannot be written runs `reboot -n -f`. Instances are not
    /// stopped first: this is fencing. With `dry_run`, does nothing and
    /// returns the steps it would take (what it would write where); else
    /// returns only if every way failed — or, with a sysrq trigger that is
    /// not the kernel's ([`crate::Config::sysrq_trigger`]), after writing it.
    pub fn powercycle_node(&self, dry_run: bool) -> Result<PowercyclePlan> {
        let trigger = &self.config.sysrq_trigger;
        let fallback = &self.config.reboot_command;
        let plan = PowercyclePlan {
            steps: vec![
                "sync(2): flush file systems".to_owned(),
                format!(
                    "write \"b\" to {} (reboot at once, no shutdown)",
                    trigger.display()
                ),
                format!("if that cannot be written: run {}", fallback.join(" ")),
            ],
            dry_run,
        };
        if dry_run {
            return Ok(plan);
        }
        tracing::warn!(trigger = %trigger.display(), "power-cycling this node");
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(trigger)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"b"));
        let Err(sysrq) = written else {
            return Ok(plan);
        };
        tracing::error!(error = %sysrq, "sysrq trigger failed; running the fallback");
        let run = fallback.split_first().map(|(prog, args)| {
            std::process::Command::new(prog)
                .args(args)
                .stdin(std::process::Stdio::null())
                .status()
        });
        match run {
            Some(Ok(st)) if st.success() => Ok(plan),
            other => Err(Error::Io {
                context: format!(
                    "power-cycling the node: {} could not be written ({sysrq}), and {} {}",
                    trigger.display(),
                    fallback.join(" "),
                    match other {
                        Some(Ok(st)) => format!("exited with {st}"),
                        Some(Err(e)) => format!("could not run: {e}"),
                        None => "is empty".to_owned(),
                    }
                ),
                source: sysrq,
            }),
        }
    }

    /// Checks the node: QEMU present and probeable, `/dev/kvm` usable,
    /// `/dev/net/tun` present, the run directory sane.
    pub async fn verify(&self) -> VerifyReport {
        let mut problems = Vec::new();
        let qemu = self.default_kvm_path();
        if let Err(e) = self.capabilities(&qemu).await {
            problems.push(e.report());
        }
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            problems.push(
                "/dev/kvm is not usable: instances with kvm_flag=enabled will not start".into(),
            );
        }
        if !std::path::Path::new(gkvm_tap::TUN_DEVICE).exists() {
            problems.push(format!(
                "{} is missing: NICs cannot be created",
                gkvm_tap::TUN_DEVICE
            ));
        }
        if let Err(e) = self.config.run_dir.ensure() {
            problems.push(format!("run directory: {}", e.report()));
        } else {
            // Trusted is not enough: a read-only mount fails every start.
            let probe = self.config.run_dir.root().join("ctrl").join(".verify");
            match kvm_runtime::fsutil::write_atomic_volatile(&probe, b"") {
                Ok(()) => {
                    let _ = std::fs::remove_file(&probe);
                }
                Err(e) => problems.push(format!("run directory is not writable: {e}")),
            }
        }
        problems.extend(self.definition_problems());
        VerifyReport::with_problems(problems)
    }
}
