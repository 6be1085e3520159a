//! The crate's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// Longest excerpt of offending bytes kept in a [`Error::Protocol`].
pub(crate) const EXCERPT_LEN: usize = 120;

/// Everything a QMP call can fail with. QMP's own errors keep their
/// `class` and `desc`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp {
        /// The command that failed.
        command: String,
        /// QMP's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No reply within the call's timeout.
    #[error("QMP command {command} timed out after {timeout:?}")]
    Timeout {
        /// The command (or `greeting` while connecting).
        command: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The peer sent something that is not QMP.
    #[error("QMP protocol error: {reason} (received: {excerpt:?})")]
    Protocol {
        /// What was wrong.
        reason: String,
        /// The start of the offending bytes, lossily decoded and truncated.
        excerpt: String,
    },
    /// A reply did not have the shape the typed command expects.
    #[error("unexpected reply to QMP command {command}")]
    Decode {
        /// The command whose reply did not decode.
        command: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The socket is missing or nobody listens: QEMU is not running.
    #[error("no QMP server at {path} (QEMU is not running, or its socket is gone)")]
    NotRunning {
        /// The QMP socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The connection closed (QEMU exited or closed the monitor).
    #[error("QMP connection closed{}", while_doing(.command))]
    Closed {
        /// The command that was waiting, if any.
        command: Option<String>,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O error during {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn while_doing(command: &Option<String>) -> String {
    match command {
        Some(c) => format!(" while waiting for the reply to {c}"),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn protocol(reason: impl Into<String>, bytes: &[u8]) -> Error {
        let mut excerpt =
            String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_LEN)]).into_owned();
        if bytes.len() > EXCERPT_LEN {
            excerpt.push('…');
        }
        Error::Protocol {
            reason: reason.into(),
            excerpt,
        }
    }

    /// The message and its cause, for one line of output:
    /// `Display` shows this error alone and [`std::error::Error::source`]
    /// gives the cause, so this joins them.
    pub fn report(&self) -> String {
        match std::error::Error::source(self) {
            Some(cause) => format!("{self}: {cause}"),
            None => self.to_string(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the connection is unusable after this error (closed, I/O
    /// failure or protocol violation), as opposed to one failed call.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Closed { .. }
                | Error::Io { .. }
                | Error::Protocol { .. }
                | Error::NotRunning { .. }
        )
    }

    /// QMP's error class when QEMU rejected the command.
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }
}
