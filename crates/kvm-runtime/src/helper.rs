//! Helper processes an instance owns beside its QEMU (a swtpm for its
//! TPM): found by their pid file and identified by their command line
//! (which names the instance's socket), ended once QEMU is gone.

use std::path::Path;
use std::time::Duration;

use crate::fsutil::remove_file;
use crate::{Error, InstancePaths};

/// How long an ended helper may take to go.
const HELPER_EXIT: Duration = Duration::from_secs(5);

impl InstancePaths {
    /// The instance's swtpm, if its pid file names a live process whose
    /// command line has this instance's TPM socket (a pid file naming
    /// anything else is not trusted).
    pub fn tpm_helper(&self) -> Option<i32> {
        let data = crate::fsutil::read_capped(&self.tpm_pid, 64).ok()??;
        let pid = String::from_utf8_lossy(&data).trim().parse::<i32>().ok()?;
        (pid > 0 && names_socket(pid, &self.tpm)).then_some(pid)
    }

    /// Ends the helpers the instance had (its QEMU is gone; a swtpm
    /// whose gkvm was killed before QEMU started still waits for it) and
    /// removes their files. Idempotent.
    pub fn stop_helpers(&self) -> Result<(), Error> {
        if let Some(pid) = self.tpm_helper() {
            tracing::info!(instance = %self.name, pid, "ending its swtpm");
            kill_and_wait(pid);
        }
        remove_file(&self.tpm)?;
        remove_file(&self.tpm_pid)
    }
}

/// Whether live process `pid` has `socket` in its command line (as
/// `path=SOCKET`, how swtpm is given its control socket): the same path,
/// or the same file name in the same directory reached by another path (a
/// run directory given as `/var/run/...` by one caller and `/run/...` by
/// another).
fn names_socket(pid: i32, socket: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    if crate::is_zombie_or_gone(pid) {
        return false;
    }
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    raw.split(|b| *b == 0)
        .flat_map(|arg| arg.split(|b| *b == b','))
        .filter_map(|part| part.strip_prefix(b"path="))
        .any(|given| same_file_place(Path::new(std::ffi::OsStr::from_bytes(given)), socket))
}

/// `a` and `b` name the same place: equal, or the same file name in one
/// directory (by device and inode).
fn same_file_place(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    let (Some(da), Some(na), Some(db), Some(nb)) =
        (a.parent(), a.file_name(), b.parent(), b.file_name())
    else {
        return false;
    };
    if na != nb || !a.is_absolute() {
        return false;
    }
    match (std::fs::metadata(da), std::fs::metadata(db)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// SIGKILL, then wait (a pidfd) for the process to go.
fn kill_and_wait(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags; the result is a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return;
    }
    // SAFETY: a new descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: pidfd_send_signal on our own pidfd (the process it names,
    // not a recycled pid).
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(HELPER_EXIT.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut poll, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_reached_by_another_path_is_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("alias")).unwrap();
        let sock = real.join("vm1.tpm");
        assert!(same_file_place(&sock, &sock));
        assert!(same_file_place(&tmp.path().join("alias/vm1.tpm"), &sock));
        assert!(!same_file_place(&tmp.path().join("alias/vm2.tpm"), &sock));
        assert!(!same_file_place(Path::new("vm1.tpm"), &sock));
    }
}
