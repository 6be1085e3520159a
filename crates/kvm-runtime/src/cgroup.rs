//! An instance's own cgroup: where its QEMU and helpers run when it has
//! resource limits (`cgroup_*` hvparams), made before they start, its
//! limits written and changed live, its counters read, and removed by
//! every cleanup. Both layouts of the kernel: cgroup v2 (one unified
//! tree: `cpu.max`, `cpu.weight`, `memory.max`, `memory.high`,
//! `pids.max`, `io.weight`; what Debian 12 hosts have) and v1 (a tree per
//! controller: `cpu`, `cpuacct`, `memory`, `pids`, `blkio`).

use std::path::{Path, PathBuf};

use crate::Error;

/// Where the kernel's cgroup trees are mounted.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers an instance's cgroup has a directory in.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "blkio"];

/// The CFS period gkvm sets (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// What an instance's cgroup limits (none: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// CPU time, in percent of one CPU (150: one and a half).
    pub cpu_quota_pct: Option<u64>,
    /// CPU weight against other cgroups (1 to 10000; 100 is the default).
    pub cpu_weight: Option<u64>,
    /// Memory it may never exceed, in bytes (its processes are reclaimed,
    /// then killed).
    pub memory_max: Option<u64>,
    /// Memory above which it is reclaimed first under pressure, in bytes
    /// (v2 `memory.high`, v1 `memory.soft_limit_in_bytes`).
    pub memory_high: Option<u64>,
    /// Processes and threads it may have.
    pub pids_max: Option<u64>,
    /// Block I/O weight (1 to 10000; 100 is the default; v1's `blkio`
    /// takes 10 to 1000, where the kernel's I/O scheduler has it).
    pub io_weight: Option<u64>,
}

/// Block I/O ceilings on one host block device (none: no ceiling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoMax {
    /// Bytes read a second.
    pub read_bps: Option<u64>,
    /// Bytes written a second.
    pub write_bps: Option<u64>,
    /// Read operations a second.
    pub read_iops: Option<u64>,
    /// Write operations a second.
    pub write_iops: Option<u64>,
}

/// A host block device, by its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockDev {
    /// Its major number.
    pub major: u32,
    /// Its minor number.
    pub minor: u32,
}

impl std::fmt::Display for BlockDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl BlockDev {
    /// The whole disk whose I/O reads and writes `path` (a block device,
    /// or a file on one), as the kernel's I/O controllers take it: a
    /// partition is turned into its disk. `None` for a file on a
    /// filesystem without a block device (tmpfs, NFS) or a path that
    /// does not exist.
    pub fn under(path: &Path) -> Option<BlockDev> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path).ok()?;
        let dev = if meta.file_type().is_block_device() {
            meta.rdev()
        } else {
            meta.dev()
        };
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        if !sys.exists() {
            return None;
        }
        // A partition's sysfs directory sits in its disk's.
        if sys.join("partition").exists() {
            let disk = std::fs::read_to_string(sys.join("../dev")).ok()?;
            let (major, minor) = disk.trim().split_once(':')?;
            return Some(BlockDev {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
            });
        }
        Some(BlockDev { major, minor })
    }
}

/// An instance's place in the cgroup trees: `ROOT[/CONTROLLER]/GROUP`,
/// with GROUP `gkvm/NAME` for the default run directory and
/// `gkvm-HASH/NAME` for another (so two run directories' instances of one
/// name do not share one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlace {
    root: PathBuf,
    group: PathBuf,
}

/// Which layout the trees under a root have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// One unified tree with controllers (`cgroup.controllers`).
    V2,
    /// A tree per controller (`ROOT/cpu`, `ROOT/memory`, ...).
    V1,
}

