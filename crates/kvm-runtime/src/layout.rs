//! The run directory and the paths of one instance.

use std::path::{Path, PathBuf};

use crate::fsutil::{
    ensure_private_dir, list_dir, read_nofollow, remove_file, remove_socket, remove_tmp_files,
    write_atomic_volatile,
};
use crate::{validate_name, Error};

/// gkvm's default run directory.
pub const DEFAULT_ROOT: &str = "/run/gkvm";
/// Ganeti's KVM driver's (Ganeti's) run directory for KVM.
pub const GANETI_ROOT: &str = "/var/run/ganeti/kvm-hypervisor";

/// Longest Unix socket path (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

const SUBDIRS: [&str; 8] = [
    "pid",
    "uid",
    "ctrl",
    "conf",
    "nic",
    "keymap",
    "chroot",
    "chroot-quarantine",
];

/// A node's run directory: where every instance's pid, sockets, runtime
/// file, NIC records, keymap and chroot live. The file names are Ganeti
/// driver's, so a `RunDir` at Ganeti's root ([`RunDir::ganeti`]) reads and
/// writes a Ganeti node's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
    cgroup_root: PathBuf,
}

impl Default for RunDir {
    fn default() -> Self {
        RunDir::new(DEFAULT_ROOT)
    }
}

