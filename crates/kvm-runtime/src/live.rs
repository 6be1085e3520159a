//! Pid files and liveness: is the process named in the pid file the QEMU
//! of this instance?

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::fsutil::{read_nofollow, remove_file, write_atomic};
use crate::{Error, InstancePaths};

/// How long a socket may stay served by no identifiable process before
/// the instance counts as unidentified.
const UNIDENTIFIED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What the pid file says about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Liveness {
    /// The pid file names a live (non-zombie) process whose command line
    /// carries `-name <instance>`.
    Running {
        /// QEMU's pid.
        pid: i32,
    },
    /// The pid file names a pid that is dead, a zombie, or another program.
    Stale {
        /// The pid in the file.
        pid: i32,
    },
    /// There is no pid file.
    NoPidFile,
}

impl Liveness {
    /// The pid of a running instance.
    pub fn running_pid(self) -> Option<i32> {
        match self {
            Liveness::Running { pid } => Some(pid),
            _ => None,
        }
    }
}

impl InstancePaths {
    /// Records QEMU's pid atomically.
    pub fn write_pid(&self, pid: i32) -> Result<(), Error> {
        write_atomic(&self.pid, format!("{pid}\n").as_bytes())
    }

    /// The pid in the pid file, if there is a readable one.
    pub fn read_pid(&self) -> Result<Option<i32>, Error> {
        let Some(data) = read_nofollow(&self.pid)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&data);
        match text.trim().parse::<i32>() {
            Ok(pid) if pid > 0 => Ok(Some(pid)),
            _ => Err(Error::Corrupt {
                path: self.pid.clone(),
                reason: format!("not a pid: {:?}", text.trim()),
            }),
        }
    }

    /// Removes the pid file.
    pub fn remove_pid(&self) -> Result<(), Error> {
        remove_file(&self.pid)
    }

    /// Whether the instance runs. The pid file is a hint, never the only
    /// identity: a pid is trusted only if `/proc` shows a live (non-zombie)
    /// process with this instance's `-name` (and `-pidfile`, when its
    /// command line has one). When the pid file is missing, garbled or
    /// stale, `/proc` is searched for the QEMU that owns the instance (its
    /// `-pidfile` is this instance's pid file); if none is found but one of
    /// the instance's sockets still accepts connections, the owner cannot
    /// be identified and [`Error::Unidentified`] is returned, so that no
    /// caller cleans up or starts a second copy.
    pub fn liveness(&self) -> Result<Liveness, Error> {
        let from_file = match self.read_pid() {
            Ok(Some(pid)) if self.is_our_process(pid) => return Ok(Liveness::Running { pid }),
            Ok(Some(pid)) => Liveness::Stale { pid },
            Ok(None) => Liveness::NoPidFile,
            // A torn or garbage pid file cannot name a running instance.
            // Nor can a symlink or a device planted in its place.
            Err(
                Error::Corrupt { .. } | Error::TooLarge { .. } | Error::UnexpectedFileType { .. },
            ) => Liveness::Stale { pid: 0 },
            Err(e) => return Err(e),
        };
        // A process that is exiting has lost its command line before its
        // sockets close: give such a transient state a moment to pass.
        let deadline = std::time::Instant::now() + UNIDENTIFIED_GRACE;
        loop {
            if let Some(pid) = self.find_process() {
                // While an operation runs (a start that has not recorded
                // the pid yet) this is expected, not a sign of tampering.
                if self.operation_in_progress() {
                    tracing::debug!(instance = %self.name, pid,
                        "found in /proc while an operation is under way");
                } else {
                    tracing::warn!(instance = %self.name, pid, pid_file = %self.pid.display(),
                        "the pid file does not name the running QEMU; found it in /proc");
                }
                return Ok(Liveness::Running { pid });
            }
            let served = [&self.qmp, &self.qmp_watch, &self.serial, &self.guest_agent]
                .into_iter()
                .find(|s| crate::fsutil::socket_in_use(s));
            match served {
                None => return Ok(from_file),
                Some(socket) if std::time::Instant::now() >= deadline => {
                    return Err(Error::Unidentified {
                        instance: self.name.clone(),
                        socket: socket.clone(),
                    })
                }
                Some(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    /// Whether `pid` is a live QEMU of this instance: `-name` matches and,
    /// if its command line names a pid file, it is this one.
    pub fn is_our_process(&self, pid: i32) -> bool {
        if pid <= 0 || is_zombie_or_gone(pid) {
            return false;
        }
        cmdline(pid).is_some_and(|args| self.cmdline_is_ours(&args))
    }

    fn cmdline_is_ours(&self, args: &[Vec<u8>]) -> bool {
        let value = |flag: &[u8]| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
        };
        let name_ok = value(b"-name").is_some_and(|v| name_matches(v, &self.name));
        let pidfile_ok = value(b"-pidfile").is_none_or(|v| self.is_pid_file(v));
        name_ok && pidfile_ok
    }

    /// Whether a `-pidfile` argument names this instance's pid file: the
    /// same path, or the same file name in the same directory reached by
    /// another path (a run directory given as `/var/run/...` by one tool
    /// and `/run/...` by another, or through a symlink).
    fn is_pid_file(&self, arg: &[u8]) -> bool {
        use std::os::unix::fs::MetadataExt;
        let arg = Path::new(std::ffi::OsStr::from_bytes(arg));
        if arg == self.pid {
            return true;
        }
        let (Some(dir), Some(name)) = (arg.parent(), arg.file_name()) else {
            return false;
        };
        let (Some(own_dir), Some(own_name)) = (self.pid.parent(), self.pid.file_name()) else {
            return false;
        };
        if name != own_name || !arg.is_absolute() {
            return false;
        }
        match (std::fs::metadata(dir), std::fs::metadata(own_dir)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// The live QEMU whose `-pidfile` is this instance's pid file and whose
    /// `-name` is this instance, found by scanning `/proc`.
    pub fn find_process(&self) -> Option<i32> {
        let me = std::process::id().cast_signed();
        let needle = self.pid.as_os_str().as_bytes();
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me)
            .find(|&pid| {
                let Some(args) = cmdline(pid) else {
                    return false;
                };
                args.windows(2)
                    .any(|w| w[0] == b"-pidfile" && (w[1] == needle || self.is_pid_file(&w[1])))
                    && self.cmdline_is_ours(&args)
                    && !is_zombie_or_gone(pid)
            })
    }
}

fn cmdline(pid: i32) -> Option<Vec<Vec<u8>>> {
    let raw = std::fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline")).ok()?;
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    Some(raw.split(|&b| b == 0).map(<[u8]>::to_vec).collect())
}

/// Whether `pid` is a live, non-zombie process whose command line has
/// `-name <name>` (also `-name guest=<name>,...` and `-name <name>,...`).
pub fn process_runs_instance(pid: i32, name: &str) -> bool {
    if pid <= 0 || is_zombie_or_gone(pid) {
        return false;
    }
    let Some(args) = cmdline(pid) else {
        return false;
    };
    args.iter()
        .position(|a| a == b"-name")
        .and_then(|i| args.get(i + 1))
        .is_some_and(|v| name_matches(v, name))
}

fn name_matches(value: &[u8], name: &str) -> bool {
    let value = String::from_utf8_lossy(value);
    let first = value.split(',').next().unwrap_or("");
    first == name || first.strip_prefix("guest=") == Some(name)
}

/// Whether the process is gone or a zombie (state `Z` or `X`).
pub fn is_zombie_or_gone(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state follows the last ')' (the command name may contain any byte).
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => matches!(state, "Z" | "X" | "x"),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn a_pid_file_reached_by_another_path_is_the_same() {
        // A symlink above the run dir (as /var/run is to /run): the run
        // dir itself may not be one.
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real").join("run");
        std::fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real"), tmp.path().join("alias")).unwrap();
        let alias = tmp.path().join("alias").join("run");
        let ours = crate::RunDir::new(&alias).instance("vm1").unwrap();
        let other_dir = tmp.path().join("other");
        std::fs::create_dir(&other_dir).unwrap();
        let pid_of = |dir: &Path, name: &str| dir.join("pid").join(name);
        std::fs::create_dir(real.join("pid")).unwrap();
        std::fs::create_dir(other_dir.join("pid")).unwrap();
        let via = |p: std::path::PathBuf| {
            args(&["qemu", "-name", "vm1", "-pidfile", p.to_str().unwrap()])
        };
        assert!(ours.cmdline_is_ours(&via(pid_of(&alias, "vm1"))));
        assert!(ours.cmdline_is_ours(&via(pid_of(&real, "vm1"))));
        assert!(!ours.cmdline_is_ours(&via(pid_of(&other_dir, "vm1"))));
        assert!(!ours.cmdline_is_ours(&via(pid_of(&real, "vm2"))));
        assert!(!ours.cmdline_is_ours(&args(&["qemu", "-name", "vm1", "-pidfile", "pid/vm1"])));
    }
}
