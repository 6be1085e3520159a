//! The server's worker: one process, forked by the server and replaced
//! when it dies, that answers the typed requests which only read
//! ([`hv_kvm::Request::only_reads`]: info, overview, list, console, ...)
//! in process, many at once, on one runtime.
//!
//! Why not a child per call, as for everything else: those calls are the
//! ones a cluster makes every few seconds per instance, and a call's
//! whole cost is a few file reads and one QMP exchange. A fork, a new
//! runtime and a parse of the call's environment per call cost more than
//! that (measured by `integrations/ganeti/run-tests --bench-api`: 2.7 ms
//! per `info` through a child, see the README). Calls that change the
//! node keep a child each: each is a `gkvm` process of its own — killed
//! at any step it leaves what a killed `gkvm` leaves, its signals and
//! children are its own — and their cost is QEMU's, not the fork's.
//!
//! The worker is only a shortcut: a call the worker cannot take (none
//! runs, or its queue is full) goes to a child, which answers it the
//! same way. A worker killed mid-call closes that call's connection
//! without an answer (the caller may repeat it: it changed nothing).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hv_kvm::{ErrorReply, Reply};
use tokio::io::AsyncWriteExt;

use super::{Owned, Pinned, Request, MAX_CALLS, REQUEST_TIMEOUT, RETIRE};
use crate::input::NodeOptions;

/// The longest a call may run in the worker: what only reads is bounded
/// by QMP's own timeouts well before this.
const CALL_DEADLINE: Duration = Duration::from_secs(60);

/// The worker's process name (`ps`, `/proc/PID/comm`).
const NAME: &std::ffi::CStr = c"gkvm-worker";

/// The worker as the server sees it.
pub(super) struct Worker {
    /// Readable once it has ended.
    pub(super) exit: OwnedFd,
    /// The server's end of the pair calls are handed over (non-blocking:
    /// a worker that does not take calls does not hold the server).
    pub(super) chan: UnixStream,
}

/// Whether the server's worker should answer this call: a typed request
/// that only reads, with nothing a process must be changed for (no
/// working directory).
pub(super) fn takes(call: &Request) -> bool {
    call.argv.is_empty()
        && call.cwd.is_none()
        && call.stdin.is_none()
        && call
            .request
            .as_ref()
            .and_then(|r| hv_kvm::Request::from_json(&r.to_string()).ok())
            .is_some_and(|r| r.only_reads())
}

/// Forks the worker.
pub(super) fn fork(ours: &Owned<'_>, notify: &OwnedFd) -> std::io::Result<Worker> {
    let (chan, theirs) = UnixStream::pair()?;
    // SAFETY: the server is single-threaded; the child runs `run` and
    // exits.
    match unsafe { libc::fork() } {
        0 => {
            super::close_all_but(&[theirs.as_raw_fd(), notify.as_raw_fd()]);
            let pinned = ours.pinned.clone();
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&theirs, pinned, notify)
            }))
            .unwrap_or(101);
            // SAFETY: the worker ends without running the server's
            // destructors (the socket file and the lock are the server's).
            unsafe { libc::_exit(code) };
        }
        -1 => Err(std::io::Error::last_os_error()),
        pid => {
            chan.set_nonblocking(true)?;
            let exit = super::pidfd(pid)
                .ok_or_else(|| std::io::Error::other("the worker ended as it started"))?;
            Ok(Worker { exit, chan })
        }
    }
}

/// What every call in the worker shares.
struct Shared {
    pinned: Pinned,
    /// The server's pipe: a call that is not the server's asks it to
    /// retire.
    notify: i32,
}

