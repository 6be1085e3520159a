//! Pid files and liveness: is the process named in the pid file the QEMU
//! of this instance?

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::fsutil::{read_nofollow, remove_file, write_atomic};
use crate::memo::Memo;
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
    ///
    /// A pid file read before and unchanged since (the same inode, size
    /// and times) is not read again (every instance's pid file is read on
    /// every `list`).
    pub fn read_pid(&self) -> Result<Option<i32>, Error> {
        let key = crate::fsutil::file_key(&self.pid);
        if let Some(k) = key {
            if let Some(pid) = PIDS.find(&self.pid, |(was, pid)| (*was == k).then_some(*pid)) {
                return Ok(Some(pid));
            }
        }
        let Some(data) = read_small(&self.pid)? else {
            return Ok(None);
        };
        let pid = self.parse_pid(&data)?;
        // Remembered only if the file did not change while it was read.
        if let Some(k) = key {
            if crate::fsutil::file_key(&self.pid) == Some(k) {
                PIDS.put(self.pid.clone(), (k, pid));
            }
        }
        Ok(Some(pid))
    }

    fn parse_pid(&self, data: &[u8]) -> Result<i32, Error> {
        let text = String::from_utf8_lossy(data);
        match text.trim().parse::<i32>() {
            Ok(pid) if pid > 0 => Ok(pid),
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
        self.liveness_stat().map(|(l, _)| l)
    }

    /// [`Self::liveness`], with what `/proc/PID/stat` said of a running
    /// QEMU named by its pid file (its CPU time, for `list`).
    pub fn liveness_stat(&self) -> Result<(Liveness, Option<ProcStat>), Error> {
        let from_file = match self.read_pid() {
            Ok(Some(pid)) => match self.our_process_stat(pid) {
                Some(stat) => return Ok((Liveness::Running { pid }, Some(stat))),
                None => Liveness::Stale { pid },
            },
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
                return Ok((Liveness::Running { pid }, None));
            }
            let served = [&self.qmp, &self.qmp_watch, &self.serial, &self.guest_agent]
                .into_iter()
                .find(|s| crate::fsutil::socket_in_use(s));
            match served {
                None => return Ok((from_file, None)),
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
    ///
    /// A process found to be ours is remembered by its pid and start time
    /// (which no other process shares), so that a long-lived caller (the
    /// server answering `info` every few seconds) reads its command line
    /// once: a process's command line changes only if it execs another
    /// program (QEMU does not) or writes over its own arguments.
    pub fn is_our_process(&self, pid: i32) -> bool {
        self.our_process_stat(pid).is_some()
    }

    /// [`Self::is_our_process`], with what `/proc/PID/stat` said of it.
    pub fn our_process_stat(&self, pid: i32) -> Option<ProcStat> {
        let stat = proc_stat(pid).filter(|s| pid > 0 && !s.is_zombie())?;
        let key = (pid, stat.start_ticks);
        if IDENTIFIED
            .find(&key, |file| (*file == self.pid).then_some(()))
            .is_some()
        {
            return Some(stat);
        }
        let ours = cmdline(pid).is_some_and(|args| self.cmdline_is_ours(&args));
        if ours {
            IDENTIFIED.put(key, self.pid.clone());
        }
        ours.then_some(stat)
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
        crate::fsutil::same_place(Path::new(std::ffi::OsStr::from_bytes(arg)), &self.pid)
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

/// A small regular file (a pid file), read as [`read_nofollow`] reads
/// it but in one read call (every instance's pid file is read on every
/// `list`); a larger one is read by [`read_nofollow`].
fn read_small(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // Reported by name (a symlink, no permission).
        Err(_) => return read_nofollow(path),
    };
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() || meta.len() >= 64 {
        return read_nofollow(path);
    }
    let mut buf = [0u8; 64];
    let n = loop {
        match file.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    };
    if u64::try_from(n).ok() != Some(meta.len()) {
        // Rewritten as we read: read it the long way.
        return read_nofollow(path);
    }
    Ok(Some(buf[..n].to_vec()))
}

/// Pid files read, by path: the file's identity when read, and its pid.
static PIDS: Memo<std::path::PathBuf, (crate::fsutil::FileKey, i32)> = Memo::new();

/// Processes found to be an instance's QEMU: (pid, start time) to the
/// instance's pid file.
static IDENTIFIED: Memo<(i32, u64), std::path::PathBuf> = Memo::new();

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its state letter (`R`, `S`, `Z`, ...).
    pub state: u8,
    /// When it started, in clock ticks after boot: with the pid, it names
    /// one process for ever (a pid is reused, this pair is not).
    pub start_ticks: u64,
    /// User and system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

impl ProcStat {
    /// A zombie or a dead process (`Z`, `X`).
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }

    /// The CPU time, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        // SAFETY: sysconf cannot fail for _SC_CLK_TCK.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = u32::try_from(hz).unwrap_or(100).max(1);
        // Ticks stay far below 2^53 (f64's exact integers).
        #[allow(clippy::cast_precision_loss)]
        let ticks = self.cpu_ticks as f64;
        ticks / f64::from(hz)
    }
}

/// `/proc/PID/stat`, read in one call (it is read for every instance on
/// every `list`); `None` when the process is gone.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let mut buf = [0u8; 1024];
    parse_stat(read_stat(&format!("/proc/{pid}/stat"), &mut buf)?)
}

