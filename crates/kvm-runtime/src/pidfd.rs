//! Processes through pidfds: a pidfd names one process for as long as it
//! is open (a reused pid is never hit), and becomes readable when that
//! process has exited (a zombie counts, so a slow init reaping it costs
//! nothing).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Opens a pidfd for `pid`; `None` when the process is already gone.
pub fn pidfd_open(pid: i32) -> std::io::Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open(2) with flags 0; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(e),
        };
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a new descriptor we own.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Blocks until the process behind `pidfd` has exited or `timeout` has
/// passed; returns whether it exited.
pub fn wait_pidfd(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll(2) on one pollfd that lives on this stack frame.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// SIGKILLs the process behind `pidfd` (if it still runs) and waits up to
/// `timeout` for it to exit, blocking the thread.
pub fn kill_and_wait_pidfd(pidfd: &OwnedFd, timeout: Duration) {
    // SAFETY: pidfd_send_signal(2) on a pidfd we own; ESRCH (gone) is fine.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
    wait_pidfd(pidfd, timeout);
}