impl CgroupPlace {
    pub(crate) fn new(root: &Path, run_dir: &Path, name: &str) -> CgroupPlace {
        let parent = if run_dir == Path::new(crate::layout::DEFAULT_ROOT) {
            "gkvm".to_owned()
        } else {
            let h = run_dir
                .as_os_str()
                .as_encoded_bytes()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
                });
            format!("gkvm-{:08x}", h & 0xffff_ffff)
        };
        CgroupPlace {
            root: root.to_owned(),
            group: Path::new(&parent).join(name),
        }
    }

    /// The layout of the trees under the root: v2 when the root is a
    /// unified tree with controllers, v1 when it has per-controller
    /// trees, `None` when neither (no cgroups to use).
    pub fn layout(&self) -> Option<CgroupLayout> {
        trees(&self.root).map(|(layout, _)| layout)
    }

    /// The instance's directories: one (v2), or one per v1 controller
    /// mounted here, with its controller's name.
    pub fn dirs(&self) -> Vec<(&'static str, PathBuf)> {
        match trees(&self.root) {
            Some((CgroupLayout::V2, _)) => vec![("", self.root.join(&self.group))],
            Some((CgroupLayout::V1, controllers)) => controllers
                .into_iter()
                .map(|c| (c, self.root.join(c).join(&self.group)))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Makes the instance's cgroup (and, on v2, turns on the controllers
    /// it needs on the way down). Returns the `cgroup.procs` files a
    /// process writes itself into to join it.
    pub fn create(&self) -> Result<Vec<PathBuf>, Error> {
        let layout = self.layout().ok_or_else(|| Error::Io {
            op: "find cgroups",
            path: self.root.clone(),
            source: std::io::Error::other("no cgroup v2 controllers nor v1 hierarchies there"),
        })?;
        if layout == CgroupLayout::V2 {
            let mut at = self.root.clone();
            for part in self.group.iter() {
                enable_controllers(&at);
                at.push(part);
                mkdir(&at)?;
            }
        }
        // The group is PARENT/NAME under each tree (made above on v2).
        let mut procs = Vec::new();
        for (_, dir) in self.dirs() {
            if let Some(parent) = dir.parent() {
                mkdir(parent)?;
            }
            mkdir(&dir)?;
            procs.push(dir.join("cgroup.procs"));
        }
        Ok(procs)
    }

    /// Writes `limits` (a limit left out is lifted).
    pub fn apply(&self, limits: &CgroupLimits) -> Result<(), Error> {
        let Some(layout) = self.layout() else {
            return Ok(());
        };
        let bytes_or = |v: Option<u64>, none: &str| v.map_or(none.to_owned(), |b| b.to_string());
        let mut writes: Vec<(PathBuf, String)> = Vec::new();
        for (controller, dir) in self.dirs() {
            if !dir.is_dir() {
                continue;
            }
            match (layout, controller) {
                (CgroupLayout::V2, _) => {
                    let quota = limits
                        .cpu_quota_pct
                        .map_or("max".to_owned(), |p| (p * CPU_PERIOD_US / 100).to_string());
                    writes.push((dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}")));
                    writes.push((
                        dir.join("cpu.weight"),
                        limits.cpu_weight.unwrap_or(100).to_string(),
                    ));
                    writes.push((dir.join("memory.max"), bytes_or(limits.memory_max, "max")));
                    writes.push((dir.join("memory.high"), bytes_or(limits.memory_high, "max")));
                    writes.push((dir.join("pids.max"), bytes_or(limits.pids_max, "max")));
                    writes.push((
                        dir.join("io.weight"),
                        format!("default {}", limits.io_weight.unwrap_or(100)),
                    ));
                }
                (CgroupLayout::V1, "cpu") => {
                    writes.push((dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string()));
                    let quota = limits
                        .cpu_quota_pct
                        .map_or("-1".to_owned(), |p| (p * CPU_PERIOD_US / 100).to_string());
                    writes.push((dir.join("cpu.cfs_quota_us"), quota));
                    let shares = limits.cpu_weight.map_or(1024, |w| (w * 1024 / 100).max(2));
                    writes.push((dir.join("cpu.shares"), shares.to_string()));
                }
                (CgroupLayout::V1, "memory") => {
                    // v1 takes the hard and the soft limit in either order.
                    writes.push((
                        dir.join("memory.limit_in_bytes"),
                        bytes_or(limits.memory_max, "-1"),
                    ));
                    writes.push((
                        dir.join("memory.soft_limit_in_bytes"),
                        bytes_or(limits.memory_high, "-1"),
                    ));
                }
                (CgroupLayout::V1, "pids") => {
                    writes.push((dir.join("pids.max"), bytes_or(limits.pids_max, "max")));
                }
                (CgroupLayout::V1, "blkio") => {
                    let w = limits.io_weight.map_or(500, |w| (w / 10).clamp(10, 1000));
                    writes.push((dir.join("blkio.weight"), w.to_string()));
                }
                _ => {}
            }
        }
        // A controller a kernel lacks (v1 blkio.weight without BFQ, a
        // v2 io.weight without the io controller) has no file: that
        // limit is not there to set, unless one was asked for.
        writes.retain(|(file, _)| file.exists());
        write_values(writes, "write a cgroup limit")
    }

    /// Writes the I/O ceilings `max` for each of `devices` (a ceiling
    /// left out is lifted): v2 `io.max`, v1 the `blkio.throttle.*`
    /// files. A kernel without them is an error naming the file.
    pub fn apply_io_max(&self, devices: &[BlockDev], max: &IoMax) -> Result<(), Error> {
        let Some(layout) = self.layout() else {
            return Ok(());
        };
        let mut writes: Vec<(PathBuf, String)> = Vec::new();
        for (controller, dir) in self.dirs() {
            for dev in devices {
                match (layout, controller) {
                    (CgroupLayout::V2, _) => {
                        let v = |v: Option<u64>| v.map_or("max".to_owned(), |n| n.to_string());
                        writes.push((
                            dir.join("io.max"),
                            format!(
                                "{dev} rbps={} wbps={} riops={} wiops={}",
                                v(max.read_bps),
                                v(max.write_bps),
                                v(max.read_iops),
                                v(max.write_iops)
                            ),
                        ));
                    }
                    (CgroupLayout::V1, "blkio") => {
                        for (file, value) in [
                            ("blkio.throttle.read_bps_device", max.read_bps),
                            ("blkio.throttle.write_bps_device", max.write_bps),
                            ("blkio.throttle.read_iops_device", max.read_iops),
                            ("blkio.throttle.write_iops_device", max.write_iops),
                        ] {
                            // 0 removes the device's rule.
                            writes.push((dir.join(file), format!("{dev} {}", value.unwrap_or(0))));
                        }
                    }
                    _ => {}
                }
            }
        }
        write_values(writes, "write a cgroup I/O ceiling")
    }

    /// The CPU time the cgroup's processes have used, in nanoseconds
    /// (v2 `cpu.stat`'s `usage_usec`, v1 `cpuacct.usage`).
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        for (controller, dir) in self.dirs() {
            match controller {
                "" => {
                    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
                    return stat
                        .lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|us| us * 1000);
                }
                "cpuacct" => {
                    return std::fs::read_to_string(dir.join("cpuacct.usage"))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                }
                _ => {}
            }
        }
        None
    }

    /// Whether the instance has a cgroup of its own now.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|(_, d)| d.is_dir())
    }

    /// Removes the instance's cgroup once its QEMU is gone, and its
    /// parent when that is empty. The cgroup is the instance's alone:
    /// a process still alive in it then is a part of the instance that
    /// outlived it (a QEMU stopped half-way through daemonizing, a helper,
    /// a child of a start that was interrupted before it exec'd), and is
    /// killed. A cgroup that still cannot go is an error naming it.
    pub fn remove(&self) -> Result<(), Error> {
        for (_, dir) in self.dirs() {
            // The kernel keeps a process in its cgroup until it is reaped,
            // and an orphan's reaper (init) may take a while: zombies are
            // waited for, live processes killed first.
            let deadline = std::time::Instant::now() + ZOMBIE_WAIT;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && std::time::Instant::now() < deadline =>
                    {
                        kill_live_members(&dir);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(Error::Io {
                            op: "remove the instance's cgroup",
                            path: dir,
                            source: e,
                        })
                    }
                }
            }
            if let Some(parent) = dir.parent() {
                // Shared with the other instances: gone once the last is.
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}

