//! A client for the QEMU Machine Protocol (QMP).
//!
//! QMP is how a management process drives a running QEMU: JSON commands in,
//! replies and asynchronous events out, over a Unix socket. This crate is
//! built in three layers so each can be used alone:
//!
//! - [`codec`]: a sans-I/O core that frames and classifies what QEMU sends
//!   (greeting, return, error, event; LF or CRLF; any chunking; a bound on
//!   message size) and encodes commands with request ids. It never touches
//!   a socket, which is what lets it be property-tested and fuzzed.
//! - [`Qmp`] (feature `tokio`, on by default): an async client. Calls take
//!   `&self`, may overlap, are matched to replies by id, and each has a
//!   timeout; a reader task keeps every event for [`Qmp::next_event`].
//! - [`blocking::Qmp`]: the same over std sockets, for tools without an
//!   async runtime (build with `default-features = false`).
//!
//! Both negotiate `qmp_capabilities`, pass descriptors with SCM_RIGHTS
//! (`getfd`, `add-fd`) and return one [`Error`] type that keeps QMP's
//! `class` and `desc`. [`commands`] has typed arguments and replies for the
//! commands a hypervisor manager needs; `execute_raw` covers the rest.
//!
//! ```no_run
//! # #[cfg(feature = "tokio")]
//! # async fn demo() -> Result<(), gkvm_qmp::Error> {
//! use gkvm_qmp::{commands, Options, Qmp};
//!
//! let qmp = Qmp::connect("/run/gkvm/ctrl/web1.qmp", Options::default()).await?;
//! let status = qmp.run(&commands::QueryStatus).await?;
//! println!("running: {}", status.running);
//! qmp.run(&commands::Balloon { value: 512 << 20 }).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod blocking;
#[cfg(feature = "tokio")]
mod client;
pub mod codec;
pub mod commands;
mod error;
mod event;
mod sys;

use std::time::Duration;

#[cfg(feature = "tokio")]
pub use client::Qmp;
pub use codec::{Greeting, Message};
pub use commands::Command;
pub use error::Error;
pub use event::{Event, Timestamp, TypedEvent};

/// Connection settings shared by both clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Bound on connecting, the greeting and `qmp_capabilities`.
    pub connect_timeout: Duration,
    /// Default bound on one command (each call can pass its own).
    pub command_timeout: Duration,
    /// Longest message accepted from QEMU, in bytes.
    pub max_message: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            max_message: codec::DEFAULT_MAX_MESSAGE,
        }
    }
}

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
