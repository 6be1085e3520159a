//! The crate's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong with an instance's state on disk; each variant names the
/// instance or path concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The instance name cannot be used in a path or an argv.
    #[error("invalid instance name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A socket path would exceed the kernel's limit (107 bytes).
    #[error("path {path} is too long for a Unix socket (max 107 bytes); use a shorter run dir or instance name")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what it should be.
    #[error("corrupt {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The runtime file is of a version this build does not know.
    #[error("{path}: runtime format version {version} is newer than this gkvm understands")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u64,
    },
    /// Another operation holds the instance's lock.
    #[error("instance {instance} is busy: another operation holds its lock (waited {})", human_duration(.waited))]
    Busy {
        /// The instance.
        instance: String,
        /// How long this call waited.
        waited: Duration,
    },
    /// Another operation holds the node-wide lock.
    #[error("node lock {path} is held by another operation (waited {})", human_duration(.waited))]
    NodeBusy {
        /// The lock file.
        path: PathBuf,
        /// How long this call waited.
        waited: Duration,
    },
    /// Every uid of the pool is taken.
    #[error("uid pool {first}-{last} is exhausted (instance {instance})")]
    PoolExhausted {
        /// First uid of the pool.
        first: u32,
        /// Last uid of the pool.
        last: u32,
        /// The instance asking.
        instance: String,
    },
    /// A directory another user could write into, or owns.
    #[error("refusing to use {path}: {reason}")]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file is larger than anything this crate writes.
    #[error("{path} is larger than {max} bytes; refusing to read it")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// A socket still accepts connections: some process serves it.
    #[error("{path} still accepts connections: a process serves it (refusing to remove it)")]
    SocketInUse {
        /// The socket.
        path: PathBuf,
    },
    /// The pid file is missing or unreadable, yet something serves the
    /// instance's sockets: its QEMU could not be identified.
    #[error("instance {instance}: its pid file is missing or garbled but {socket} accepts connections; not touching it (find its process, or stop it by hand)")]
    Unidentified {
        /// The instance.
        instance: String,
        /// The socket that answers.
        socket: PathBuf,
    },
    /// A path that must be a regular file or directory is a symlink or
    /// something else (someone may be planting links).
    #[error("{path} is not a {expected} (refusing to follow or replace it)")]
    UnexpectedFileType {
        /// The path.
        path: PathBuf,
        /// What it should be.
        expected: &'static str,
    },
}

/// A duration as an operator reads it: `1.5 s`, `30 ms`.
pub fn human_duration(d: &Duration) -> String {
    if *d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

impl Error {
    /// The message and its cause, for one line of output:
    /// `Display` shows this error alone and [`std::error::Error::source`]
    /// gives the cause, so this joins them.
    pub fn report(&self) -> String {
        match std::error::Error::source(self) {
            Some(cause) => format!("{self}: {cause}"),
            None => self.to_string(),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
