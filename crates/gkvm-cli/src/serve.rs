//! `gkvm serve`: the command line without a process start per call.
//!
//! A caller that runs many short gkvm commands (Ganeti's node daemon asks
//! for instance info every few seconds) pays more for starting a process
//! than for the command itself. The server is a fork server: it loads once,
//! stays single-threaded, and for each connection forks a child that runs
//! exactly what `gkvm ARGS...` would run (same parsing, same output, same
//! exit code, its own process: a crash or a leak ends with it), with stdin,
//! stdout and stderr in memory files that go back as one JSON line.
//!
//! Protocol (one request per connection), a JSON line each way:
//! `{"argv": ["--json", "info", "vm1"], "stdin": "...", "cwd": "/",
//! "env": {"GKVM_NODE_CONFIG": "..."}}` →
//! `{"version": "0.1.0", "code": 0, "stdout": "...", "stderr": "..."}`.
//! Only `GKVM_*` and `NO_COLOR` are taken from `env`. A request may name
//! the versions its caller speaks (`"versions": ["0.1"]`, major.minor): a
//! server of another version answers a usage error (exit code 2) without
//! running the command, so a caller never runs a command it would not
//! understand the answer of. Only the server's own
//! user (or root) may connect (`SO_PEERCRED`); the socket is 0600.
//!
//! A server retires when its binary is replaced (an upgrade), after
//! `--idle-exit` seconds without a call, or when its socket is removed (its
//! run directory deleted). A call it will not run is answered
//! `{"version": "0.1.0", "retired": true}` (nothing was run: the caller
//! runs the binary, which starts a new server); every call it took is
//! answered. A connection closed without an answer means the child running
//! the call died (killed): the command may have run in part, as when a
//! `gkvm` process is killed. At most one server per socket (a lock file
//! beside it).
//!
//! Calls run in the server's run directory with its node configuration
//! (its `--run-dir`/`--node-config` or their variables): a call that names
//! others is answered `{"retired": true, "reason": ...}` without running,
//! and the server retires, so the caller's next call starts a server of
//! its own. At most [`MAX_CALLS`] calls run at once (the others wait in
//! the socket's queue); a request must arrive whole within 10 s and its
//! answer be taken within 10 s; a child killed while it waited for a call
//! is replaced (each child is watched through a pidfd).

use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{CliResult, Failure};

/// The largest request accepted (argv and stdin): a migration info or an
/// instance definition is a few KiB.
const MAX_REQUEST: u64 = 16 << 20;

/// How often an idle server checks that its socket is still its own.
const SOCKET_CHECK: Duration = Duration::from_secs(2);

/// How long a client may take to send its whole request, and to take
/// the answer once it is written.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How many calls run at once; further connections wait in the socket's
/// queue until one ends.
const MAX_CALLS: usize = 64;

/// What the server fixes for every call: its run directory and node
/// configuration (its own `--run-dir`, `--node-config` or their
/// variables). A call that names others is not run: it is answered
/// `retired`, so its caller runs the binary, and the server retires so
/// that the next call starts a server for them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pinned {
    /// The server's `--run-dir` (none: the node configuration's, else
    /// the default).
    pub(crate) run_dir: Option<PathBuf>,
    /// The server's `--node-config` (none: the default file).
    pub(crate) node_config: Option<PathBuf>,
}

impl Pinned {
    /// Gives a call's unset run dir and node configuration the server's;
    /// the error says which one the call names differently.
    pub(crate) fn apply(
        &self,
        run_dir: &mut Option<PathBuf>,
        node_config: &mut Option<PathBuf>,
    ) -> Result<(), String> {
        for (what, call, ours) in [
            ("run directory", &mut *run_dir, &self.run_dir),
            ("node configuration", &mut *node_config, &self.node_config),
        ] {
            match (&*call, ours) {
                (None, _) => call.clone_from(ours),
                (Some(c), Some(o)) if c == o => {}
                (Some(c), _) => {
                    return Err(format!(
                        "the call names the {what} {}, the server serves {}",
                        c.display(),
                        ours.as_deref()
                            .map_or_else(|| "the default".to_owned(), |o| o.display().to_string())
                    ))
                }
            }
        }
        Ok(())
    }
}

/// One call.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    /// A command line (its answer: exit code, stdout and stderr).
    #[serde(default)]
    argv: Vec<String>,
    /// Or a typed API request (`hv_kvm::Request`): answered by the API's
    /// reply lines themselves, progress streamed as it comes.
    #[serde(default)]
    request: Option<serde_json::Value>,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    versions: Option<Vec<String>>,
}