/// The threads of process `pid` (`/proc/PID/task/*/stat`): each one's
/// id, name (`comm`, e.g. QEMU's `CPU 0/KVM` under `debug-threads=on`)
/// and counters. Empty when the process is gone.
pub fn thread_stats(pid: i32) -> Vec<(i32, String, ProcStat)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut buf = [0u8; 1024];
    dir.filter_map(|e| {
        let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let text = read_stat(&format!("/proc/{pid}/task/{tid}/stat"), &mut buf)?;
        // The name is what the parentheses hold (it may hold any byte, a
        // parenthesis too: the last `)` ends it).
        let open = text.iter().position(|b| *b == b'(')?;
        let close = text.iter().rposition(|b| *b == b')')?;
        let name = String::from_utf8_lossy(text.get(open + 1..close)?).into_owned();
        Some((tid, name, parse_stat(text)?))
    })
    .collect()
}

/// A `stat` file of `/proc`, read into `buf` in as few calls as the
/// kernel allows: its line.
fn read_stat<'b>(path: &str, buf: &'b mut [u8; 1024]) -> Option<&'b [u8]> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = 0;
    // The kernel writes the whole line in one read when it fits: a read
    // that ends with the line's newline is the last.
    while len < buf.len() && !buf[..len].ends_with(b"\n") {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(&buf[..len])
}

/// Parses `/proc/PID/stat`: the fields after the command name, which
/// is in parentheses and may hold any byte (so the last `)` ends it).
fn parse_stat(text: &[u8]) -> Option<ProcStat> {
    let close = text.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and
    // 15, starttime field 22.
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(ProcStat {
        state: *fields.first()?.as_bytes().first()?,
        start_ticks: num(19)?,
        cpu_ticks: num(11)?.saturating_add(num(12)?),
    })
}

/// Whether the process is gone or a zombie (state `Z` or `X`).
pub fn is_zombie_or_gone(pid: i32) -> bool {
    proc_stat(pid).is_none_or(|s| s.is_zombie())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = b"4242 (qemu) x) (y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
            250 50 0 0 20 0 3 0 987654 1000000 200 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, b'S');
        assert_eq!(stat.cpu_ticks, 300);
        assert_eq!(stat.start_ticks, 987654);
        assert!(!stat.is_zombie());
        assert!(parse_stat(b"12 (z) Z 1 2").is_none());
        assert!(parse_stat(b"garbage").is_none());
        let me = proc_stat(std::process::id().cast_signed()).unwrap();
        assert!(me.start_ticks > 0 && !me.is_zombie());
        let pid = std::process::id().cast_signed();
        let threads = thread_stats(pid);
        assert!(
            threads.iter().any(|(tid, name, s)| *tid == pid
                && !name.is_empty()
                && s.start_ticks == me.start_ticks),
            "{threads:?}"
        );
        assert!(thread_stats(-1).is_empty());
    }

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
