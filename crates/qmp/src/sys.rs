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
/// Connects to a Unix socket without blocking past `deadline`: QEMU
/// serves one client per QMP socket and queues one more, so while another
/// client holds it a connect fails with EAGAIN (non-blocking) or would
/// block indefinitely (blocking). Retries until the deadline, then returns
/// `TimedOut`.
pub(crate) fn connect_unix_until(
    path: &Path,
    deadline: std::time::Instant,
) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or with a NUL byte",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::new(io::ErrorKind::Unsupported, "AF_UNIX"))?;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        // SAFETY: plain socket(2); the fd is owned by the UnixStream below.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket this function owns.
        let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        // SAFETY: addr is a valid sockaddr_un of the given size.
        let rc = unsafe {
            libc::connect(
                fd,
                std::ptr::addr_of!(addr).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
                    .unwrap_or(libc::socklen_t::MAX),
            )
        };
        if rc == 0 {
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
        drop(stream);
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "another client keeps QEMU's QMP socket busy",
            ));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

pub(crate) fn connect_error(path: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTSOCK) => Error::NotRunning {
            path: path.to_owned(),
            source: e,
        },
        _ => Error::io(format!("connect to {}", path.display()), e),
    }
}
