//! `gkvm serve`: gkvm's API and command line without a process start per
//! call.
//!
//! A caller that runs many short gkvm operations (Ganeti's node daemon
//! asks for instance info every few seconds) pays more for starting a
//! process than for the operation itself. The server loads once and stays
//! single-threaded: it accepts connections and reads their requests
//! itself (any number at once, up to [`MAX_CONNS`], each with a 10 s
//! deadline, so callers that connect and say nothing hold no process),
//! and hands each whole request — the caller's connection and the request,
//! by SCM_RIGHTS — to a child forked ahead with its runtime built. The
//! child runs exactly what `gkvm ARGS...` (or `gkvm api`) would run (same
//! parsing, same output, same exit code, its own process: a crash or a
//! leak ends with it) and answers.
//!
//! Protocol (one request per connection), a JSON line to the server:
//! - a command line, `{"argv": ["--json", "info", "vm1"], "stdin": "...",
//!   "cwd": "/", "env": {"GKVM_NODE_CONFIG": "..."}}`, answered by one line
//!   `{"version": "0.1.0", "code": 0, "stdout": "...", "stderr": "..."}`
//!   (stdin, stdout and stderr in memory files);
//! - or a typed request of the API, `{"request": {"op": "info", ...},
//!   "env": {...}}`, answered by the API's reply lines as they come
//!   (`docs/API.md`).
//!
//! Only `GKVM_*` and `NO_COLOR` are taken from `env`. A request may name
//! the versions its caller speaks (`"versions": ["0.1"]`, major.minor): a
//! server of another version answers a usage error (exit code 2) without
//! running anything, so a caller never runs a command it would not
//! understand the answer of. Only the server's own user (or root) may
//! connect (`SO_PEERCRED`, checked when the server accepts); the socket is
//! 0600.
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
//! its own. At most [`MAX_CALLS`] calls run at once (whole requests wait
//! for a child); a request must arrive whole within 10 s and its answer be
//! taken within 10 s; a child killed while it waited for a call is
//! replaced (each child is watched through a pidfd).

use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{CliResult, Failure};

mod worker;

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
    let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        // Another server serves this socket.
        Err(_) => return Ok(()),
    };
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
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    umask(old);
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
                // A new session: no controlling terminal, not in the
                // caller's process group (its kill does not reach us).
                let _ = nix::unistd::setsid();
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
fn respond(mut conn: &UnixStream, answer: serde_json::Value) -> std::io::Result<()> {
    // A caller that does not take its answer does not hold the child.
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    conn.write_all(versioned(answer).as_bytes())
}

/// `answer` (a JSON object) with this server's version, as a line.
fn versioned(mut answer: serde_json::Value) -> String {
    answer["version"] = env!("CARGO_PKG_VERSION").into();
    format!("{answer}\n")
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
    socket: &'a Path,
    socket_id: (u64, u64),
    exe: &'a Path,
    exe_id: (u64, u64),
    pinned: Pinned,
}

/// What a child running a call tells the server (one byte on a pipe):
/// the call names another run directory or node configuration; the
/// server retires.
const RETIRE: u8 = b'x';

/// How many connections the server reads requests from at once (each
/// costs a descriptor and what it has sent so far).
const MAX_CONNS: usize = 4096;

/// How many request bytes the server holds at once, over all connections.
const MAX_BUFFERED: usize = 64 << 20;

/// A descriptor that becomes readable when process `pid` ends (a
/// pidfd); `None` when it has already gone.
fn pidfd(pid: i32) -> Option<OwnedFd> {
    kvm_runtime::pidfd_open(pid).ok().flatten()
}

/// Which of `fds` are readable (or closed) within `ms` milliseconds.
fn poll_readable(fds: &[BorrowedFd<'_>], ms: i32) -> Vec<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    match poll(&mut polled, timeout) {
        Ok(n) if n > 0 => polled
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect(),
        _ => vec![false; fds.len()],
    }
}