/// This server's version as major.minor.
fn major_minor() -> String {
    let v = env!("CARGO_PKG_VERSION");
    v.splitn(3, '.').take(2).collect::<Vec<_>>().join(".")
}

/// `gkvm serve`: runs until idle for `idle_exit` (or forever), or until its
/// binary is replaced. With `detach`, returns once the socket listens (the
/// server goes on in the background), or at once when another server
/// already serves this socket.
pub fn serve(
    socket: &Path,
    idle_exit: Option<Duration>,
    detach: bool,
    pinned: Pinned,
) -> CliResult {
    let fail = |what: &str, e| failure(socket, what, e);
    let lock_path = with_suffix(socket, ".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(|e| fail("cannot open the lock file of", e))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        // Another server serves this socket.
        return Ok(());
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_file() || m.is_dir() => {
            return Err(fail(
                "refusing to replace what is not a socket:",
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ))
        }
        Ok(_) => std::fs::remove_file(socket).map_err(|e| fail("cannot remove the stale", e))?,
        Err(_) => {}
    }
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|e| fail("cannot listen on", e))?;
    let socket_id = std::fs::symlink_metadata(socket)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| fail("cannot stat", e))?;
    let exe = std::env::current_exe().map_err(|e| fail("cannot find its own binary for", e))?;
    let exe_id = std::fs::metadata(&exe)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| fail("cannot stat its own binary for", e))?;
    if detach {
        // SAFETY: single-threaded here (no runtime, no logging thread).
        match unsafe { libc::fork() } {
            -1 => return Err(fail("cannot fork for", std::io::Error::last_os_error())),
            0 => {
                // SAFETY: a new session: no controlling terminal, not in
                // the caller's process group (its kill does not reach us).
                unsafe { libc::setsid() };
                redirect_std_to_null();
            }
            _ => return Ok(()),
        }
    }
    // Children are reaped by the kernel; each child restores the default
    // so that the command it runs can wait for its own children.
    // SAFETY: setting a disposition.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let me = nix::unistd::Uid::current().as_raw();
    let mut parser = <crate::Cli as clap::CommandFactory>::command();
    parser.build();
    let ours = Owned {
        lock: lock.as_raw_fd(),
        socket,
        socket_id,
        exe: &exe,
        exe_id,
        pinned,
    };
    let result = accept_loop(&listener, &ours, idle_exit, me, parser);
    // Whoever holds the lock owns the socket: remove it while we still do
    // (if it is still ours). Calls that connected before are answered
    // `retired`.
    if socket_is(socket, socket_id) {
        let _ = std::fs::remove_file(socket);
    }
    drain(&listener);
    drop(lock);
    if detach {
        // SAFETY: the detached server ends here.
        unsafe { libc::_exit(i32::from(result.is_err())) };
    }
    result
}

/// The server's failure to `what` its socket.
fn failure(socket: &Path, what: &str, e: std::io::Error) -> Failure {
    Failure::new(
        1,
        "serve",
        format!("serve: {what} {}: {e}", socket.display()),
    )
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn readable_within(fd: &OwnedFd, ms: i32) -> bool {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) == 1 }
}

/// Reads the caller's request line, all of it within `wait` (a client
/// that sends a byte now and then does not hold a child longer).
fn read_request(conn: &UnixStream, wait: Duration) -> std::io::Result<String> {
    let deadline = Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let mut reader = conn.take(MAX_REQUEST);
    while !bytes.ends_with(b"\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no whole request within {} s", wait.as_secs()),
            ));
        }
        conn.set_read_timeout(Some(left))?;
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            // Interrupted, or this read's share of the deadline is up.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("the request is not UTF-8"))
}

/// Sends `answer` (a JSON object) with this server's version, as one line
/// in one write.
fn respond(mut conn: &UnixStream, mut answer: serde_json::Value) -> std::io::Result<()> {
    answer["version"] = env!("CARGO_PKG_VERSION").into();
    // A caller that does not take its answer does not hold the child.
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    conn.write_all(format!("{answer}\n").as_bytes())
}

/// Answers `retired` to every call waiting in the listening socket's queue.
fn drain(listener: &UnixListener) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while let Ok((conn, _)) = listener.accept() {
        let _ = conn.set_nonblocking(false);
        let _ = respond_retired(&conn, Duration::from_millis(200));
    }
}

/// Answers `retired` once the caller has sent its request (read and
/// dropped within `wait`), so that its write does not meet a closed socket.
fn respond_retired(conn: &UnixStream, wait: Duration) -> std::io::Result<()> {
    let _ = read_request(conn, wait);
    respond(conn, serde_json::json!({"retired": true}))
}

