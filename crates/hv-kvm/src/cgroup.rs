//! An instance's cgroup from its `cgroup_*` hvparams: made and limited
//! before its helpers and QEMU start (they join it before they exec),
//! limits changed live (`set_limits`), removed by every cleanup
//! (`kvm_runtime::cgroup`).

use std::path::PathBuf;

use kvm_cmdline::{HvParams, InstanceSpec};
use kvm_runtime::cgroup::CgroupLimits;
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

impl KvmHypervisor {
    /// Makes the instance's cgroup with its limits when it has any;
    /// returns the `cgroup.procs` files its processes join (none without
    /// limits). The start's rollback removes it.
    pub(crate) fn prepare_cgroup(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
    ) -> Result<Vec<PathBuf>> {
        if !spec.hvparams.has_cgroup_limits() {
            return Ok(Vec::new());
        }
        let name = spec.name.as_str();
        let procs = paths.cgroup.create().map_err(|e| failed(name, e))?;
        paths
            .cgroup
            .apply(&limits_of(&spec.hvparams))
            .map_err(|e| failed(name, e))?;
        Ok(procs)
    }
}