/// The child forked ahead, waiting for a call on its end of `chan`.
struct Waiting {
    pid: i32,
    /// Readable once it has ended.
    exit: Option<OwnedFd>,
    /// The server's end of the pair the call is handed over.
    chan: UnixStream,
}

/// A connection whose request is still arriving.
struct Reading {
    conn: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// A whole request, waiting for the worker or a child.
struct Whole {
    conn: UnixStream,
    request: Vec<u8>,
    /// For the worker ([`worker::takes`]).
    query: bool,
}

/// What the server loop keeps.
#[derive(Default)]
struct Calls {
    /// Connections still sending their request.
    reading: Vec<Reading>,
    /// Whole requests waiting for the worker or a child.
    ready: std::collections::VecDeque<Whole>,
    /// The pidfds of the children running calls.
    busy: Vec<OwnedFd>,
    /// Request bytes held.
    buffered: usize,
}

/// The server: the parent reads requests itself, from any number of
/// connections at once (up to [`MAX_CONNS`], with a deadline each), so a
/// caller that connects and says nothing, or says it slowly, holds no
/// process; a whole request is handed (the connection and the request,
/// by SCM_RIGHTS) to a child forked ahead with its runtime built, which
/// runs it and answers. At most [`MAX_CALLS`] run at once; the others
/// wait, whole, for a child. Each child is watched through a pidfd: one
/// killed while it waited is replaced.
fn accept_loop(
    listener: &UnixListener,
    ours: &Owned<'_>,
    idle_exit: Option<Duration>,
    me: u32,
    parser: clap::Command,
) -> CliResult {
    let fail = |what: &str, e| failure(ours.socket, what, e);
    // The server never blocks on its end; the children block on their
    // writes (a byte each; never full).
    let (notify_r, notify_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| fail("cannot make a pipe for", e.into()))?;
    nix::fcntl::fcntl(
        notify_r.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| fail("cannot set up the pipe of", e.into()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail("cannot set up", e))?;
    let max_conns = raise_fd_limit().min(MAX_CONNS);
    let server = nix::unistd::getpid().as_raw();
    let mut waiting: Option<Waiting> = None;
    let mut worker: Option<worker::Worker> = None;
    let mut worker_after = Instant::now();
    let mut calls = Calls::default();
    let mut last = Instant::now();
    // A child that dies before taking a call is replaced, after a pause
    // (so a child that cannot start does not make a fork loop).
    let mut fork_after = Instant::now();
    let result = 'serve: loop {
        if waiting.is_none() && calls.busy.len() < MAX_CALLS && Instant::now() >= fork_after {
            match fork_waiting(ours, &notify_w, me, server, &parser) {
                Ok(w) => waiting = Some(w),
                Err(e) => break Err(fail("cannot fork for", e)),
            }
        }
        if worker.is_none() && Instant::now() >= worker_after {
            match worker::fork(ours, &notify_w) {
                Ok(w) => worker = Some(w),
                // Not fatal: children answer every call meanwhile.
                Err(_) => worker_after = Instant::now() + Duration::from_secs(1),
            }
        }
        // A worker that has just died takes nothing more (its death may
        // not have been polled yet): children answer until the next.
        if worker
            .as_ref()
            .is_some_and(|w| poll_readable(&[w.exit.as_fd()], 0)[0])
        {
            worker = None;
            worker_after = Instant::now() + Duration::from_millis(100);
        }
        // Whole requests that only read: to the worker, whatever waits
        // before them; one it cannot take goes to a child.
        if let Some(w) = &worker {
            let mut at = 0;
            while at < calls.ready.len() {
                if !calls.ready[at].query {
                    at += 1;
                    continue;
                }
                let Some(mut whole) = calls.ready.remove(at) else {
                    break;
                };
                last = Instant::now();
                if binary_replaced(ours) {
                    let _ = respond_now(&whole.conn, serde_json::json!({"retired": true}));
                    calls.buffered = calls.buffered.saturating_sub(whole.request.len());
                    break 'serve Ok(());
                }
                if hand_over(&w.chan, &whole.conn, &whole.request).is_ok() {
                    calls.buffered = calls.buffered.saturating_sub(whole.request.len());
                } else {
                    // Its queue is full, or it has died.
                    whole.query = false;
                    calls.ready.insert(at, whole);
                    at += 1;
                }
            }
        }
        // A whole request and a child ready for it: handed over.
        if waiting.is_some() && !calls.ready.is_empty() {
            if let Some(Whole { conn, request, .. }) = calls.ready.pop_front() {
                calls.buffered = calls.buffered.saturating_sub(request.len());
                last = Instant::now();
                if binary_replaced(ours) {
                    // An upgrade: this call and all others go to the new
                    // binary (answered `retired`, nothing ran).
                    let _ = respond_now(&conn, serde_json::json!({"retired": true}));
                    break Ok(());
                }
                let w = waiting.take().unwrap_or_else(|| unreachable!());
                match hand_over(&w.chan, &conn, &request) {
                    Ok(()) => calls.busy.extend(w.exit),
                    Err(_) => {
                        // It died meanwhile: the call waits for the next.
                        calls.buffered += request.len();
                        calls.ready.push_front(Whole {
                            conn,
                            request,
                            query: false,
                        });
                        fork_after = Instant::now() + Duration::from_millis(100);
                    }
                }
                continue;
            }
        }
        let idle = idle_exit.map(|idle| idle.saturating_sub(last.elapsed()));
        if idle == Some(Duration::ZERO) && calls.reading.is_empty() && calls.ready.is_empty() {
            break Ok(());
        }
        let now = Instant::now();
        let mut wait = idle.map_or(SOCKET_CHECK, |w| {
            w.min(SOCKET_CHECK).max(Duration::from_millis(1))
        });
        if let Some(first) = calls.reading.iter().map(|r| r.deadline).min() {
            wait = wait.min(first.saturating_duration_since(now));
        }
        if waiting.is_none() && calls.busy.len() < MAX_CALLS {
            wait = wait.min(fork_after.saturating_duration_since(now));
        }
        if worker.is_none() {
            wait = wait.min(worker_after.saturating_duration_since(now));
        }
        let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
        // What the poll watches, in this order.
        let accepting = calls.reading.len() + calls.ready.len() < max_conns;
        let mut fds = vec![notify_r.as_fd()];
        if accepting {
            fds.push(listener.as_fd());
        }
        let waiting_fd = waiting
            .as_ref()
            .and_then(|w| w.exit.as_ref())
            .map(AsFd::as_fd);
        fds.extend(waiting_fd);
        let worker_fd = worker.as_ref().map(|w| w.exit.as_fd());
        fds.extend(worker_fd);
        fds.extend(calls.busy.iter().map(AsFd::as_fd));
        fds.extend(calls.reading.iter().map(|r| r.conn.as_fd()));
        let ready = poll_readable(&fds, ms);
        let mut at = 0;
        let mut next = || {
            at += 1;
            ready.get(at - 1).copied().unwrap_or(false)
        };
        if next() {
            let mut bytes = [0u8; 64];
            let n = nix::unistd::read(notify_r.as_raw_fd(), &mut bytes).unwrap_or(0);
            if bytes[..n].contains(&RETIRE) {
                break 'serve Ok(());
            }
        }
        if accepting && next() {
            accept_all(listener, me, max_conns, &mut calls);
        }
        if waiting_fd.is_some() && next() {
            // The waiting child ended without a call (killed): the next
            // one is forked.
            waiting = None;
            fork_after = Instant::now() + Duration::from_millis(100);
        }
        if worker_fd.is_some() && next() {
            // The worker ended (killed): the calls it held are closed
            // unanswered; the next worker is forked after a pause.
            worker = None;
            worker_after = Instant::now() + Duration::from_millis(100);
        }
        let busy_ended: Vec<bool> = calls.busy.iter().map(|_| next()).collect();
        let mut i = 0;
        calls.busy.retain(|_| {
            i += 1;
            !busy_ended[i - 1]
        });
        let readable: Vec<bool> = calls.reading.iter().map(|_| next()).collect();
        read_requests(&mut calls, &readable);
        expire(&mut calls);
        if !ready.iter().any(|r| *r) && !socket_is(ours.socket, ours.socket_id) {
            break Ok(());
        }
    };
    // Nothing handed over is lost: the waiting child has no call.
    if let Some(w) = waiting {
        // Our own child, waiting for a call it will not get.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(w.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // The calls not run yet go to the binary (or the next server).
    for r in calls.reading {
        let _ = respond_retired(&r.conn, Duration::from_millis(200));
    }
    for whole in calls.ready {
        let _ = respond_now(&whole.conn, serde_json::json!({"retired": true}));
    }
    result
}

/// Raises this process's descriptor limit to its hard limit (a server
/// reads from many connections); the descriptors it may use for them.
fn raise_fd_limit() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (mut soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft < hard {
        let raised = hard.min(65536);
        if setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
            soft = raised;
        }
    }
    // Room for the children's pidfds, the pipe and what std holds.
    usize::try_from(soft)
        .unwrap_or(1024)
        .saturating_sub(MAX_CALLS + 64)
}

/// Whether this server's binary was replaced (an upgrade).
fn binary_replaced(ours: &Owned<'_>) -> bool {
    std::fs::metadata(ours.exe).map_or(true, |m| (m.dev(), m.ino()) != ours.exe_id)
}

/// Takes every connection waiting in the queue: another user's is closed
/// at once; each other one is read from without blocking.
fn accept_all(listener: &UnixListener, me: u32, max: usize, calls: &mut Calls) {
    while calls.reading.len() + calls.ready.len() < max {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if !peer_allowed(&conn, me) || conn.set_nonblocking(true).is_err() {
            continue;
        }
        calls.reading.push(Reading {
            conn,
            buf: Vec::new(),
            deadline: Instant::now() + REQUEST_TIMEOUT,
        });
    }
}

/// Reads what the `readable` connections sent: a whole line is a request
/// ready for a child; a connection closed before it, or one that sends
/// more than a request may hold, is answered an error.
fn read_requests(calls: &mut Calls, readable: &[bool]) {
    let mut i = 0;
    calls.reading.retain_mut(|r| {
        i += 1;
        if !readable[i - 1] {
            return true;
        }
        let mut chunk = [0u8; 64 << 10];
        loop {
            match (&r.conn).read(&mut chunk) {
                Ok(0) => {
                    let message = "serve: the request is not one JSON line (or too large)";
                    let _ = respond_error(&r.conn, message);
                    calls.buffered = calls.buffered.saturating_sub(r.buf.len());
                    return false;
                }
                Ok(n) => {
                    // Only the new bytes are searched for the line's end.
                    let end = chunk[..n].iter().position(|b| *b == b'\n');
                    let take = end.map_or(n, |e| e + 1);
                    r.buf.extend_from_slice(&chunk[..take]);
                    calls.buffered += take;
                    if end.is_some() {
                        return true;
                    }
                    let cap = u64::try_from(r.buf.len()).unwrap_or(u64::MAX) > MAX_REQUEST;
                    if cap || calls.buffered > MAX_BUFFERED {
                        let message =
                            "serve: the request is too large (or the server holds too many)";
                        let _ = respond_error(&r.conn, message);
                        calls.buffered = calls.buffered.saturating_sub(r.buf.len());
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    calls.buffered = calls.buffered.saturating_sub(r.buf.len());
                    return false;
                }
            }
        }
    });
    // Whole requests go to the queue for a child, in arrival order.
    let (complete, still): (Vec<Reading>, Vec<Reading>) = std::mem::take(&mut calls.reading)
        .into_iter()
        .partition(|r| r.buf.last() == Some(&b'\n'));
    calls.reading = still;
    for r in complete {
        let query = serde_json::from_slice::<Request>(&r.buf).is_ok_and(|c| worker::takes(&c));
        calls.ready.push_back(Whole {
            conn: r.conn,
            request: r.buf,
            query,
        });
    }
}

/// Answers the connections whose request did not arrive whole in time.
fn expire(calls: &mut Calls) {
    let now = Instant::now();
    calls.reading.retain(|r| {
        if r.deadline > now {
            return true;
        }
        let message = format!(
            "serve: cannot read the request: no whole request within {} s",
            REQUEST_TIMEOUT.as_secs()
        );
        let _ = respond_error(&r.conn, &message);
        calls.buffered = calls.buffered.saturating_sub(r.buf.len());
        false
    });
}

/// Answers on a connection the server itself holds (non-blocking): it
/// waits at most a second for the caller to take a line.
fn respond_now(conn: &UnixStream, answer: serde_json::Value) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_secs(1)))?;
    respond(conn, answer)
}

