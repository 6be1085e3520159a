//! Everything the CLI prints about a result: one JSON document with
//! `--json` (schemas/v1/), else a line or a table for a person.

use hv_kvm::{
    Capabilities, ConsoleInfo, InstanceInfo, LaunchPlan, MigrationStatus, NodeInfo, StartReport,
    StopOutcome, VerifyReport,
};

use crate::{CliResult, Failure};

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> CliResult {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// What an operation without a report of its own did, for `--json`
/// (schemas/v1/operation.json).
#[derive(serde::Serialize)]
pub(crate) struct Operation {
    /// The instance.
    instance: String,
    /// The subcommand: `stop`, `reboot`, `resume`, `cleanup`, `balloon`,
    /// `accept`, `migrate-cancel`.
    operation: &'static str,
    /// How a stop ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<hv_kvm::StopOutcome>,
    /// A balloon's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    target_mib: Option<u64>,
    /// A hot-plugged device's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// A hot-plugged device's PCI slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pci_slot: Option<u8>,
    /// Nothing was done: a dry run's answer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dry_run: bool,
}

impl Operation {
    pub(crate) fn new(instance: &str, operation: &'static str) -> Operation {
        Operation {
            instance: instance.to_owned(),
            operation,
            outcome: None,
            target_mib: None,
            device: None,
            pci_slot: None,
            dry_run: false,
        }
    }

    /// A dry run's (or not).
    pub(crate) fn dry_run(self, dry_run: bool) -> Operation {
        Operation { dry_run, ..self }
    }

    /// With a hot-plugged device's id and slot.
    pub(crate) fn with_device(self, id: &str, pci_slot: Option<u8>) -> Operation {
        Operation {
            device: Some(id.to_owned()),
            pci_slot,
            ..self
        }
    }

    /// With a balloon target.
    pub(crate) fn with_target_mib(self, mib: u64) -> Operation {
        Operation {
            target_mib: Some(mib),
            ..self
        }
    }
}

/// Reports an operation: a typed object with `--json`, else
/// `<instance> <what>`.
pub(crate) fn done(json: bool, op: Operation, what: &str) -> CliResult {
    if json {
        print_json(&op)
    } else {
        outln!("{} {what}", op.instance)
    }
}

/// `HOST:PORT`, with an IPv6 host in brackets.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub(crate) fn human_mib(mib: u64) -> String {
    if mib >= 10 * 1024 {
        format!("{}.{} GiB", mib / 1024, (mib % 1024) * 10 / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        // Whole seconds from here on; a float beyond u64 saturates.
        let whole = std::time::Duration::try_from_secs_f64(s.clamp(0.0, 1e12))
            .unwrap_or_default()
            .as_secs();
        if whole < 3600 {
            format!("{}m{:02}s", whole / 60, whole % 60)
        } else {
            format!("{}h{:02}m", whole / 3600, whole % 3600 / 60)
        }
    }
}

/// How `list` and `info` print a table (`-o`, `--no-headers`,
/// `--separator`, `--units`, as Ganeti's `gnt-instance list`).
#[derive(Debug, Clone, Default)]
pub(crate) struct TableStyle {
    /// The columns, in order; empty: the default ones.
    pub(crate) columns: Vec<Column>,
    /// Leave out the header line.
    pub(crate) no_headers: bool,
    /// Join fields with this instead of aligning them in columns.
    pub(crate) separator: Option<String>,
    /// Memory in this unit (default: whatever reads best, with its unit).
    pub(crate) units: Option<Units>,
}

/// A column of `list`/`info`'s table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Column {
    /// The instance's name.
    Name,
    /// What it is doing.
    State,
    /// QEMU's pid (`-` when none).
    Pid,
    /// Guest memory.
    Memory,
    /// Virtual CPUs.
    Vcpus,
    /// CPU time QEMU has used.
    CpuTime,
    /// Whether a defined instance starts at boot (`-`: not defined).
    Autostart,
    /// Why it is not running.
    Reason,
}

