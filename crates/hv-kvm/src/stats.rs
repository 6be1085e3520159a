//! Per-instance statistics without a daemon: what the host's own
//! counters say (each vCPU thread's CPU time from `/proc`, QEMU's resident
//! memory, the TAPs' counters from sysfs) and what one QMP connection says
//! (the vCPU threads, the block devices' counters, the balloon).

use std::time::Duration;

use gkvm_qmp::{commands, Qmp};
use kvm_runtime::InstancePaths;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::KvmHypervisor;

/// One instance's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct InstanceStats {
    /// Its name.
    pub name: String,
    /// QEMU's pid.
    pub pid: i32,
    /// QEMU's CPU time (every thread), in seconds.
    pub cpu_time_secs: f64,
    /// QEMU's resident memory on the host, in bytes.
    pub rss_bytes: u64,
    /// QEMU's proportional share of memory on the host (`Pss` of
    /// `/proc/PID/smaps_rollup`: pages it shares with other processes
    /// count in part), in bytes; only when asked ([`StatsOptions::pss`]).
    #[serde(default)]
    pub pss_bytes: Option<u64>,
    /// The balloon's size (the guest's memory), in bytes, when QEMU said.
    pub balloon_bytes: Option<u64>,
    /// Each vCPU's thread and its CPU time (empty when QEMU did not
    /// answer).
    pub vcpus: Vec<VcpuStats>,
    /// Each block device's counters (empty when QEMU did not answer).
    pub disks: Vec<DiskStats>,
    /// Each NIC's counters, as the guest sees them (from its TAP's).
    pub nics: Vec<NicStats>,
    /// What the guest's balloon driver says of its memory; `None` until
    /// it has said (the first call asks it to, every 2 s), or without a
    /// balloon.
    #[serde(default)]
    pub guest_memory: Option<GuestMemoryStats>,
    /// The CPU time of the instance's cgroup (QEMU and its helpers), in
    /// seconds, when it has one (`cgroup_*` limits).
    #[serde(default)]
    pub cgroup_cpu_secs: Option<f64>,
}

/// The guest's memory as its balloon driver reports it (virtio-balloon
/// statistics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct GuestMemoryStats {
    /// Memory the guest sees, in bytes.
    pub total_bytes: u64,
    /// Memory it leaves unused, in bytes.
    pub free_bytes: u64,
    /// Memory it could use without swapping, in bytes, when it says.
    pub available_bytes: Option<u64>,
    /// When it last said (seconds since the epoch).
    pub last_update: u64,
}

/// A vCPU's thread and its CPU time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct VcpuStats {
    /// The vCPU's index.
    pub index: u32,
    /// The host thread that runs it.
    pub thread_id: i64,
    /// Its CPU time, in seconds.
    pub cpu_time_secs: f64,
}

/// A block device's counters since the instance started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct DiskStats {
    /// The guest device's id (`disk-…`, the CD-ROM's, the flash's), else
    /// QEMU's name for it.
    pub device: String,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read requests.
    pub read_ops: u64,
    /// Write requests.
    pub write_ops: u64,
    /// Flush requests.
    pub flush_ops: u64,
    /// Time spent reading, in nanoseconds.
    pub read_time_ns: u64,
    /// Time spent writing, in nanoseconds.
    pub write_time_ns: u64,
}

/// A NIC's counters as the guest sees them: what it received is what its
/// TAP sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct NicStats {
    /// The TAP on the host.
    pub tap: String,
    /// Bytes the guest received.
    pub rx_bytes: u64,
    /// Bytes the guest sent.
    pub tx_bytes: u64,
    /// Packets the guest received.
    pub rx_packets: u64,
    /// Packets the guest sent.
    pub tx_packets: u64,
}

/// What [`KvmHypervisor::stats_with`] reads beyond the counters it always
/// reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsOptions {
    /// QEMU's proportional memory (PSS). The kernel walks QEMU's page
    /// tables for it: about 0.35 ms of CPU per instance on a small
    /// guest, more on a large one, where every other counter of an
    /// instance costs a few microseconds.
    pub pss: bool,
}

impl StatsOptions {
    /// These options, with PSS read or not.
    #[must_use]
    pub fn with_pss(mut self, pss: bool) -> Self {
        self.pss = pss;
        self
    }
}

impl KvmHypervisor {
    /// The counters of the named running instances (all of them when
    /// `names` is empty; one that does not run is an error, as for
    /// `info`). QEMU's answers are bounded by `info_timeout`: a QEMU that
    /// does not answer leaves its disks and balloon out.
    pub async fn stats(&self, names: &[String]) -> Result<Vec<InstanceStats>> {
        self.stats_with(names, StatsOptions::default()).await
    }