/// Hands a call to the waiting child: the caller's connection and a
/// memory file with its request, by SCM_RIGHTS.
fn hand_over(chan: &UnixStream, conn: &UnixStream, request: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let file = memfd("gkvm-request")?;
    (&file).write_all(request)?;
    (&file).rewind()?;
    conn.set_nonblocking(false)?;
    let fds = [conn.as_raw_fd(), file.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"c")];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(chan.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// Forks the next child to wait for a call.
fn fork_waiting(
    ours: &Owned<'_>,
    notify: &OwnedFd,
    me: u32,
    server: i32,
    parser: &clap::Command,
) -> std::io::Result<Waiting> {
    let (chan, theirs) = UnixStream::pair()?;
    // SAFETY: single-threaded; the child only runs `waiting_child` and
    // exits.
    match unsafe { libc::fork() } {
        0 => {
            // Only what the child needs: its end of the pair, the pipe,
            // the standard descriptors (the server's connections, lock
            // and listening socket are the server's).
            let keep = [theirs.as_raw_fd(), notify.as_raw_fd()];
            close_all_but(&keep);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                waiting_child(&theirs, ours, notify, me, server, parser.clone())
            }))
            .unwrap_or(101);
            // SAFETY: the child ends without running the server's
            // destructors (the socket file, the lock are the server's).
            unsafe { libc::_exit(code) };
        }
        -1 => Err(std::io::Error::last_os_error()),
        pid => Ok(Waiting {
            pid,
            exit: pidfd(pid),
            chan,
        }),
    }
}

