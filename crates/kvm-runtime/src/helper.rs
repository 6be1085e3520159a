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
/// `path=SOCKET`, how swtpm is given its control socket).
fn names_socket(pid: i32, socket: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    if crate::is_zombie_or_gone(pid) {
        return false;
    }
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut needle = b"path=".to_vec();
    needle.extend_from_slice(socket.as_os_str().as_bytes());
    raw.split(|b| *b == 0).any(|arg| {
        arg.split(|b| *b == b',')
            .any(|part| part == needle.as_slice())
    })
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