impl Column {
    pub(crate) const DEFAULT: [Column; 6] = [
        Column::Name,
        Column::State,
        Column::Pid,
        Column::Memory,
        Column::Vcpus,
        Column::CpuTime,
    ];

    fn header(self) -> &'static str {
        match self {
            Column::Name => "NAME",
            Column::State => "STATE",
            Column::Pid => "PID",
            Column::Memory => "MEMORY",
            Column::Vcpus => "VCPUS",
            Column::CpuTime => "CPU TIME",
            Column::Autostart => "AUTOSTART",
            Column::Reason => "REASON",
        }
    }

    fn value(self, i: &InstanceInfo, units: Option<Units>) -> String {
        match self {
            Column::Name => i.name.clone(),
            Column::State => i.state.to_string(),
            Column::Pid if i.pid > 0 => i.pid.to_string(),
            Column::Pid => "-".into(),
            Column::Memory => match units {
                None => human_mib(i.memory_mib),
                Some(u) => u.show(i.memory_mib),
            },
            Column::Vcpus => i.vcpus.to_string(),
            Column::CpuTime => human_secs(i.cpu_time_secs),
            Column::Autostart => match i.autostart {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
            Column::Reason => i.reason.clone().unwrap_or_else(|| "-".into()),
        }
    }
}

/// A unit for sizes: `m` MiB, `g` GiB, `t` TiB (numbers without the
/// unit, as `gnt-instance list --units`), `h` the unit that reads best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Units {
    /// Whatever reads best, with its unit.
    H,
    /// MiB.
    M,
    /// GiB.
    G,
    /// TiB.
    T,
}

impl Units {
    fn show(self, mib: u64) -> String {
        // One decimal, cut (not rounded) as `human_mib` cuts it.
        let scaled = |div: u64| {
            let (whole, rest) = (mib / div, mib % div);
            if rest == 0 {
                whole.to_string()
            } else {
                format!("{whole}.{}", rest * 10 / div)
            }
        };
        match self {
            Units::H => human_mib(mib),
            Units::M => mib.to_string(),
            Units::G => scaled(1 << 10),
            Units::T => scaled(1 << 20),
        }
    }
}

fn info_table(infos: &[InstanceInfo], style: &TableStyle) -> CliResult {
    let columns: &[Column] = if style.columns.is_empty() {
        &Column::DEFAULT
    } else {
        &style.columns
    };
    let rows: Vec<Vec<String>> = infos
        .iter()
        .map(|i| columns.iter().map(|c| c.value(i, style.units)).collect())
        .collect();
    let header: Vec<String> = columns.iter().map(|c| c.header().to_owned()).collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let head = (!style.no_headers).then_some(&header);
    for r in head.into_iter().chain(&rows) {
        let line = match &style.separator {
            Some(sep) => r.join(sep),
            None => {
                let cells: Vec<String> = r
                    .iter()
                    .zip(&width)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                cells.join("  ").trim_end().to_owned()
            }
        };
        outln!("{line}")?;
    }
    if style.separator.is_some() || !style.columns.is_empty() {
        // Machine-read or chosen columns: nothing below the table.
        return Ok(());
    }
    // Why a stopped one stopped, and where QEMU's log is, under the table.
    for i in infos {
        if let Some(r) = &i.reason {
            outln!("{}: {r}", i.name)?;
        }
        if let (Some(log), true) = (&i.log, infos.len() == 1) {
            outln!("{}: QEMU log {}", i.name, log.display())?;
        }
    }
    Ok(())
}