/// Closes every descriptor above the standard three except `keep`.
fn close_all_but(keep: &[i32]) {
    let mut keep: Vec<u32> = keep.iter().filter_map(|f| u32::try_from(*f).ok()).collect();
    keep.sort_unstable();
    let mut from = 3u32;
    for k in keep.into_iter().chain([u32::MAX]) {
        if k > from {
            // SAFETY: close_range(2) on descriptors nothing in this child
            // uses (the server's copies).
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) };
        }
        from = from.max(k.saturating_add(1));
    }
}

/// A child forked ahead: takes one call, runs it, exits.
fn waiting_child(
    chan: &UnixStream,
    ours: &Owned<'_>,
    notify: &OwnedFd,
    _me: u32,
    server: i32,
    parser: clap::Command,
) -> i32 {
    // A child still waiting for a call dies with the server (checked
    // after asking, in case the server died first).
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() != server {
        return 1;
    }
    // Built while no call waits for it.
    let prepared = crate::Prepared {
        parser,
        runtime: crate::new_runtime().ok(),
        pinned: ours.pinned.clone(),
    };
    let Some((conn, request)) = take_call(chan) else {
        return 1;
    };
    // A call taken runs to its end even if the server dies.
    let _ = nix::sys::prctl::set_pdeathsig(None);
    child(conn, prepared, notify, &request)
}