/// The worker: takes calls until the server goes away (its end of the
/// pair closes), at most [`MAX_CALLS`] at once, then answers those it
/// took and ends.
fn run(chan: &UnixStream, pinned: Pinned, notify: &OwnedFd) -> i32 {
    // Told apart from the server and its children in `ps` (and by tests).
    // SAFETY: PR_SET_NAME copies a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, NAME.as_ptr()) };
    // SAFETY: back to the default, so that a call can wait for a child
    // (a QEMU probe).
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    // One thread: the calls wait on QEMU and files, and a second thread
    // only adds wake-ups across threads (measured: 0.1 ms of an `info`).
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return 1;
    };
    let shared = Arc::new(Shared {
        pinned,
        notify: notify.as_raw_fd(),
    });
    runtime.block_on(async {
        let Ok(chan) = chan
            .try_clone()
            .and_then(|c| c.set_nonblocking(true).map(|()| c))
            .and_then(tokio::net::UnixStream::from_std)
        else {
            return 1;
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CALLS));
        let mut calls = tokio::task::JoinSet::new();
        while let Ok(slot) = Arc::clone(&slots).acquire_owned().await {
            let taken = loop {
                if chan.readable().await.is_err() {
                    break None;
                }
                match chan.try_io(tokio::io::Interest::READABLE, || super::receive_call(&chan)) {
                    Ok(call) => break call,
                    // Nothing waits after all: wait again.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                        ) => {}
                    Err(_) => break None,
                }
            };
            // None: the server has gone.
            let Some((conn, line)) = taken else {
                break;
            };
            let shared = Arc::clone(&shared);
            calls.spawn(async move {
                let answer = answer(&line, &shared).await;
                let _ = send(conn, answer).await;
                drop(slot);
            });
            while calls.try_join_next().is_some() {}
        }
        // The calls taken are answered before the worker ends.
        while calls.join_next().await.is_some() {}
        0
    })
}

/// Writes the answer, giving the caller [`REQUEST_TIMEOUT`] to take it.
async fn send(conn: UnixStream, answer: String) -> std::io::Result<()> {
    conn.set_nonblocking(true)?;
    let mut conn = tokio::net::UnixStream::from_std(conn)?;
    tokio::time::timeout(REQUEST_TIMEOUT, conn.write_all(answer.as_bytes()))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// A reply line.
fn line(reply: &Reply) -> String {
    serde_json::to_string(reply).unwrap_or_default() + "\n"
}

/// The answer to one call, as the lines a child running it would write.
async fn answer(text: &str, shared: &Shared) -> String {
    let call = match serde_json::from_str::<Request>(text) {
        Ok(call) => call,
        Err(e) => return super::error_line(&format!("serve: not a request: {e}")),
    };
    if let Some(why) = super::refused(&call) {
        return super::error_line(&why);
    }
    let var = |key: &str| {
        call.env
            .get(key)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut node = NodeOptions {
        run_dir: var("GKVM_RUN_DIR"),
        node_config: var("GKVM_NODE_CONFIG"),
        kvm_path: var("GKVM_KVM_PATH"),
        migration_key: var("GKVM_MIGRATION_KEY"),
    };
    if let Err(why) = shared
        .pinned
        .apply(&mut node.run_dir, &mut node.node_config)
    {
        tracing::debug!("serve: retiring: {why}");
        // SAFETY: a one-byte write on the server's pipe, which stays open
        // while the worker runs.
        unsafe { libc::write(shared.notify, [RETIRE].as_ptr().cast(), 1) };
        return super::versioned(serde_json::json!({"retired": true, "reason": why}));
    }
    let text = call.request.as_ref().map(ToString::to_string);
    let ready = crate::commands::api_request(text.as_deref().unwrap_or(""))
        .and_then(|r| Ok((r, crate::input::hypervisor_of(&node)?)));
    let (request, hv) = match ready {
        Ok(ready) => ready,
        Err(failure) => return line(&Reply::Error(failure.reply())),
    };
    line(
        &match tokio::time::timeout(CALL_DEADLINE, hv.handle(request)).await {
            Ok(Ok(response)) => Reply::Response(response),
            Ok(Err(e)) => Reply::Error(ErrorReply::from(&e)),
            Err(_) => Reply::Error(ErrorReply {
                kind: "timeout".to_owned(),
                instance: None,
                message: format!("serve: no answer within {} s", CALL_DEADLINE.as_secs()),
            }),
        },
    )
}
