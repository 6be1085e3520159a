//! Rollback that survives cancellation.
//!
//! An operation future can be dropped at any await point: the CLI drops it
//! on SIGINT or SIGTERM, a caller's timeout drops it, a panic unwinds it.
//! What the operation had created must not outlive it. These guards undo
//! synchronously in `Drop` (kill the instance's QEMU through a pidfd, wait
//! for it on the pidfd, remove its files) unless the operation disarms
//! them on success. After a SIGKILL nothing can run, so the next operation
//! on the instance reconciles what it finds instead (see `lifecycle`).

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use kvm_runtime::{InstancePaths, Liveness};

use crate::process;

/// Kills whatever QEMU the instance has and removes its files, unless
/// disarmed.
#[derive(Debug)]
pub(crate) struct RollbackGuard {
    paths: InstancePaths,
    what: &'static str,
    armed: bool,
    /// A pidfd of the QEMU process this operation spawned (before it
    /// daemonized): it names that process even once reaped, so no reused
    /// pid is ever signalled.
    child: Mutex<Option<OwnedFd>>,
    /// The TAPs this operation created: a rollback returns only once the
    /// kernel has removed them (their last holder may exit a moment after
    /// QEMU reported its failure).
    taps: Mutex<Vec<String>>,
    /// What else to undo (NIC teardown), in order.
    undo: Mutex<Vec<Undo>>,
}

/// One step of a rollback.
struct Undo(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Undo")
    }
}

impl RollbackGuard {
    /// A guard for `paths`; `what` names the operation in logs.
    pub(crate) fn new(paths: &InstancePaths, what: &'static str) -> RollbackGuard {
        RollbackGuard {
            paths: paths.clone(),
            what,
            armed: true,
            child: Mutex::new(None),
            taps: Mutex::new(Vec::new()),
            undo: Mutex::new(Vec::new()),
        }
    }

    /// Adds a step a rollback runs once QEMU is gone.
    pub(crate) fn on_rollback(&self, step: Box<dyn FnOnce() + Send>) {
        self.undo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Undo(step));
    }

    /// Records a TAP the operation created.
    pub(crate) fn add_tap(&self, name: &str) {
        self.taps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_owned());
    }

    /// Records the QEMU process the operation spawned (call at once after
    /// the spawn, before anything may reap it).
    pub(crate) fn set_child(&self, pid: u32) {
        let fd = i32::try_from(pid)
            .ok()
            .and_then(|pid| process::pidfd_open(pid).ok().flatten());
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = fd;
    }

    /// The operation succeeded: keep what it made.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

/// Kills the instance's QEMU (found from its pid file or `/proc`) and
/// removes its files, blocking for at most about ten seconds.
pub(crate) fn kill_and_clean_blocking(paths: &InstancePaths) {
    for _ in 0..3 {
        match paths.liveness() {
            Ok(Liveness::Running { pid }) => {
                if let Err(e) = process::kill_instance(pid, paths) {
                    tracing::warn!(instance = %paths.name, pid, error = %e, "rollback: kill");
                }
                process::wait_exit_blocking(pid, Duration::from_secs(10));
            }
            // A QEMU that has forked but not yet written its pid file is
            // found in /proc by liveness(); anything else is gone.
            _ => break,
        }
    }
    if let Err(e) = paths.cleanup() {
        tracing::warn!(instance = %paths.name, error = %e.report(), "rollback: cleanup");
    }
}

impl Drop for RollbackGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Not a warning: the failure is the caller's error (one line, which
        // a refused input must stay) or its interruption, which it reports.
        tracing::info!(instance = %self.paths.name, operation = self.what,
            "operation failed or was interrupted; rolling back");
        if let Some(fd) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            process::kill_and_wait_pidfd(&fd, Duration::from_secs(10));
        }
        kill_and_clean_blocking(&self.paths);
        let undo = std::mem::take(&mut *self.undo.lock().unwrap_or_else(|p| p.into_inner()));
        for step in undo {
            (step.0)();
        }
        let taps = std::mem::take(&mut *self.taps.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        for tap in taps {
            while gkvm_tap::interface_exists(&tap) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