/// Receives a call from the server: the caller's connection and its
/// request (`None` when the server went away).
fn take_call(chan: &UnixStream) -> Option<(UnixStream, String)> {
    loop {
        match receive_call(chan) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(call) => return call,
            Err(_) => return None,
        }
    }
}

/// One receive of a call on `chan` (which may be non-blocking: then
/// `WouldBlock` when none waits); `Ok(None)` when the server went away.
fn receive_call(chan: &impl AsRawFd) -> std::io::Result<Option<(UnixStream, String)>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let msg = recvmsg::<()>(
        chan.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
    }
    let [conn, file] = fds[..] else {
        for fd in fds {
            // SAFETY: descriptors just received, owned by nobody else.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        return Ok(None);
    };
    // SAFETY: both were just received: this child owns them.
    let (conn, file) = unsafe {
        (
            UnixStream::from(OwnedFd::from_raw_fd(conn)),
            std::fs::File::from(OwnedFd::from_raw_fd(file)),
        )
    };
    Ok(read_all(&file).ok().map(|request| (conn, request)))
}

/// Only the server's own user, or root.
fn peer_allowed(conn: &UnixStream, me: u32) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    getsockopt(conn, PeerCredentials).is_ok_and(|cred| cred.uid() == me || cred.uid() == 0)
}