/// The layout under `root` and, for v1, the controllers mounted there:
/// looked at once per process for a root that has cgroups (they are
/// mounted at boot; every operation of a long-lived process asks).
fn trees(root: &Path) -> Option<(CgroupLayout, Vec<&'static str>)> {
    type Seen = std::collections::HashMap<PathBuf, (CgroupLayout, Vec<&'static str>)>;
    static SEEN: std::sync::OnceLock<std::sync::Mutex<Seen>> = std::sync::OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(known) = seen.lock().ok()?.get(root) {
        return Some(known.clone());
    }
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"));
    let found = if controllers.is_ok_and(|c| !c.trim().is_empty()) {
        (CgroupLayout::V2, Vec::new())
    } else {
        let v1: Vec<&'static str> = V1_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| root.join(c).join("cgroup.procs").is_file())
            .collect();
        if v1.is_empty() {
            return None;
        }
        (CgroupLayout::V1, v1)
    };
    seen.lock().ok()?.insert(root.to_owned(), found.clone());
    Some(found)
}

/// Writes each value to its cgroup file; a refused one is an error
/// naming the file and the value.
fn write_values(writes: Vec<(PathBuf, String)>, op: &'static str) -> Result<(), Error> {
    for (file, value) in writes {
        std::fs::write(&file, &value).map_err(|e| Error::Io {
            op,
            path: file.clone(),
            source: std::io::Error::new(e.kind(), format!("{value}: {e}")),
        })?;
    }
    Ok(())
}

/// How long a cgroup's zombies may take to be reaped before its removal
/// fails.
const ZOMBIE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Kills every live process the cgroup at `dir` lists (SIGKILL: what is
/// left of an instance whose QEMU is gone).
fn kill_live_members(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|p| *p > 1 && !crate::is_zombie_or_gone(*p))
    {
        tracing::warn!(pid, cgroup = %dir.display(), "ending a process left in the instance's cgroup");
        // SAFETY: kill(2) of a process in the instance's own cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn mkdir(dir: &Path) -> Result<(), Error> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Io {
            op: "make the instance's cgroup",
            path: dir.to_owned(),
            source: e,
        }),
    }
}

