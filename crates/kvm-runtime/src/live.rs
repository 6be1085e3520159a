//! Pid files and liveness: is the process named in the pid file the QEMU
//! of this instance?

use std::path::Path;

use crate::fsutil::{read_nofollow, remove_file, write_atomic};
use crate::{Error, InstancePaths};

/// What the pid file says about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// Whether the instance runs, checked against `/proc` (a pid file is
    /// never trusted alone: the pid may be reused or the process a zombie).
    pub fn liveness(&self) -> Result<Liveness, Error> {
        let pid = match self.read_pid() {
            Ok(Some(pid)) => pid,
            Ok(None) => return Ok(Liveness::NoPidFile),
            // A torn or garbage pid file cannot name a running instance.
            Err(Error::Corrupt { .. }) => return Ok(Liveness::Stale { pid: 0 }),
            Err(e) => return Err(e),
        };
        Ok(if process_runs_instance(pid, &self.name) {
            Liveness::Running { pid }
        } else {
            Liveness::Stale { pid }
        })
    }
}

/// Whether `pid` is a live, non-zombie process whose command line has
/// `-name <name>` (also `-name guest=<name>,...` and `-name <name>,...`).
pub fn process_runs_instance(pid: i32, name: &str) -> bool {
    if pid <= 0 || is_zombie_or_gone(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline"))
    else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-name" {
            return args.next().is_some_and(|v| name_matches(v, name));
        }
    }
    false
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
