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
    /// Whether QEMU reported the ACPI power button (`POWERDOWN`, what
    /// gkvm's stop presses) before this shutdown: an administrator's stop,
    /// not the guest's or a user's own (Ganeti's kvmd draws the same line).
    pub(crate) after_powerdown: bool,
}

impl Ending {
    /// Whether this end is Ganeti's "user down" for an instance with
    /// `user_shutdown`: the guest powered itself off or a signal on the
    /// host ended QEMU, not gkvm's power button. A reboot under
    /// `reboot_behavior=exit` (`guest-reset`) is not: the instance is to
    /// be started again.
    pub(crate) fn is_user_down(&self) -> bool {
        !self.after_powerdown && self.cause != "guest-reset" && self.cause != "guest-panic"
    }
}

/// The last shutdown or panic QEMU reported in `log` (lines of QMP JSON;
/// anything else is skipped).
pub(crate) fn last_ending_in(log: &[u8]) -> Option<Ending> {
    let mut last = None;
    let mut powerdown = false;
    for line in log.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        match v.get("event").and_then(Value::as_str) {
            Some("POWERDOWN") => powerdown = true,
            Some("SHUTDOWN") => {
                let cause = v
                    .pointer("/data/reason")
                    .and_then(Value::as_str)
                    .map(plain_token)
                    .unwrap_or_else(|| "none".to_owned());
                // A shutdown answers the power button pressed before it.
                last = Some((cause, std::mem::take(&mut powerdown)));
            }
            Some("GUEST_PANICKED") => last = Some(("guest-panic".to_owned(), false)),
            _ => {}
        }
    }
    last.map(|(cause, after_powerdown)| Ending {
        reason: describe(&cause),
        cause,
        after_powerdown,
    })
}

/// Whether the log ends with a shutdown that answered the power button:
/// `Some(false)` when the last `POWERDOWN` has no `SHUTDOWN` after it (QEMU
/// ended otherwise: killed), `None` when the log has no `POWERDOWN`.
pub(crate) fn answered_power_button_in(log: &[u8]) -> Option<bool> {
    let mut answered = None;
    for line in log.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        match v.get("event").and_then(Value::as_str) {
            Some("POWERDOWN") => answered = Some(false),
            Some("SHUTDOWN") if answered.is_some() => answered = Some(true),
            _ => {}
        }
    }
    answered
}

/// [`answered_power_button_in`] for the instance's current QEMU.
pub(crate) fn answered_power_button(paths: &InstancePaths) -> Option<bool> {
    answered_power_button_in(&paths.read_events(TAIL).ok()?)
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

/// QEMU's causes are lowercase words joined by '-': anything else in the
/// file (tampered, or garbage) is shown escaped, never raw.
fn plain_token(text: &str) -> String {
    if !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        text.to_owned()
    } else {
        text.chars()
            .take(64)
            .flat_map(char::escape_default)
            .collect()
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

    #[test]
    fn a_power_button_answered_or_not() {
        assert_eq!(answered_power_button_in(b""), None);
        let pressed = br#"{"event": "POWERDOWN"}"#;
        assert_eq!(answered_power_button_in(pressed), Some(false));
        let answered = br#"{"event": "POWERDOWN"}
{"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}}"#;
        assert_eq!(answered_power_button_in(answered), Some(true));
    }

    #[test]
    fn a_cause_with_control_characters_is_escaped() {
        let log = "{\"event\": \"SHUTDOWN\", \"data\": {\"reason\": \"x\\u001b[2Jy\\n\"}}";
        let e = last_ending_in(log.as_bytes()).unwrap();
        assert!(!e.cause.chars().any(char::is_control), "{:?}", e.cause);
        assert!(!e.reason.chars().any(char::is_control), "{:?}", e.reason);
        assert!(e.cause.contains("\\u{1b}"), "{}", e.cause);
    }

    #[test]
    fn a_shutdown_after_the_power_button_is_an_administrators() {
        let admin = br#"{"event": "POWERDOWN"}
{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}
"#;
        let e = last_ending_in(admin).unwrap();
        assert!(e.after_powerdown);
        assert!(!e.is_user_down());
        // The guest's own poweroff, and a signal on the host: the user's.
        for cause in ["guest-shutdown", "host-signal", "host-qmp-quit"] {
            let log = format!(r#"{{"event": "SHUTDOWN", "data": {{"reason": "{cause}"}}}}"#);
            let e = last_ending_in(log.as_bytes()).unwrap();
            assert!(!e.after_powerdown);
            assert!(e.is_user_down(), "{cause}");
        }
        // A power button answered by an earlier shutdown does not carry
        // over to the next one (QEMU kept by user_shutdown, started again).
        let later = br#"{"event": "POWERDOWN"}
{"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}}
{"event": "SHUTDOWN", "data": {"reason": "host-signal"}}
"#;
        assert!(last_ending_in(later).unwrap().is_user_down());
        // A reboot under reboot_behavior=exit is to be started again.
        let reset = br#"{"event": "SHUTDOWN", "data": {"reason": "guest-reset"}}"#;
        assert!(!last_ending_in(reset).unwrap().is_user_down());
    }
}