/// Turns on, for the children of v2 cgroup `dir`, the controllers an
/// instance's limits use that `dir` has (best effort: one it lacks is not
/// there to limit).
fn enable_controllers(dir: &Path) {
    let Ok(have) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    for c in ["cpu", "memory", "pids", "io"] {
        if have.split_whitespace().any(|h| h == c) {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 tree laid out as the kernel's (the files it has), in a
    /// temporary directory.
    fn v2_tree(root: &Path) {
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
    }

    /// What the kernel makes in a new v2 cgroup (a directory here: the
    /// test makes its files after `create`).
    fn v2_files(dir: &Path) {
        for f in [
            "cgroup.procs",
            "cgroup.controllers",
            "cgroup.subtree_control",
            "cpu.max",
            "cpu.weight",
            "cpu.stat",
            "memory.max",
            "memory.high",
            "pids.max",
            "io.weight",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        std::fs::write(dir.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
    }

    #[test]
    fn a_v2_tree_gets_the_instances_cgroup_and_its_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        v2_tree(root);
        let place = CgroupPlace::new(root, Path::new("/run/gkvm"), "vm1");
        assert_eq!(place.layout(), Some(CgroupLayout::V2));
        let procs = place.create().unwrap();
        let dir = root.join("gkvm/vm1");
        assert_eq!(procs, [dir.join("cgroup.procs")]);
        // The controllers were turned on above it.
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+io"
        );
        v2_files(&dir);
        place
            .apply(&CgroupLimits {
                cpu_quota_pct: Some(150),
                cpu_weight: Some(200),
                memory_max: Some(256 << 20),
                memory_high: None,
                pids_max: Some(64),
                io_weight: Some(50),
            })
            .unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("cpu.max"), "150000 100000");
        assert_eq!(read("cpu.weight"), "200");
        assert_eq!(read("memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("memory.high"), "max");
        assert_eq!(read("pids.max"), "64");
        assert_eq!(read("io.weight"), "default 50");
        assert_eq!(place.cpu_usage_ns(), Some(1_500_000));
        // Lifted.
        place.apply(&CgroupLimits::default()).unwrap();
        assert_eq!(read("cpu.max"), "max 100000");
        assert_eq!(read("memory.max"), "max");
        // A real cgroup directory has only kernel files, which rmdir
        // takes with it; the fake one's go first.
        for e in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        place.remove().unwrap();
        assert!(!dir.exists() && !root.join("gkvm").exists());
        place.remove().unwrap();
    }

    #[test]
    fn io_ceilings_are_written_per_device_in_both_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("v2");
        std::fs::create_dir(&root).unwrap();
        v2_tree(&root);
        let place = CgroupPlace::new(&root, Path::new("/run/gkvm"), "vm1");
        place.create().unwrap();
        let dir = root.join("gkvm/vm1");
        let devs = [
            BlockDev {
                major: 254,
                minor: 0,
            },
            BlockDev {
                major: 8,
                minor: 16,
            },
        ];
        let max = IoMax {
            read_bps: Some(20 << 20),
            write_iops: Some(500),
            ..IoMax::default()
        };
        // The kernel's io.max takes one device a write; a file here keeps
        // the last.
        place.apply_io_max(&devs[..1], &max).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("io.max")).unwrap(),
            "254:0 rbps=20971520 wbps=max riops=max wiops=500"
        );
        // v1: the blkio controller's four throttle files.
        let root = tmp.path().join("v1");
        for c in V1_CONTROLLERS {
            std::fs::create_dir_all(root.join(c)).unwrap();
            std::fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
        let place = CgroupPlace::new(&root, Path::new("/run/gkvm"), "vm1");
        place.create().unwrap();
        place.apply_io_max(&devs[1..], &max).unwrap();
        let read = |f: &str| std::fs::read_to_string(root.join("blkio/gkvm/vm1").join(f)).unwrap();
        assert_eq!(read("blkio.throttle.read_bps_device"), "8:16 20971520");
        assert_eq!(read("blkio.throttle.write_bps_device"), "8:16 0");
        assert_eq!(read("blkio.throttle.write_iops_device"), "8:16 500");
        // The disk under a file, and under a partition, is the whole disk.
        let here = BlockDev::under(tmp.path());
        if let Some(dev) = here {
            let sys = format!("/sys/dev/block/{dev}");
            assert!(!Path::new(&sys).join("partition").exists(), "{sys}");
        }
        assert_eq!(BlockDev::under(Path::new("/nonexistent/file")), None);
        assert_eq!(BlockDev::under(Path::new("/proc/self/stat")), None);
    }

    #[test]
    fn run_dirs_get_their_own_parent_and_no_cgroups_is_said() {
        let tmp = tempfile::tempdir().unwrap();
        let a = CgroupPlace::new(tmp.path(), Path::new("/run/gkvm"), "vm1");
        let b = CgroupPlace::new(tmp.path(), Path::new("/tmp/other-run"), "vm1");
        assert_ne!(a.group, b.group);
        assert!(b.group.to_string_lossy().starts_with("gkvm-"));
        assert_eq!(a.layout(), None);
        assert!(a.dirs().is_empty());
        assert!(a.create().is_err());
        a.remove().unwrap();
    }
}