fn caps_summary(c: &Capabilities) -> CliResult {
    let features = serde_json::to_value(&c.features).unwrap_or_default();
    let (on, off): (Vec<_>, Vec<_>) = features
        .as_object()
        .map(|m| m.iter().partition(|(_, v)| v.as_bool() == Some(true)))
        .unwrap_or_default();
    let names = |v: Vec<(&String, &serde_json::Value)>| {
        v.into_iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let aliases: Vec<String> = c
        .machines
        .iter()
        .filter_map(|m| m.alias_of.as_ref().map(|a| format!("{} → {a}", m.name)))
        .collect();
    outln!("{:<16}{}", "QEMU", c.version.text)?;
    outln!("{:<16}{}", "banner", c.version.banner)?;
    outln!(
        "{:<16}{}",
        "default machine",
        c.default_machine.as_deref().unwrap_or("-")
    )?;
    outln!(
        "{:<16}{} ({})",
        "machines",
        c.machines.len(),
        aliases.join(", ")
    )?;
    outln!("{:<16}{}", "devices", c.devices.len())?;
    outln!("{:<16}{}", "features", names(on))?;
    outln!("{:<16}{}", "lacks", names(off))
}

/// Joins argv for a POSIX shell, quoting what needs it.
pub(crate) fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `gkvm save`: where the instance is now.
pub(crate) fn saved(json: bool, report: &hv_kvm::SaveReport) -> CliResult {
    if json {
        return print_json(report);
    }
    outln!(
        "{} saved to {} ({}) and stopped",
        report.name,
        report.file.display(),
        human_mib(report.bytes >> 20)
    )
}

/// `gkvm start` (and `restore`).
pub(crate) fn started(json: bool, report: &StartReport) -> CliResult {
    if json {
        return print_json(report);
    }
    let nics = if report.taps.is_empty() {
        String::new()
    } else {
        format!(", NICs on {}", report.taps.join(" "))
    };
    let paused = if report.paused { ", paused" } else { "" };
    outln!(
        "started {} (pid {}, machine {}{nics}{paused})",
        report.name,
        report.pid,
        report.machine
    )
}

/// `gkvm stop`.
pub(crate) fn stopped(json: bool, name: &str, outcome: &StopOutcome) -> CliResult {
    if json {
        return print_json(&Operation {
            outcome: Some(outcome.clone()),
            ..Operation::new(name, "stop")
        });
    }
    let what = match outcome {
        StopOutcome::PoweredOff => "powered off",
        StopOutcome::PowerButtonPressed => "got the power button (not waited for)",
        StopOutcome::Killed => "killed",
        StopOutcome::NotRunning => "was not running",
        _ => "stopped",
    };
    outln!("{name} {what}")
}

/// `gkvm list` and `gkvm info`: always a list in JSON.
pub(crate) fn infos(json: bool, infos: &[InstanceInfo]) -> CliResult {
    list(json, infos, &TableStyle::default())
}

/// `gkvm list`.
pub(crate) fn list(json: bool, infos: &[InstanceInfo], style: &TableStyle) -> CliResult {
    if json {
        print_json(&infos)
    } else {
        info_table(infos, style)
    }
}

/// `gkvm define`.
pub(crate) fn defined(json: bool, d: &hv_kvm::Definition) -> CliResult {
    if json {
        return print_json(d);
    }
    let at_boot = if d.autostart {
        "starts at boot"
    } else {
        "does not start at boot"
    };
    outln!(
        "{} defined ({}, {} vCPU{}, {} disk{}, {} NIC{}; {at_boot})",
        d.instance.name,
        human_mib(d.instance.memory),
        d.instance.vcpus,
        plural(d.instance.vcpus as usize),
        d.instance.disks.len(),
        plural(d.instance.disks.len()),
        d.instance.nics.len(),
        plural(d.instance.nics.len()),
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `gkvm guests-start`, `guests-stop`: a line per instance.
pub(crate) fn guests(json: bool, outcomes: &[hv_kvm::GuestOutcome]) -> CliResult {
    if json {
        return print_json(&outcomes);
    }
    for o in outcomes {
        match &o.error {
            Some(e) => outln!(
                "{}: {} ({})",
                o.instance,
                o.outcome.replace('_', " "),
                e.message
            )?,
            None => outln!("{}: {}", o.instance, o.outcome.replace('_', " "))?,
        }
    }
    Ok(())
}

/// `gkvm powercycle-node`: the steps (only a dry run or a test trigger
/// comes back to print them).
pub(crate) fn powercycle(json: bool, plan: &hv_kvm::PowercyclePlan) -> CliResult {
    if json {
        return print_json(plan);
    }
    let head = if plan.dry_run { "would" } else { "did" };
    for (i, step) in plan.steps.iter().enumerate() {
        outln!("{head} {}. {step}", i + 1)?;
    }
    Ok(())
}

/// `gkvm node-info`.
pub(crate) fn node(json: bool, n: &NodeInfo) -> CliResult {
    if json {
        return print_json(n);
    }
    outln!("{:<14}{}", "memory total", human_mib(n.memory_total_mib))?;
    outln!("{:<14}{}", "memory free", human_mib(n.memory_free_mib))?;
    outln!("{:<14}{}", "memory node", human_mib(n.memory_dom0_mib))?;
    outln!(
        "{:<14}{} ({} sockets, {} NUMA nodes)",
        "CPUs",
        n.cpu_total,
        n.cpu_sockets,
        n.cpu_nodes
    )?;
    match n.hv_version {
        Some((a, b, c)) => outln!("{:<14}{a}.{b}.{c}", "QEMU"),
        None => outln!("{:<14}not found", "QEMU"),
    }
}

/// `gkvm stats`: a line per instance for a person.
pub(crate) fn stats(json: bool, stats: &[hv_kvm::InstanceStats]) -> CliResult {
    if json {
        return print_json(&stats);
    }
    outln!(
        "{:<24} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "NAME",
        "CPU s",
        "RSS",
        "DISK READ",
        "DISK WRITE",
        "NET RX",
        "NET TX"
    )?;
    for s in stats {
        let sum = |f: fn(&hv_kvm::DiskStats) -> u64| s.disks.iter().map(f).sum::<u64>();
        let net = |f: fn(&hv_kvm::NicStats) -> u64| s.nics.iter().map(f).sum::<u64>();
        outln!(
            "{:<24} {:>10.2} {:>10} {:>12} {:>12} {:>12} {:>12}",
            s.name,
            s.cpu_time_secs,
            human_mib(s.rss_bytes >> 20),
            human_mib(sum(|d| d.read_bytes) >> 20),
            human_mib(sum(|d| d.write_bytes) >> 20),
            human_mib(net(|n| n.rx_bytes) >> 20),
            human_mib(net(|n| n.tx_bytes) >> 20)
        )?;
    }
    Ok(())
}

/// `gkvm stats --prometheus`: Prometheus's text exposition format, one
/// family per counter, labelled by instance (and vCPU, disk, TAP).
pub(crate) fn stats_prometheus(stats: &[hv_kvm::InstanceStats]) -> CliResult {
    let out = prometheus_text(stats);
    outln!("{}", out.trim_end())
}

/// The stats in Prometheus's text exposition format (0.0.4).
pub(crate) fn prometheus_text(stats: &[hv_kvm::InstanceStats]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        out.push_str(&format!(
            "# HELP gkvm_{name} {help}\n# TYPE gkvm_{name} {kind}\n"
        ));
        for (labels, value) in samples {
            out.push_str(&format!("gkvm_{name}{{{labels}}} {value}\n"));
        }
    };
    let inst = |s: &hv_kvm::InstanceStats| format!("instance=\"{}\"", label(&s.name));
    family(
        "cpu_seconds_total",
        "counter",
        "CPU time of the instance's QEMU.",
        stats
            .iter()
            .map(|s| (inst(s), s.cpu_time_secs.to_string()))
            .collect(),
    );
    family(
        "vcpu_seconds_total",
        "counter",
        "CPU time of each vCPU thread.",
        stats
            .iter()
            .flat_map(|s| {
                s.vcpus.iter().map(move |v| {
                    (
                        format!("{},vcpu=\"{}\"", inst(s), v.index),
                        v.cpu_time_secs.to_string(),
                    )
                })
            })
            .collect(),
    );
    family(
        "resident_memory_bytes",
        "gauge",
        "Resident memory of the instance's QEMU on the host.",
        stats
            .iter()
            .map(|s| (inst(s), s.rss_bytes.to_string()))
            .collect(),
    );
    family(
        "proportional_memory_bytes",
        "gauge",
        "Proportional share of memory (PSS) of the instance's QEMU on the host.",
        stats
            .iter()
            .filter_map(|s| Some((inst(s), s.pss_bytes?.to_string())))
            .collect(),
    );
    family(
        "balloon_bytes",
        "gauge",
        "The guest's memory as its balloon sets it.",
        stats
            .iter()
            .filter_map(|s| Some((inst(s), s.balloon_bytes?.to_string())))
            .collect(),
    );
    type GuestField = fn(&hv_kvm::GuestMemoryStats) -> Option<u64>;
    let guest_families: [(&str, &str, GuestField); 3] = [
        (
            "guest_memory_total_bytes",
            "Memory the guest sees, as its balloon driver says.",
            |g| Some(g.total_bytes),
        ),
        (
            "guest_memory_free_bytes",
            "Memory the guest leaves unused, as its balloon driver says.",
            |g| Some(g.free_bytes),
        ),
        (
            "guest_memory_available_bytes",
            "Memory the guest could use without swapping, as its balloon driver says.",
            |g| g.available_bytes,
        ),
    ];
    for (name, help, field) in guest_families {
        let samples = stats
            .iter()
            .filter_map(|s| Some((inst(s), field(s.guest_memory.as_ref()?)?.to_string())))
            .collect();
        family(name, "gauge", help, samples);
    }
    family(
        "cgroup_cpu_seconds_total",
        "counter",
        "CPU time of the instance's cgroup (QEMU and its helpers).",
        stats
            .iter()
            .filter_map(|s| Some((inst(s), s.cgroup_cpu_secs?.to_string())))
            .collect(),
    );
    type DiskField = fn(&hv_kvm::DiskStats) -> u64;
    let disk_families: [(&str, &str, DiskField); 5] = [
        ("disk_read_bytes_total", "Bytes read by the guest.", |d| {
            d.read_bytes
        }),
        (
            "disk_written_bytes_total",
            "Bytes written by the guest.",
            |d| d.write_bytes,
        ),
        ("disk_reads_total", "Read requests.", |d| d.read_ops),
        ("disk_writes_total", "Write requests.", |d| d.write_ops),
        ("disk_flushes_total", "Flush requests.", |d| d.flush_ops),
    ];
    for (name, help, field) in disk_families {
        let samples = per_device(stats, |s| &s.disks, "device", |d| &d.device, field);
        family(name, "counter", help, samples);
    }
    type NicField = fn(&hv_kvm::NicStats) -> u64;
    let nic_families: [(&str, &str, NicField); 4] = [
        (
            "network_receive_bytes_total",
            "Bytes the guest received.",
            |n| n.rx_bytes,
        ),
        (
            "network_transmit_bytes_total",
            "Bytes the guest sent.",
            |n| n.tx_bytes,
        ),
        (
            "network_receive_packets_total",
            "Packets the guest received.",
            |n| n.rx_packets,
        ),
        (
            "network_transmit_packets_total",
            "Packets the guest sent.",
            |n| n.tx_packets,
        ),
    ];
    for (name, help, field) in nic_families {
        let samples = per_device(stats, |s| &s.nics, "tap", |n| &n.tap, field);
        family(name, "counter", help, samples);
    }
    out
}

/// One sample per device of every instance (its disks, its NICs),
/// labelled by instance and by `key` (the device's name).
fn per_device<T>(
    stats: &[hv_kvm::InstanceStats],
    devices: impl Fn(&hv_kvm::InstanceStats) -> &[T],
    key: &str,
    name: impl Fn(&T) -> &str,
    value: fn(&T) -> u64,
) -> Vec<(String, String)> {
    stats
        .iter()
        .flat_map(|s| {
            devices(s).iter().map(|d| {
                (
                    format!(
                        "instance=\"{}\",{key}=\"{}\"",
                        label(&s.name),
                        label(name(d))
                    ),
                    value(d).to_string(),
                )
            })
        })
        .collect()
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `gkvm console-info`.
pub(crate) fn console_info(json: bool, c: &ConsoleInfo) -> CliResult {
    if json {
        return print_json(c);
    }
    match c {
        ConsoleInfo::Serial {
            socket, command, ..
        } => outln!(
            "serial console on {}\nattach with: {}",
            socket.display(),
            shell_join(command)
        ),
        ConsoleInfo::Vnc {
            host,
            port,
            display,
            ..
        } => outln!("VNC on {host}:{port} (display :{display})"),
        ConsoleInfo::Spice { host, port, .. } => outln!("SPICE on {host}:{port}"),
        ConsoleInfo::Message { message, .. } => outln!("{message}"),
        other => outln!("{}", serde_json::to_string(other)?),
    }
}

/// `gkvm verify`: the report, then a failure if it found problems.
pub(crate) fn verify(json: bool, report: &VerifyReport) -> CliResult {
    if json {
        print_json(report)?;
    } else {
        for w in &report.warnings {
            outln!("warning: {w}")?;
        }
        if report.problems.is_empty() {
            outln!("node OK")?;
        }
        for p in &report.problems {
            outln!("problem: {p}")?;
        }
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::from(format!(
            "{} problem(s) found",
            report.problems.len()
        )))
    }
}

/// `gkvm argv`: the command line; the parameter warnings on stderr (in
/// the JSON document with `--json`).
pub(crate) fn plan(json: bool, plan: &LaunchPlan) -> CliResult {
    if json {
        return print_json(plan);
    }
    for w in &plan.warnings {
        errln!("gkvm: warning: {w}");
    }
    outln!("{}", shell_join(&plan.argv))
}

/// `gkvm caps`.
pub(crate) fn caps(json: bool, caps: &Capabilities) -> CliResult {
    if json {
        print_json(caps)
    } else {
        caps_summary(caps)
    }
}

/// `gkvm migration-status`.
pub(crate) fn migration_status(json: bool, name: &str, s: &MigrationStatus) -> CliResult {
    if json {
        return print_json(s);
    }
    outln!(
        "{name}: {} {:.0}% ({} of {} MiB sent, {} MiB left)",
        s.status,
        s.progress * 100.0,
        s.transferred_bytes >> 20,
        s.total_bytes >> 20,
        s.remaining_bytes >> 20
    )
}

/// The end of `gkvm migrate` (with `--json`, the progress lines said it).
pub(crate) fn migrated(
    json: bool,
    name: &str,
    to: &str,
    took: std::time::Duration,
    s: &MigrationStatus,
) -> CliResult {
    if json {
        return Ok(());
    }
    outln!(
        "{name} migrated to {to} in {} (QEMU: {} ms, downtime {} ms)",
        hv_kvm::human_duration(&took),
        s.total_time_ms.unwrap_or(0),
        s.downtime_ms.unwrap_or(0)
    )
}

/// One JSON line of `gkvm migrate --json` progress.
/// `accept --json`'s first line (`schemas/v1/accept-listening.json`):
/// QEMU listens at `host:port`, a source may start the migration.
pub(crate) fn listening_line(host: &str, port: u16) -> CliResult {
    let line = serde_json::json!({
        "listening": true,
        "address": host_port(host, port),
        "port": port,
    });
    outln!("{line}")
}

pub(crate) fn migration_progress_line(s: &MigrationStatus) -> CliResult {
    outln!("{}", serde_json::to_string(s)?)
}
