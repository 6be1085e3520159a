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
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path with a NUL byte",
        ));
    }
    // Refuses a path longer than sun_path (ENAMETOOLONG).
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = std::os::unix::net::UnixStream::from(fd);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
        drop(fd);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_path_a_socket_cannot_have_is_refused_before_connecting() {
        let deadline = std::time::Instant::now();
        let long = Path::new("/tmp").join("q".repeat(200));
        let e = connect_unix_until(&long, deadline).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "{e}");
        let nul = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/a\0b"));
        let e = connect_unix_until(nul, deadline).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let missing = connect_unix_until(Path::new("/nonexistent/qmp.sock"), deadline);
        assert!(matches!(
            connect_error(Path::new("/x"), missing.unwrap_err()),
            Error::NotRunning { .. }
        ));
    }
}
