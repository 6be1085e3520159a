//! Per-instance statistics without a daemon: what the host's own
//! counters say (each vCPU thread's CPU time from `/proc`, QEMU's resident
//! memory, the TAPs' counters from sysfs) and what one QMP connection says
//! (the vCPU threads, the block devices' counters, the balloon).

use std::path::Path;
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

impl KvmHypervisor {
    /// The counters of the named running instances (all of them when
    /// `names` is empty; one that does not run is an error, as for
    /// `info`). QEMU's answers are bounded by `info_timeout`: a QEMU that
    /// does not answer leaves its vCPUs, disks and balloon out.
    pub async fn stats(&self, names: &[String]) -> Result<Vec<InstanceStats>> {
        let names = if names.is_empty() {
            self.list()?
        } else {
            names.to_vec()
        };
        let mut set = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let paths = self.paths(name)?;
            let pid = self.running_pid(&paths)?;
            let timeout = self.config.info_timeout;
            set.spawn(async move { (i, instance_stats(paths, pid, timeout).await) });
        }
        let mut out: Vec<(usize, InstanceStats)> = Vec::with_capacity(names.len());
        while let Some(r) = set.join_next().await {
            if let Ok(one) = r {
                out.push(one);
            }
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }
}

async fn instance_stats(paths: InstancePaths, pid: i32, timeout: Duration) -> InstanceStats {
    let options = crate::query::bounded(timeout);
    let answers = tokio::time::timeout(timeout, async {
        let qmp = Qmp::connect(&paths.qmp, options).await.ok()?;
        let (cpus, blocks, balloon, guest) = tokio::join!(
            qmp.run(&commands::QueryCpusFast),
            qmp.run(&commands::QueryBlockstats),
            qmp.run(&commands::QueryBalloon),
            guest_memory(&qmp)
        );
        Some((cpus.ok(), blocks.ok(), balloon.ok(), guest))
    })
    .await
    .ok()
    .flatten();
    let (cpus, blocks, balloon, guest_memory) = answers.unwrap_or((None, None, None, None));
    let vcpus = cpus
        .unwrap_or_default()
        .into_iter()
        .map(|c| VcpuStats {
            index: c.cpu_index,
            thread_id: c.thread_id,
            cpu_time_secs: i32::try_from(c.thread_id)
                .ok()
                .and_then(|tid| thread_stat(pid, tid))
                .map_or(0.0, |s| s.cpu_secs()),
        })
        .collect();
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
    InstanceStats {
        name: paths.name.clone(),
        pid,
        cpu_time_secs: kvm_runtime::proc_stat(pid).map_or(0.0, |s| s.cpu_secs()),
        rss_bytes: rss_bytes(pid),
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

/// A thread's stat (`/proc/PID/task/TID/stat`).
fn thread_stat(pid: i32, tid: i32) -> Option<kvm_runtime::ProcStat> {
    // A thread's stat is also at /proc/TID/stat, but only a thread of
    // this QEMU counts.
    Path::new(&format!("/proc/{pid}/task/{tid}"))
        .exists()
        .then(|| kvm_runtime::proc_stat(tid))
        .flatten()
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

/// QEMU's resident memory (`VmRSS` of `/proc/PID/status`), in bytes.
fn rss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
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
}
