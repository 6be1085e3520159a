//! `gkvm console`: the terminal attached to an instance's serial socket.
//! Raw mode while attached, restored on every way out (detach, the guest's
//! end, errors, SIGTERM/SIGHUP); `^]` detaches, as in telnet and virsh.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// The detach key: Ctrl-].
pub const ESCAPE: u8 = 0x1d;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Puts the terminal back as it was when dropped.
struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None }; // not a terminal: nothing to change
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// How an attached session ended.
pub enum Ended {
    /// The user pressed the escape key.
    Detached,
    /// The socket closed (the instance stopped).
    Closed,
    /// A signal asked us to stop.
    Signalled,
}

/// Attaches this terminal to the serial socket until detach or close.
pub fn attach(instance: &str, socket: &Path) -> std::io::Result<Ended> {
    let mut sock = UnixStream::connect(socket).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("serial console of {instance} at {}: {e}", socket.display()),
        )
    })?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_signal as *const () as libc::sighandler_t);
    }
    {
        use std::io::Write as _;
        let _ = write!(
            std::io::stderr(),
            "Connected to the serial console of {instance}; escape character is ^]\r\n"
        );
    }
    let _raw = RawMode::enter();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Ok(Ended::Signalled);
        }
        let (sock_ready, in_ready) = {
            // SAFETY: stdin's descriptor 0 stays open for the whole call.
            let fd0 = unsafe { BorrowedFd::borrow_raw(0) };
            let mut fds = [
                PollFd::new(sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(fd0, PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| {
                f.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                })
            };
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sock_ready {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                return Ok(Ended::Closed);
            }
            stdout.write_all(&buf[..n])?;
            stdout.flush()?;
        }
        if in_ready {
            let n = stdin.lock().read(&mut buf)?;
            if n == 0 {
                return Ok(Ended::Detached); // stdin closed
            }
            if let Some(i) = buf[..n].iter().position(|&b| b == ESCAPE) {
                sock.write_all(&buf[..i])?;
                return Ok(Ended::Detached);
            }
            sock.write_all(&buf[..n])?;
        }
    }
}
