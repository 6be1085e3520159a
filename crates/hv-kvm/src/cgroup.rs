//! An instance's own cgroup, limited by its `cgroup_*` hvparams: made and
//! limited before its helpers and QEMU start (they join it before they
//! exec), limits changed live (`set_limits`), removed by every cleanup
//! (`kvm_runtime::cgroup`).

use std::path::PathBuf;

use kvm_cmdline::{HvParams, InstanceSpec};
use kvm_runtime::cgroup::{BlockDev, CgroupLimits, IoMax};
use kvm_runtime::InstancePaths;

use crate::error::{Error, Result};
use crate::KvmHypervisor;

/// The limits the hvparams ask for (0: none).
pub(crate) fn limits_of(hv: &HvParams) -> CgroupLimits {
    let some = |v: u32| (v > 0).then_some(u64::from(v));
    CgroupLimits {
        cpu_quota_pct: some(hv.cgroup_cpu_quota),
        cpu_weight: some(hv.cgroup_cpu_weight),
        memory_max: some(hv.cgroup_memory_max).map(|m| m << 20),
        memory_high: some(hv.cgroup_memory_high).map(|m| m << 20),
        pids_max: some(hv.cgroup_pids_max),
        io_weight: some(hv.cgroup_io_weight),
    }
}

fn failed(name: &str, e: kvm_runtime::Error) -> Error {
    Error::Start {
        instance: name.to_owned(),
        step: "cgroup",
        reason: e.to_string(),
    }
}

/// The host block devices under the instance's disks, each once (a disk
/// QEMU opens by URI, or on a filesystem without one, has none).
pub(crate) fn disk_devices(spec: &InstanceSpec) -> Vec<BlockDev> {
    let mut devs: Vec<BlockDev> = spec
        .disks
        .iter()
        .filter(|d| d.uri.is_none())
        .filter_map(|d| BlockDev::under(&d.path))
        .collect();
    devs.sort();
    devs.dedup();
    devs
}

/// Writes the instance's limits to its cgroup: the controllers' and, per
/// backing device of its disks, the I/O ceilings.
pub(crate) fn apply_limits(
    spec: &InstanceSpec,
    paths: &InstancePaths,
) -> std::result::Result<(), kvm_runtime::Error> {
    paths.cgroup.apply(&limits_of(&spec.hvparams))?;
    // Checked when the spec was.
    let max = spec.hvparams.cgroup_io_max().unwrap_or_default();
    paths.cgroup.apply_io_max(
        &disk_devices(spec),
        &IoMax {
            read_bps: max.read_bps,
            write_bps: max.write_bps,
            read_iops: max.read_iops,
            write_iops: max.write_iops,
        },
    )
}

impl KvmHypervisor {
    /// Makes the instance's own cgroup, where the node has cgroups, and
    /// writes its limits; returns the `cgroup.procs` files its processes
    /// join. Without limits a node without cgroups (or one that refuses
    /// gkvm a cgroup) starts the instance where gkvm runs, with a warning;
    /// with limits that fails the start. The start's rollback removes it.
    pub(crate) fn prepare_cgroup(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
    ) -> Result<Vec<PathBuf>> {
        let name = spec.name.as_str();
        let limited = spec.hvparams.has_cgroup_limits();
        if !limited && paths.cgroup.layout().is_none() {
            return Ok(Vec::new());
        }
        let procs = match paths.cgroup.create() {
            Ok(procs) => procs,
            Err(e) if !limited => {
                tracing::warn!(instance = %name, error = %e, "no cgroup of its own");
                return Ok(Vec::new());
            }
            Err(e) => return Err(failed(name, e)),
        };
        if limited {
            apply_limits(spec, paths).map_err(|e| failed(name, e))?;
        }
        Ok(procs)
    }
}