impl RunDir {
    /// A run directory rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir {
            root: root.into(),
            cgroup_root: PathBuf::from(crate::cgroup::DEFAULT_CGROUP_ROOT),
        }
    }

    /// The same run directory, its instances' cgroups under `root`
    /// instead of `/sys/fs/cgroup` (a test's tree).
    pub fn with_cgroup_root(mut self, root: impl Into<PathBuf>) -> RunDir {
        self.cgroup_root = root.into();
        self
    }

    /// Ganeti's KVM driver's layout preset: `/var/run/ganeti/kvm-hypervisor`.
    pub fn ganeti() -> RunDir {
        RunDir::new(GANETI_ROOT)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the root and its subdirectories with mode 0700 (fine to
    /// call on every operation: the run dir may live on a wiped tmpfs).
    /// Existing ones must be owned by this user and writable by nobody
    /// else ([`Error::Untrusted`] otherwise); they are never chmodded.
    pub fn ensure(&self) -> Result<(), Error> {
        ensure_private_dir(&self.root)?;
        for d in SUBDIRS {
            ensure_private_dir(&self.root.join(d))?;
        }
        Ok(())
    }

    /// The paths of instance `name`, after checking the name.
    pub fn instance(&self, name: &str) -> Result<InstancePaths, Error> {
        validate_name(name)?;
        self.check_not_a_link()?;
        self.paths_of(name)
    }

    /// The paths of every instance this run dir knows of
    /// ([`Self::instances`]), the run dir checked once.
    pub fn all_instances(&self) -> Result<Vec<InstancePaths>, Error> {
        self.instances()?
            .iter()
            .map(|name| self.paths_of(name))
            .collect()
    }

    /// An instance's paths; `name` is valid and the run dir checked.
    fn paths_of(&self, name: &str) -> Result<InstancePaths, Error> {
        let ctrl = self.root.join("ctrl");
        let paths = InstancePaths {
            name: name.to_owned(),
            pid: self.root.join("pid").join(name),
            uid: self.root.join("uid").join(name),
            monitor: ctrl.join(format!("{name}.monitor")),
            serial: ctrl.join(format!("{name}.serial")),
            qmp: ctrl.join(format!("{name}.qmp")),
            qmp_watch: ctrl.join(format!("{name}.qmp-watch")),
            guest_agent: ctrl.join(format!("{name}.qga")),
            tpm: ctrl.join(format!("{name}.tpm")),
            tpm_pid: ctrl.join(format!("{name}.tpm.pid")),
            lock: ctrl.join(format!("{name}.lock")),
            events: ctrl.join(format!("{name}.events")),
            runtime: self.root.join("conf").join(format!("{name}.runtime")),
            hotplug: self.root.join("conf").join(format!("{name}.hotplug")),
            nic_dir: self.root.join("nic").join(name),
            keymap: self.root.join("keymap").join(name),
            chroot: self.root.join("chroot").join(name),
            quarantine_dir: self.root.join("chroot-quarantine"),
            cgroup: crate::cgroup::CgroupPlace::new(&self.cgroup_root, &self.root, name),
        };
        for sock in [
            &paths.monitor,
            &paths.serial,
            &paths.qmp,
            &paths.qmp_watch,
            &paths.guest_agent,
            &paths.tpm,
        ] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(Error::SocketPathTooLong { path: sock.clone() });
            }
        }
        Ok(paths)
    }

    /// The run dir itself is a directory, not a symlink (or does not exist
    /// yet): the one rule every command keeps, so that a list never shows
    /// what a start would refuse to touch.
    fn check_not_a_link(&self) -> Result<(), Error> {
        match std::fs::symlink_metadata(&self.root) {
            Ok(m) if !m.is_dir() => Err(Error::UnexpectedFileType {
                path: self.root.clone(),
                expected: "directory",
            }),
            _ => Ok(()),
        }
    }

    /// Names of the instances that have a pid file (running or stale).
    /// A run dir that is a symlink is refused, as every operation that
    /// writes in it refuses it; one that does not exist has none.
    pub fn instances_with_pid_files(&self) -> Result<Vec<String>, Error> {
        self.check_not_a_link()?;
        let mut names: Vec<String> = list_dir(&self.root.join("pid"))?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| validate_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Names of every instance this run dir knows of: a pid file, a
    /// runtime file or a QMP socket is enough (a lost pid file must not
    /// make a running instance invisible), sorted and without duplicates.
    pub fn instances(&self) -> Result<Vec<String>, Error> {
        let mut names = self.instances_with_pid_files()?;
        for (dir, suffix) in [("conf", ".runtime"), ("ctrl", ".qmp")] {
            for (file, _) in list_dir(&self.root.join(dir))? {
                if let Some(n) = file.strip_suffix(suffix) {
                    if validate_name(n).is_ok() {
                        names.push(n.to_owned());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The node-wide lock file (for allocations such as the uid pool).
    pub fn node_lock_path(&self) -> PathBuf {
        self.root.join("ctrl").join(".node.lock")
    }
}

/// Where one instance's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePaths {
    /// The (validated) instance name.
    pub name: String,
    /// `pid/<name>`: QEMU's pid.
    pub pid: PathBuf,
    /// `uid/<name>`: the uid taken from the pool.
    pub uid: PathBuf,
    /// `ctrl/<name>.monitor`: Ganeti's HMP socket (removed on cleanup).
    pub monitor: PathBuf,
    /// `ctrl/<name>.serial`: the serial console socket.
    pub serial: PathBuf,
    /// `ctrl/<name>.qmp`: the QMP socket.
    pub qmp: PathBuf,
    /// `ctrl/<name>.qmp-watch`: a second QMP socket for long-lived
    /// watchers (a migration being followed), so the first stays free for
    /// short queries (QEMU serves one client per QMP socket).
    pub qmp_watch: PathBuf,
    /// `ctrl/<name>.qga`: the guest agent's socket (`use_guest_agent`,
    /// Ganeti 3.1's name).
    pub guest_agent: PathBuf,
    /// `ctrl/<name>.tpm`: the control socket of the instance's TPM
    /// emulator (a swtpm, `tpm=tpm2`).
    pub tpm: PathBuf,
    /// `ctrl/<name>.tpm.pid`: the swtpm's pid file.
    pub tpm_pid: PathBuf,
    /// `ctrl/<name>.lock`: the per-instance operation lock.
    pub lock: PathBuf,
    /// `ctrl/<name>.events`: QEMU's event log, a QMP monitor on a pipe
    /// chardev whose input is `<name>.events.in` (the negotiation, written
    /// before QEMU starts) and whose output `<name>.events.out` collects
    /// every event QEMU sends: how an instance ended, without a daemon.
    pub events: PathBuf,
    /// `conf/<name>.runtime`: the runtime file.
    pub runtime: PathBuf,
    /// `conf/<name>.hotplug`: the hot plug journal — what a hot plug was
    /// doing, written before it touches QEMU and removed once the runtime
    /// file says the outcome (opaque here).
    pub hotplug: PathBuf,
    /// `nic/<name>/`: one file per NIC naming its TAP.
    pub nic_dir: PathBuf,
    /// `keymap/<name>`: the VNC keymap file.
    pub keymap: PathBuf,
    /// `chroot/<name>`: the chroot directory.
    pub chroot: PathBuf,
    /// `chroot-quarantine/`: where non-empty chroots are moved.
    pub quarantine_dir: PathBuf,
    /// The instance's own cgroup, when it has limits.
    pub cgroup: crate::cgroup::CgroupPlace,
}

/// What [`InstancePaths::cleanup`] did that the caller may want to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupReport {
    /// The uid given back to the pool, if one was recorded.
    pub released_uid: Option<u32>,
    /// Where a non-empty chroot was moved.
    pub quarantined_chroot: Option<PathBuf>,
}

impl InstancePaths {
    /// `nic/<name>/<seq>`.
    pub fn nic_file(&self, seq: usize) -> PathBuf {
        self.nic_dir.join(seq.to_string())
    }

    /// Records the TAP interface of NIC `seq`.
    pub fn write_nic(&self, seq: usize, interface: &str) -> Result<(), Error> {
        ensure_private_dir(&self.nic_dir)?;
        // State of a running process: atomic, not durable (see write_runtime).
        write_atomic_volatile(&self.nic_file(seq), interface.as_bytes())
    }

    /// Records every NIC's TAP interface at once (after a hot plug or
    /// unplug), removing the records of NICs beyond them.
    pub fn write_nics(&self, interfaces: &[String]) -> Result<(), Error> {
        self.write_nics_from(interfaces, 0)
    }

    /// [`Self::write_nics`] when the records before `first` are already
    /// right: only NICs `first..` are written (a hot-added NIC writes one
    /// file, not all of them).
    pub fn write_nics_from(&self, interfaces: &[String], first: usize) -> Result<(), Error> {
        for (seq, name) in interfaces.iter().enumerate().skip(first) {
            self.write_nic(seq, name)?;
        }
        for seq in interfaces.len().. {
            match std::fs::remove_file(self.nic_file(seq)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => {
                    return Err(Error::Io {
                        op: "remove",
                        path: self.nic_file(seq),
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }

    /// The recorded TAP interfaces, in NIC order.
    pub fn read_nics(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for seq in 0.. {
            match read_nofollow(&self.nic_file(seq))? {
                Some(b) => out.push(String::from_utf8_lossy(&b).trim().to_owned()),
                None => break,
            }
        }
        Ok(out)
    }

    /// `ctrl/<name>.events.in`: what QEMU's event monitor reads.
    pub fn events_in(&self) -> PathBuf {
        self.ctrl_file("events.in")
    }

    /// `ctrl/<name>.events.out`: the events QEMU wrote.
    pub fn events_out(&self) -> PathBuf {
        self.ctrl_file("events.out")
    }

    fn ctrl_file(&self, suffix: &str) -> PathBuf {
        self.events
            .with_file_name(format!("{}.{suffix}", self.name))
    }

    /// Prepares QEMU's event log for a new QEMU: the input says
    /// `qmp_capabilities` (so QEMU sends events), the output is empty.
    /// Both 0600, never through a symlink.
    pub fn prepare_event_log(&self) -> Result<(), Error> {
        if let Some(dir) = self.events.parent() {
            ensure_private_dir(dir)?;
        }
        write_atomic_volatile(&self.events_in(), b"{\"execute\":\"qmp_capabilities\"}\n")?;
        write_atomic_volatile(&self.events_out(), b"")
    }

    /// The last events QEMU wrote (at most the last `max` bytes of the
    /// log, whole lines only); empty without a log.
    pub fn read_events(&self, max: u64) -> Result<Vec<u8>, Error> {
        crate::fsutil::read_tail_nofollow(&self.events_out(), max)
    }

    /// Replaces the hot plug journal (atomic, not durable: it describes a
    /// running process, as the runtime file does); `None` removes it.
    pub fn write_hotplug_journal(&self, data: Option<&[u8]>) -> Result<(), Error> {
        match data {
            Some(d) => write_atomic_volatile(&self.hotplug, d),
            None => remove_file(&self.hotplug),
        }
    }

    /// The hot plug journal, if there is one (never through a symlink).
    pub fn read_hotplug_journal(&self) -> Result<Option<Vec<u8>>, Error> {
        read_nofollow(&self.hotplug)
    }

    /// Writes the keymap file atomically.
    pub fn write_keymap(&self, content: &str) -> Result<(), Error> {
        write_atomic_volatile(&self.keymap, content.as_bytes())
    }

    /// Removes everything the instance left: pid file, sockets, runtime
    /// file (and temp files of killed writers), NIC records, keymap and
    /// lock; gives its uid back (the uid file goes); removes an empty
    /// chroot and moves a non-empty one to the quarantine. Idempotent.
    /// A socket that still accepts connections is never removed
    /// ([`Error::SocketInUse`]): its QEMU still runs.
    pub fn cleanup(&self) -> Result<CleanupReport, Error> {
        let report = self.clear_state()?;
        // Last: the lock file (lockers re-check the inode after locking).
        remove_file(&self.lock)?;
        Ok(report)
    }

    /// [`InstancePaths::cleanup`] without removing the lock file: for an
    /// operation that clears leftovers and then goes on under its lock
    /// (removing a held lock's file would let a second locker in).
    pub fn clear_state(&self) -> Result<CleanupReport, Error> {
        let mut report = CleanupReport::default();
        // A socket some process still serves stops everything (it may be
        // a QEMU this run dir does not know of: its files stay).
        for s in [
            &self.monitor,
            &self.serial,
            &self.qmp,
            &self.qmp_watch,
            &self.guest_agent,
        ] {
            remove_socket(s)?;
        }
        // QEMU is gone: so go the helpers it had (one whose gkvm was
        // killed before its QEMU started still waits for it), and then
        // the cgroup they ran in.
        self.stop_helpers()?;
        self.cgroup.remove()?;
        // Then every file that can go goes, even when one cannot (a
        // directory planted at a file's place): the first error is
        // returned after the rest is removed.
        let mut first_error = None;
        let mut keep = |r: Result<(), Error>| {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        };
        let (events_in, events_out) = (self.events_in(), self.events_out());
        for f in [
            &self.pid,
            &self.runtime,
            &self.hotplug,
            &self.keymap,
            &events_in,
            &events_out,
        ] {
            keep(remove_file(f));
            keep(remove_tmp_files(f));
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        report.released_uid = crate::uid::release(self)?;
        match std::fs::remove_dir_all(&self.nic_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &self.nic_dir, e)),
        }
        report.quarantined_chroot = self.remove_chroot()?;
        Ok(report)
    }

    fn remove_chroot(&self) -> Result<Option<PathBuf>, Error> {
        match std::fs::symlink_metadata(&self.chroot) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("stat", &self.chroot, e)),
            Ok(m) if !m.is_dir() => {
                return Err(Error::UnexpectedFileType {
                    path: self.chroot.clone(),
                    expected: "directory",
                })
            }
            Ok(_) => {}
        }
        match std::fs::remove_dir(&self.chroot) {
            Ok(()) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                ensure_private_dir(&self.quarantine_dir)?;
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let dest = self.quarantine_dir.join(format!(
                    "{}-{stamp}-{}",
                    self.name,
                    std::process::id()
                ));
                std::fs::rename(&self.chroot, &dest)
                    .map_err(|e| Error::io("quarantine chroot", &self.chroot, e))?;
                tracing::warn!(
                    instance = %self.name,
                    quarantine = %dest.display(),
                    "chroot was not empty; moved to quarantine for inspection"
                );
                Ok(Some(dest))
            }
            Err(e) => Err(Error::io("remove", &self.chroot, e)),
        }
    }
}
