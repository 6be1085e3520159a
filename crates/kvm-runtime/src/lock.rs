//! Advisory locks (flock) so that two operations on one instance, or two
//! allocations on one node, never interleave — across processes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, InstancePaths, RunDir};

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct LockGuard {
    file: File,
    path: PathBuf,
    /// For an instance's lock: its paths, so that a lock file left by an
    /// operation that created nothing (refused, interrupted) is removed.
    instance: Option<Box<InstancePaths>>,
}

impl LockGuard {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl LockGuard {
    /// Removes the lock file if it is still the one held and the instance
    /// has no state at all (no pid file, runtime file or QMP socket).
    /// Safe under the lock: only a holder removes the file, and lockers
    /// re-check the inode after locking.
    fn remove_if_unused(&self) {
        let Some(p) = &self.instance else {
            return;
        };
        if p.pid.symlink_metadata().is_ok()
            || p.runtime.symlink_metadata().is_ok()
            || p.qmp.symlink_metadata().is_ok()
        {
            return;
        }
        let (Ok(ours), Ok(now)) = (self.file.metadata(), std::fs::symlink_metadata(&self.path))
        else {
            return;
        };
        if ours.ino() == now.ino() && ours.dev() == now.dev() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.remove_if_unused();
        // SAFETY: flock on a descriptor this guard owns.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// The per-instance operation lock.
pub type InstanceLock = LockGuard;

enum Acquire {
    Got(LockGuard),
    WouldBlock,
}

fn try_lock(path: &Path) -> Result<Acquire, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io("open lock", path, e))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(Acquire::WouldBlock);
        }
        return Err(Error::io("flock", path, e));
    }
    // Cleanup may have unlinked the file while we waited for it: a lock on
    // an unlinked inode excludes nobody, so start over on the new file.
    let ours = file
        .metadata()
        .map_err(|e| Error::io("stat lock", path, e))?;
    match std::fs::symlink_metadata(path) {
        Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
            Ok(Acquire::Got(LockGuard {
                file,
                path: path.to_owned(),
                instance: None,
            }))
        }
        _ => Ok(Acquire::WouldBlock),
    }
}

fn lock_with_timeout(path: &Path, timeout: Duration) -> Result<Option<LockGuard>, Error> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Acquire::Got(g) = try_lock(path)? {
            return Ok(Some(g));
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

impl InstancePaths {
    /// Whether another operation holds the instance's lock now (a start
    /// between spawning QEMU and recording its pid, say). Looks only: the
    /// lock file is neither created nor kept locked.
    pub fn operation_in_progress(&self) -> bool {
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.lock)
        else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; closing it releases a
        // shared lock taken here.
        let held = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0;
        held && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
    }

    /// Takes the instance's lock, waiting up to `timeout`; [`Error::Busy`]
    /// names the instance when another operation keeps it. Dropping the
    /// guard of an instance that has no state (the operation was refused
    /// or interrupted before creating anything) also removes the lock file.
    pub fn lock(&self, timeout: Duration) -> Result<InstanceLock, Error> {
        if let Some(dir) = self.lock.parent() {
            crate::fsutil::ensure_private_dir(dir)?;
        }
        let start = Instant::now();
        let mut guard = lock_with_timeout(&self.lock, timeout)?.ok_or_else(|| Error::Busy {
            instance: self.name.clone(),
            waited: start.elapsed(),
        })?;
        guard.instance = Some(Box::new(self.clone()));
        Ok(guard)
    }
}

impl RunDir {
    /// Takes the node-wide lock (for allocations), waiting up to `timeout`.
    pub fn lock_node(&self, timeout: Duration) -> Result<LockGuard, Error> {
        let path = self.node_lock_path();
        if let Some(dir) = path.parent() {
            crate::fsutil::ensure_private_dir(dir)?;
        }
        let start = Instant::now();
        lock_with_timeout(&path, timeout)?.ok_or_else(|| Error::NodeBusy {
            path,
            waited: start.elapsed(),
        })
    }
}