fn socket_is(socket: &Path, id: (u64, u64)) -> bool {
    std::fs::symlink_metadata(socket).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// What the server holds and watches.
struct Owned<'a> {
    /// The lock file's descriptor (a child closes its copy: a long command
    /// must not keep the next server out).
    lock: i32,
    socket: &'a Path,
    socket_id: (u64, u64),
    exe: &'a Path,
    exe_id: (u64, u64),
    pinned: Pinned,
}

/// What a waiting child tells the server (one byte on a pipe).
const TOOK_CALL: u8 = b'c';
/// ... that the binary was replaced: the server retires.
const REPLACED: u8 = b'r';
/// What a child running a call tells the server: the call names another
/// run directory or node configuration; the server retires.
const RETIRE: u8 = b'x';

/// A descriptor that becomes readable when process `pid` ends (a
/// pidfd); `None` when it has already gone.
fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a new descriptor nobody else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Which of `fds` are readable within `ms` milliseconds.
fn poll_readable(fds: &[&OwnedFd], ms: i32) -> Vec<bool> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(polled.len()).unwrap_or(0);
    // SAFETY: `polled` holds `n` valid pollfds.
    let rc = unsafe { libc::poll(polled.as_mut_ptr(), n, ms) };
    if rc <= 0 {
        return vec![false; fds.len()];
    }
    polled.iter().map(|p| p.revents != 0).collect()
}

/// The child waiting in `accept`.
struct Waiting {
    pid: i32,
    /// Readable once it has ended.
    exit: Option<OwnedFd>,
}

/// The server keeps one child forked ahead, blocked in `accept`: a call
/// does not wait for a fork. The child that takes a call says so on a
/// pipe, and the server forks the next one — at most [`MAX_CALLS`] run at
/// once. Each child is watched through a pidfd: one killed while it
/// waited is replaced, so no call connects to a server that has nobody
/// accepting.
fn accept_loop(
    listener: &UnixListener,
    ours: &Owned<'_>,
    idle_exit: Option<Duration>,
    me: u32,
    parser: clap::Command,
) -> CliResult {
    let fail = |what: &str, e| failure(ours.socket, what, e);
    let mut ends = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors, owned below.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(fail(
            "cannot make a pipe for",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: new descriptors nobody else owns.
    let (notify_r, notify_w) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // The children block on their writes (a byte each; never full).
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(notify_w.as_raw_fd(), libc::F_SETFL, 0) };
    let server = nix::unistd::getpid().as_raw();
    let mut waiting: Option<Waiting> = None;
    // The pidfds of the children running calls.
    let mut busy: Vec<OwnedFd> = Vec::new();
    let mut last = Instant::now();
    // A child that dies before taking a call is replaced, after a pause
    // (so a child that cannot start does not make a fork loop).
    let mut fork_after = Instant::now();
    let result = 'serve: loop {
        if waiting.is_none() && busy.len() < MAX_CALLS && Instant::now() >= fork_after {
            // SAFETY: single-threaded; the child only runs `waiting_child`
            // and exits.
            match unsafe { libc::fork() } {
                0 => {
                    drop(notify_r);
                    let code = waiting_child(listener, ours, notify_w, me, server, parser);
                    // SAFETY: the child ends without running the server's
                    // destructors (the socket file, the lock are the server's).
                    unsafe { libc::_exit(code) };
                }
                -1 => break Err(fail("cannot fork for", std::io::Error::last_os_error())),
                pid => {
                    waiting = Some(Waiting {
                        pid,
                        exit: pidfd(pid),
                    });
                }
            }
        }
        let idle = idle_exit.map(|idle| idle.saturating_sub(last.elapsed()));
        if idle == Some(Duration::ZERO) {
            break Ok(());
        }
        let mut wait = idle.map_or(SOCKET_CHECK, |w| w.min(SOCKET_CHECK));
        if waiting.is_none() && busy.len() < MAX_CALLS {
            wait = wait.min(fork_after.saturating_duration_since(Instant::now()));
        }
        let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut fds: Vec<&OwnedFd> = vec![&notify_r];
        let waiting_fd = waiting.as_ref().and_then(|w| w.exit.as_ref());
        fds.extend(waiting_fd);
        fds.extend(busy.iter());
        let ready = poll_readable(&fds, ms);
        if !ready.iter().any(|r| *r) {
            if !socket_is(ours.socket, ours.socket_id) {
                break Ok(());
            }
            continue;
        }
        let busy_ready: Vec<bool> = ready[1 + usize::from(waiting_fd.is_some())..].to_vec();
        let waiting_died = waiting_fd.is_some() && ready[1];
        // What the children said first: a child writes before it ends.
        let mut bytes = [0u8; 64];
        if ready[0] {
            let n = nix::unistd::read(notify_r.as_raw_fd(), &mut bytes).unwrap_or(0);
            for byte in &bytes[..n] {
                match *byte {
                    TOOK_CALL => {
                        if let Some(w) = waiting.take() {
                            busy.extend(w.exit);
                        }
                        last = Instant::now();
                    }
                    // Replaced: the waiting child answered the call
                    // `retired`.
                    REPLACED => {
                        waiting = None;
                        break 'serve Ok(());
                    }
                    RETIRE => break 'serve Ok(()),
                    _ => {}
                }
            }
        }
        // Ended calls leave the count.
        let mut i = 0;
        busy.retain(|_| {
            let keep = !busy_ready.get(i).copied().unwrap_or(false);
            i += 1;
            keep
        });
        // The waiting child ended without taking a call (killed): the
        // next one is forked.
        if waiting_died && waiting.is_some() {
            waiting = None;
            fork_after = Instant::now() + Duration::from_millis(100);
        }
    };
    if let Some(w) = waiting {
        release(w.pid, ours, &notify_r);
    }
    result
}

