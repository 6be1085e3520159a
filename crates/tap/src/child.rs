//! Handing a descriptor to one child process only.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `fd` available to the child that `cmd` spawns, under the same
/// number, and returns that number.
///
/// Close-on-exec is cleared in the child between `fork` and `exec` only, so
/// the parent's descriptor stays close-on-exec and no other child inherits
/// it. The caller must keep `fd` open until the child is spawned.
pub fn pass_fd_to_child(cmd: &mut Command, fd: BorrowedFd<'_>) -> RawFd {
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child and only calls fcntl(2),
    // which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(raw, libc::F_GETFD);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    raw
}
