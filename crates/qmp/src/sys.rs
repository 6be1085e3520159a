//! Socket helpers shared by both transports.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;

use crate::Error;

/// Sends `bytes` with `fds` attached (SCM_RIGHTS) in one `sendmsg`; returns
/// how many bytes went out (the descriptors travel with the first byte).
pub(crate) fn send_with_fds(
    sock: RawFd,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
}

/// Maps a connect failure: a missing socket or nobody listening means QEMU
/// is not running.
pub(crate) fn connect_error(path: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTSOCK) => Error::NotRunning {
            path: path.to_owned(),
            source: e,
        },
        _ => Error::io(format!("connect to {}", path.display()), e),
    }
}