fn respond_error(conn: &UnixStream, message: &str) -> std::io::Result<()> {
    respond(conn, usage_answer(message))
}

/// A call refused before it ran, answered as the command line's usage
/// error (exit code 2, the error object on stderr).
fn usage_answer(message: &str) -> serde_json::Value {
    serde_json::json!({
        "code": 2,
        "stdout": "",
        "stderr": serde_json::json!({"kind": "usage", "instance": null, "message": message, "exit_code": 2}).to_string() + "\n",
    })
}

/// [`usage_answer`] as a line.
fn error_line(message: &str) -> String {
    versioned(usage_answer(message))
}

/// Why a call is not run at all: its caller speaks other versions, or it
/// is both a command line and a typed request.
fn refused(request: &Request) -> Option<String> {
    if let Some(versions) = &request.versions {
        let mine = major_minor();
        if !versions.contains(&mine) {
            return Some(format!(
                "serve: gkvm {} does not speak the caller's versions ({}); nothing was run",
                env!("CARGO_PKG_VERSION"),
                versions.join(", ")
            ));
        }
    }
    (request.request.is_some() && !request.argv.is_empty())
        .then(|| "serve: a call has argv or request, not both".to_owned())
}

/// In the forked child: parse the request, run it as `gkvm ARGV` (or
/// `gkvm api`), answer. `notify` (the server's pipe) is kept to ask the
/// server to retire when the call is not the server's to run.
fn child(conn: UnixStream, prepared: crate::Prepared, notify: &OwnedFd, line: &str) -> i32 {
    // SAFETY: back to the default, so the command can wait for its children.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let request =
        serde_json::from_str::<Request>(line).map_err(|e| format!("serve: not a request: {e}"));
    let request = match request {
        Ok(r) => r,
        Err(message) => return i32::from(respond_error(&conn, &message).is_err()),
    };
    if let Some(message) = refused(&request) {
        return i32::from(respond_error(&conn, &message).is_err());
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
            let _ = nix::unistd::write(notify, &[RETIRE]);
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
        // Onto the standard descriptors of this child.
        nix::unistd::dup2(fd, target)?;
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
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    Ok(std::fs::File::from(memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC,
    )?))
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
            let _ = nix::unistd::dup2(null.as_raw_fd(), target);
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