/// Ends the child waiting in `accept` without losing a call it may be
/// taking at this very moment: a call of our own wakes it (it answers
/// that one, or the caller's that came first, and says so on the pipe);
/// only a child that does not say so within a second is killed.
fn release(pid: i32, ours: &Owned<'_>, notify_r: &OwnedFd) {
    let poke = socket_is(ours.socket, ours.socket_id)
        .then(|| UnixStream::connect(ours.socket).ok())
        .flatten();
    if let Some(poke) = &poke {
        let _ = (&*poke).write_all(b"\n");
        if readable_within(notify_r, 1000) {
            return;
        }
    }
    // SAFETY: our own child, still blocked in accept.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// A child forked ahead: takes one call, runs it, exits.
fn waiting_child(
    listener: &UnixListener,
    ours: &Owned<'_>,
    notify: OwnedFd,
    me: u32,
    server: i32,
    parser: clap::Command,
) -> i32 {
    // SAFETY: the lock is the server's, not the command's. A child still
    // waiting for a call dies with the server (checked after asking, in
    // case the server died first).
    unsafe {
        libc::close(ours.lock);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    if nix::unistd::getppid().as_raw() != server {
        return 1;
    }
    // Built while no call waits for it.
    let prepared = crate::Prepared {
        parser,
        runtime: crate::new_runtime().ok(),
        pinned: ours.pinned.clone(),
    };
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = nix::unistd::write(&notify, &[TOOK_CALL]);
                return 1;
            }
        }
    };
    // SAFETY: the listening socket is the server's; a call taken runs to
    // its end even if the server dies meanwhile.
    unsafe {
        libc::close(listener.as_raw_fd());
        libc::prctl(libc::PR_SET_PDEATHSIG, 0);
    }
    // An upgrade replaced the binary: the caller runs the new one.
    let replaced = std::fs::metadata(ours.exe).map_or(true, |m| (m.dev(), m.ino()) != ours.exe_id);
    let _ = nix::unistd::write(&notify, &[if replaced { REPLACED } else { TOOK_CALL }]);
    if replaced {
        return i32::from(respond_retired(&conn, REQUEST_TIMEOUT).is_err());
    }
    if !peer_allowed(&conn, me) {
        return 0;
    }
    child(conn, prepared, notify)
}

/// Only the server's own user, or root.
fn peer_allowed(conn: &UnixStream, me: u32) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(0);
    // SAFETY: cred and len describe a ucred buffer.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    rc == 0 && (cred.uid == me || cred.uid == 0)
}

fn respond_error(conn: &UnixStream, message: &str) -> std::io::Result<()> {
    let obj = serde_json::json!({
        "code": 2,
        "stdout": "",
        "stderr": serde_json::json!({"kind": "usage", "instance": null, "message": message, "exit_code": 2}).to_string() + "\n",
    });
    respond(conn, obj)
}

