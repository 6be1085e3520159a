//! QMP events, raw and typed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// When QEMU emitted an event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// An asynchronous event as QEMU sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// Its data (an empty object when QEMU sent none).
    pub data: Value,
    /// When it happened.
    pub timestamp: Timestamp,
}

/// The events gkvm acts on, decoded; everything else is [`TypedEvent::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TypedEvent {
    /// The guest stopped running for good (`SHUTDOWN`).
    Shutdown {
        /// Whether the guest asked for it (rather than QMP or a signal).
        guest: bool,
        /// QEMU's reason, e.g. `guest-shutdown`, `host-qmp-quit`.
        reason: String,
    },
    /// The VM paused (`STOP`).
    Stop,
    /// The VM resumed (`RESUME`).
    Resume,
    /// The VM reset (`RESET`).
    Reset {
        /// Whether the guest asked for it.
        guest: bool,
        /// QEMU's reason.
        reason: String,
    },
    /// An ACPI power-down was requested (`POWERDOWN`).
    Powerdown,
    /// The migration state changed (`MIGRATION`).
    Migration {
        /// The new status, e.g. `active`, `completed`, `failed`.
        status: String,
    },
    /// The balloon's actual size changed (`BALLOON_CHANGE`).
    BalloonChange {
        /// Guest memory in bytes after the change.
        actual: u64,
    },
    /// A device was removed (`DEVICE_DELETED`).
    DeviceDeleted {
        /// The device id, if it had one.
        device: Option<String>,
        /// Its QOM path.
        path: String,
    },
    /// Any other event.
    Other,
}

impl Event {
    /// Decodes the event into the typed form; unknown or malformed events
    /// are [`TypedEvent::Other`].
    pub fn typed(&self) -> TypedEvent {
        let s = |k: &str| self.data.get(k).and_then(Value::as_str).map(str::to_owned);
        let b = |k: &str| self.data.get(k).and_then(Value::as_bool).unwrap_or(false);
        match self.name.as_str() {
            "SHUTDOWN" => TypedEvent::Shutdown {
                guest: b("guest"),
                reason: s("reason").unwrap_or_default(),
            },
            "STOP" => TypedEvent::Stop,
            "RESUME" => TypedEvent::Resume,
            "RESET" => TypedEvent::Reset {
                guest: b("guest"),
                reason: s("reason").unwrap_or_default(),
            },
            "POWERDOWN" => TypedEvent::Powerdown,
            "MIGRATION" => match s("status") {
                Some(status) => TypedEvent::Migration { status },
                None => TypedEvent::Other,
            },
            "BALLOON_CHANGE" => match self.data.get("actual").and_then(Value::as_u64) {
                Some(actual) => TypedEvent::BalloonChange { actual },
                None => TypedEvent::Other,
            },
            "DEVICE_DELETED" => match s("path") {
                Some(path) => TypedEvent::DeviceDeleted {
                    device: s("device"),
                    path,
                },
                None => TypedEvent::Other,
            },
            _ => TypedEvent::Other,
        }
    }
}