    /// [`Self::stats`], reading what `options` ask for too.
    pub async fn stats_with(
        &self,
        names: &[String],
        options: StatsOptions,
    ) -> Result<Vec<InstanceStats>> {
        let instances = if names.is_empty() {
            self.running()?
        } else {
            let mut found = Vec::with_capacity(names.len());
            for name in names {
                let paths = self.paths(name)?;
                let pid = self.running_pid(&paths)?;
                found.push((paths, pid));
            }
            found
        };
        let count = instances.len();
        let mut set = tokio::task::JoinSet::new();
        for (i, (paths, pid)) in instances.into_iter().enumerate() {
            let timeout = self.config.info_timeout;
            set.spawn(async move { (i, instance_stats(paths, pid, timeout, options).await) });
        }
        let mut out: Vec<(usize, InstanceStats)> = Vec::with_capacity(count);
        while let Some(r) = set.join_next().await {
            if let Ok(one) = r {
                out.push(one);
            }
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }
}

async fn instance_stats(
    paths: InstancePaths,
    pid: i32,
    timeout: Duration,
    options: StatsOptions,
) -> InstanceStats {
    let threads = kvm_runtime::thread_stats(pid);
    // QEMU names its vCPU threads (`debug-threads=on`, which gkvm
    // passes): then /proc alone gives them, and QEMU is asked one
    // question less.
    let mut vcpus: Vec<VcpuStats> = threads
        .iter()
        .filter_map(|(tid, name, stat)| {
            Some(VcpuStats {
                index: vcpu_index(name)?,
                thread_id: i64::from(*tid),
                cpu_time_secs: stat.cpu_secs(),
            })
        })
        .collect();
    vcpus.sort_by_key(|v| v.index);
    let ask_cpus = vcpus.is_empty();
    let answers = tokio::time::timeout(timeout, async {
        let qmp = Qmp::connect(&paths.qmp, crate::query::bounded(timeout))
            .await
            .ok()?;
        let cpus = async {
            if ask_cpus {
                qmp.run(&commands::QueryCpusFast).await.ok()
            } else {
                None
            }
        };
        let (cpus, blocks, balloon, guest) = tokio::join!(
            cpus,
            qmp.run(&commands::QueryBlockstats),
            qmp.run(&commands::QueryBalloon),
            guest_memory(&qmp)
        );
        Some((cpus, blocks.ok(), balloon.ok(), guest))
    })
    .await
    .ok()
    .flatten();
    let (cpus, blocks, balloon, guest_memory) = answers.unwrap_or((None, None, None, None));
    if let Some(cpus) = cpus {
        vcpus = cpus
            .into_iter()
            .map(|c| VcpuStats {
                index: c.cpu_index,
                thread_id: c.thread_id,
                cpu_time_secs: threads
                    .iter()
                    .find(|(tid, _, _)| i64::from(*tid) == c.thread_id)
                    .map_or(0.0, |(_, _, s)| s.cpu_secs()),
            })
            .collect();
    }
    let disks = blocks
        .unwrap_or_default()
        .into_iter()
        .map(|b| DiskStats {
            device: device_name(&b),
            read_bytes: b.stats.rd_bytes,
            write_bytes: b.stats.wr_bytes,
            read_ops: b.stats.rd_operations,
            write_ops: b.stats.wr_operations,
            flush_ops: b.stats.flush_operations,
            read_time_ns: b.stats.rd_total_time_ns,
            write_time_ns: b.stats.wr_total_time_ns,
        })
        .collect();
    let nics = paths
        .read_nics()
        .unwrap_or_default()
        .into_iter()
        .map(|tap| nic_stats(&tap))
        .collect();
    let memory = host_memory(pid, options.pss);
    InstanceStats {
        name: paths.name.clone(),
        pid,
        cpu_time_secs: kvm_runtime::proc_stat(pid).map_or(0.0, |s| s.cpu_secs()),
        rss_bytes: memory.rss.unwrap_or(0),
        pss_bytes: memory.pss,
        balloon_bytes: balloon.map(|b| b.actual),
        vcpus,
        disks,
        nics,
        guest_memory,
        cgroup_cpu_secs: paths
            .cgroup
            .cpu_usage_ns()
            .map(|ns| Duration::from_nanos(ns).as_secs_f64()),
    }
}

/// The balloon device of an instance gkvm started (`-device
/// virtio-balloon-pci,id=balloon0`).
pub(crate) const BALLOON: &str = "/machine/peripheral/balloon0";

/// How often QEMU asks the guest's balloon driver for its statistics (set
/// at start).
pub(crate) const GUEST_STATS_INTERVAL_SECS: u64 = 2;

/// The guest's memory statistics from its balloon driver, once it has
/// reported (QEMU polls it from the start).
async fn guest_memory(qmp: &Qmp) -> Option<GuestMemoryStats> {
    let stats = qmp
        .run(&commands::QomGet {
            path: BALLOON.into(),
            property: "guest-stats".into(),
        })
        .await
        .ok()?;
    let last_update = stats
        .get("last-update")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let value = |k: &str| {
        stats
            .get("stats")?
            .get(k)?
            .as_u64()
            // QEMU says -1 (u64::MAX as JSON) for what the guest did not.
            .filter(|v| *v != u64::MAX)
    };
    if last_update == 0 {
        return None;
    }
    Some(GuestMemoryStats {
        total_bytes: value("stat-total-memory")?,
        free_bytes: value("stat-free-memory")?,
        available_bytes: value("stat-available-memory"),
        last_update,
    })
}

/// The vCPU index in the name QEMU gives a vCPU's thread (`CPU 3/KVM`,
/// `CPU 0/TCG`).
fn vcpu_index(thread_name: &str) -> Option<u32> {
    let (index, _accel) = thread_name.strip_prefix("CPU ")?.split_once('/')?;
    index.parse().ok()
}

/// The guest device's id from QEMU's QOM path (`/machine/peripheral/ID/…`),
/// else QEMU's own name for the device.
fn device_name(b: &commands::BlockStats) -> String {
    if let Some(qdev) = b.qdev.as_deref().filter(|q| !q.is_empty()) {
        return qdev
            .strip_prefix("/machine/peripheral/")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or(qdev)
            .to_owned();
    }
    if !b.device.is_empty() {
        return b.device.clone();
    }
    b.node_name.clone().unwrap_or_default()
}

/// A process's memory on the host, in bytes.
#[derive(Debug, Default, PartialEq, Eq)]
struct HostMemory {
    rss: Option<u64>,
    pss: Option<u64>,
}

/// QEMU's memory on the host: with `pss`, `Rss` and `Pss` of
/// `/proc/PID/smaps_rollup` (one read, but the kernel walks the page
/// tables); else, or on a kernel without the rollup, `VmRSS` of
/// `/proc/PID/status` (a counter the kernel keeps).
fn host_memory(pid: i32, pss: bool) -> HostMemory {
    if let Some(text) = pss
        .then(|| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .flatten()
    {
        let memory = HostMemory {
            rss: kib_field(&text, "Rss:"),
            pss: kib_field(&text, "Pss:"),
        };
        if memory.rss.is_some() {
            return memory;
        }
    }
    HostMemory {
        rss: std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|text| kib_field(&text, "VmRSS:")),
        pss: None,
    }
}

/// A `NAME:   N kB` line of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// A TAP's counters, turned to the guest's side.
fn nic_stats(tap: &str) -> NicStats {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{what}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    NicStats {
        tap: tap.to_owned(),
        rx_bytes: read("tx_bytes"),
        tx_bytes: read("rx_bytes"),
        rx_packets: read("tx_packets"),
        tx_packets: read("rx_packets"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_devices_are_named_by_their_guest_device() {
        let stats = |device: &str, node: Option<&str>, qdev: Option<&str>| {
            serde_json::from_value::<commands::BlockStats>(serde_json::json!({
                "device": device, "node-name": node, "qdev": qdev,
                "stats": {"rd_bytes": 1}
            }))
            .unwrap()
        };
        let named = |d: &str, n: Option<&str>, q: Option<&str>| device_name(&stats(d, n, q));
        assert_eq!(
            named(
                "",
                None,
                Some("/machine/peripheral/disk-ab12/virtio-backend")
            ),
            "disk-ab12"
        );
        assert_eq!(named("", Some("gkvm-fw-vars"), None), "gkvm-fw-vars");
        assert_eq!(named("ide0-cd0", None, Some("")), "ide0-cd0");
        assert_eq!(stats("", None, None).stats.rd_bytes, 1);
    }

    #[test]
    fn vcpu_threads_are_known_by_their_names() {
        assert_eq!(vcpu_index("CPU 0/KVM"), Some(0));
        assert_eq!(vcpu_index("CPU 12/TCG"), Some(12));
        assert_eq!(vcpu_index("CPU x/KVM"), None);
        assert_eq!(vcpu_index("CPU 1"), None);
        assert_eq!(vcpu_index("IO mon_iothread"), None);
        assert_eq!(vcpu_index("qemu-system-x86"), None);
    }

    #[test]
    fn host_memory_is_read_from_proc() {
        let text = "5562-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  20900 kB\nPss:  12353 kB\nPss_Dirty: 1 kB\n";
        assert_eq!(kib_field(text, "Rss:"), Some(20900 * 1024));
        assert_eq!(kib_field(text, "Pss:"), Some(12353 * 1024));
        assert_eq!(kib_field(text, "Swap:"), None);
        assert_eq!(kib_field("Rss: many kB", "Rss:"), None);
        let me = std::process::id().cast_signed();
        let with = host_memory(me, true);
        assert!(with.rss.unwrap() > 0 && with.pss.unwrap() > 0, "{with:?}");
        let without = host_memory(me, false);
        assert!(
            without.rss.unwrap() > 0 && without.pss.is_none(),
            "{without:?}"
        );
        assert_eq!(host_memory(-1, true), HostMemory::default());
    }
}