/// In the forked child: read the request, run it as `gkvm ARGV`, answer.
/// `notify` (the server's pipe) is kept to ask the server to retire when
/// the call is not the server's to run.
fn child(conn: UnixStream, prepared: crate::Prepared, notify: OwnedFd) -> i32 {
    // SAFETY: back to the default, so the command can wait for its children.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let request = match read_request(&conn, REQUEST_TIMEOUT) {
        Ok(line) if line.ends_with('\n') => {
            serde_json::from_str::<Request>(&line).map_err(|e| format!("serve: not a request: {e}"))
        }
        Ok(_) => Err("serve: the request is not one JSON line (or too large)".to_owned()),
        Err(e) => Err(format!("serve: cannot read the request: {e}")),
    };
    let request = match request {
        Ok(r) => r,
        Err(message) => return i32::from(respond_error(&conn, &message).is_err()),
    };
    if let Some(versions) = &request.versions {
        let mine = major_minor();
        if !versions.contains(&mine) {
            let message = format!(
                "serve: gkvm {} does not speak the caller's versions ({}); nothing was run",
                env!("CARGO_PKG_VERSION"),
                versions.join(", ")
            );
            return i32::from(respond_error(&conn, &message).is_err());
        }
    }
    if request.request.is_some() && !request.argv.is_empty() {
        let message = "serve: a call has argv or request, not both";
        return i32::from(respond_error(&conn, message).is_err());
    }
    match run_request(&request, prepared, &conn) {
        // The reply lines went to the caller as they came.
        Ok(Served::Streamed) => 0,
        Ok(Served::Ran(code, stdout, stderr)) => {
            let answer = serde_json::json!({"code": code, "stdout": stdout, "stderr": stderr});
            i32::from(respond(&conn, answer).is_err())
        }
        Ok(Served::NotOurs(why)) => {
            // Nothing ran: the caller runs the binary; the next call
            // starts a server for its run directory and configuration.
            tracing::debug!("serve: retiring: {why}");
            let _ = nix::unistd::write(&notify, &[RETIRE]);
            let answer = serde_json::json!({"retired": true, "reason": why});
            i32::from(respond(&conn, answer).is_err())
        }
        Err(e) => i32::from(respond_error(&conn, &format!("serve: {e}")).is_err()),
    }
}

/// What became of a call.
enum Served {
    /// Run: its exit code, stdout and stderr.
    Ran(u8, String, String),
    /// Not run: it is not this server's (why).
    NotOurs(String),
    /// A typed request: its reply lines were written to the caller.
    Streamed,
}

fn run_request(
    request: &Request,
    prepared: crate::Prepared,
    conn: &UnixStream,
) -> std::io::Result<Served> {
    // The caller's environment for gkvm, nothing else of it.
    let ours: Vec<OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| is_passed(&k.to_string_lossy()))
        .collect();
    for key in ours {
        // SAFETY: single-threaded (a freshly forked child).
        unsafe { std::env::remove_var(key) };
    }
    for (key, value) in &request.env {
        if is_passed(key) && !key.contains('=') && !key.contains('\0') && !value.contains('\0') {
            // SAFETY: as above.
            unsafe { std::env::set_var(key, value) };
        }
    }
    if let Some(dir) = &request.cwd {
        std::env::set_current_dir(dir)?;
    }
    // A typed request is `gkvm api` with the request on stdin and its
    // reply lines straight to the caller.
    let typed = request.request.as_ref().map(ToString::to_string);
    let stdin = memfd("gkvm-stdin")?;
    if let Some(text) = typed.as_ref().or(request.stdin.as_ref()) {
        (&stdin).write_all(text.as_bytes())?;
        (&stdin).rewind()?;
    }
    let stdout = memfd("gkvm-stdout")?;
    let stderr = memfd("gkvm-stderr")?;
    let out_fd = if typed.is_some() {
        // A caller that stops reading does not hold the child.
        conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        conn.as_raw_fd()
    } else {
        stdout.as_raw_fd()
    };
    for (fd, target) in [(stdin.as_raw_fd(), 0), (out_fd, 1), (stderr.as_raw_fd(), 2)] {
        // SAFETY: dup2 onto the standard descriptors of this child.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mut argv = vec![OsString::from("gkvm")];
    if typed.is_some() {
        argv.push("api".into());
    } else {
        argv.extend(request.argv.iter().map(OsString::from));
    }
    let code = match crate::run_prepared(argv, Some(prepared)) {
        crate::Ran::Exit(code) => code,
        crate::Ran::NotServed(why) => return Ok(Served::NotOurs(why)),
    };
    if typed.is_some() {
        let _ = std::io::stdout().flush();
        return Ok(Served::Streamed);
    }
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    Ok(Served::Ran(code, read_all(&stdout)?, read_all(&stderr)?))
}

fn is_passed(key: &str) -> bool {
    key.starts_with("GKVM_") || key == "NO_COLOR"
}

fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn read_all(mut file: &std::fs::File) -> std::io::Result<String> {
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn redirect_std_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for target in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
