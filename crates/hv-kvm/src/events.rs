//! How an instance ended, from QEMU's own event log (see
//! [`kvm_runtime::InstancePaths::events`]): QEMU's last `SHUTDOWN` (with
//! its cause, e.g. `guest-shutdown` for a poweroff, `guest-reset` for a
//! reboot under `reboot_behavior=exit`) or `GUEST_PANICKED` event. No
//! daemon listens: QEMU writes the log itself and gkvm reads it when asked.

use kvm_runtime::InstancePaths;
use serde_json::Value;

/// How much of the end of the log is read.
const TAIL: u64 = 64 << 10;

/// The end QEMU reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ending {
    /// QEMU's name for the cause (`ShutdownCause`, or `guest-panic`).
    pub(crate) cause: String,
    /// What it means, in words.
    pub(crate) reason: String,
}

/// The last shutdown or panic QEMU reported in `log` (lines of QMP JSON;
/// anything else is skipped).
pub(crate) fn last_ending_in(log: &[u8]) -> Option<Ending> {
    let mut last = None;
    for line in log.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        match v.get("event").and_then(Value::as_str) {
            Some("SHUTDOWN") => {
                let cause = v
                    .pointer("/data/reason")
                    .and_then(Value::as_str)
                    .unwrap_or("none")
                    .to_owned();
                last = Some(cause);
            }
            Some("GUEST_PANICKED") => last = Some("guest-panic".to_owned()),
            _ => {}
        }
    }
    last.map(|cause| Ending {
        reason: describe(&cause),
        cause,
    })
}

/// The last shutdown or panic of the instance's current QEMU, if its log
/// says one.
pub(crate) fn last_ending(paths: &InstancePaths) -> Option<Ending> {
    match paths.read_events(TAIL) {
        Ok(log) => last_ending_in(&log),
        Err(e) => {
            tracing::debug!(instance = %paths.name, error = %e, "event log");
            None
        }
    }
}

fn describe(cause: &str) -> String {
    match cause {
        "guest-shutdown" => "the guest powered off".into(),
        "guest-reset" => {
            "the guest rebooted, which ends the instance (reboot_behavior=exit)".into()
        }
        "guest-panic" => "the guest panicked".into(),
        "host-qmp-quit" => "QEMU was told to quit (QMP quit)".into(),
        "host-signal" => "QEMU was stopped by a signal (SIGTERM, SIGINT or SIGHUP)".into(),
        "host-ui" => "QEMU's window was closed".into(),
        "host-error" => "QEMU stopped on a host error".into(),
        "host-qmp-system-reset" => "a reset was asked over QMP (reboot_behavior=exit)".into(),
        other => format!("QEMU shut down ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_shutdown_or_panic_wins() {
        let log = br#"{"QMP": {"version": {}, "capabilities": []}}
{"return": {}}
{"timestamp": {"seconds": 1, "microseconds": 0}, "event": "RESUME"}
{"timestamp": {"seconds": 2, "microseconds": 0}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}
garbage
{"timestamp": {"seconds": 3, "microseconds": 0}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}
"#;
        let e = last_ending_in(log).unwrap();
        assert_eq!(e.cause, "guest-shutdown");
        assert_eq!(e.reason, "the guest powered off");
        assert_eq!(last_ending_in(b"").map(|e| e.cause), None);
        assert_eq!(
            last_ending_in(br#"{"event": "GUEST_PANICKED", "data": {"action": "pause"}}"#)
                .map(|e| e.cause)
                .as_deref(),
            Some("guest-panic")
        );
        assert_eq!(
            last_ending_in(br#"{"event": "SHUTDOWN", "data": {"reason": "snapshot-load"}}"#)
                .unwrap()
                .reason,
            "QEMU shut down (snapshot-load)"
        );
    }
}
