//! The blocking client: std sockets, no async runtime.

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::codec::{encode_command, Decoder, Greeting, Message};
use crate::commands::{decode_output, Command};
use crate::{Error, Event, Options};

/// A negotiated QMP connection, used from one thread at a time.
///
/// Events that arrive while waiting for a reply are queued; take them with
/// [`Qmp::take_events`] or wait for more with [`Qmp::next_event`].
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    decoder: Decoder,
    greeting: Greeting,
    next_id: u64,
    events: VecDeque<Event>,
    /// Ids of calls that timed out; their late replies are dropped.
    abandoned: HashSet<u64>,
    options: Options,
    closed: bool,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and negotiates
    /// capabilities, within `options.connect_timeout`.
    pub fn connect(path: impl AsRef<Path>, options: Options) -> Result<Qmp, Error> {
        let path = path.as_ref();
        let stream = crate::sys::connect_unix_until(
            path,
            std::time::Instant::now() + options.connect_timeout,
        )
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => Error::Timeout {
                command: format!(
                    "connect to {} (another client keeps QEMU's QMP socket busy)",
                    path.display()
                ),
                timeout: options.connect_timeout,
            },
            _ => crate::sys::connect_error(path, e),
        })?;
        let mut qmp = Qmp {
            stream,
            decoder: Decoder::new(options.max_message),
            greeting: Greeting {
                version: crate::codec::VersionInfo {
                    qemu: crate::codec::VersionTriple {
                        major: 0,
                        minor: 0,
                        micro: 0,
                    },
                    package: String::new(),
                },
                capabilities: Vec::new(),
            },
            next_id: 1,
            events: VecDeque::new(),
            abandoned: HashSet::new(),
            options,
            closed: false,
        };
        let deadline = Instant::now() + options.connect_timeout;
        qmp.greeting = loop {
            match qmp.read_message(deadline, options.connect_timeout, "greeting")? {
                Message::Greeting(g) => break g,
                Message::Event(e) => qmp.events.push_back(e),
                other => {
                    return Err(Error::protocol(
                        "expected the QMP greeting",
                        format!("{other:?}").as_bytes(),
                    ))
                }
            }
        };
        qmp.call_raw("qmp_capabilities", None, &[], options.connect_timeout)?;
        Ok(qmp)
    }

    /// The server's greeting (QEMU version, capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs a typed command with the default timeout.
    pub fn run<C: Command>(&mut self, cmd: &C) -> Result<C::Output, Error> {
        self.run_with_timeout(cmd, self.options.command_timeout)
    }

    /// Runs a typed command with its own timeout.
    pub fn run_with_timeout<C: Command>(
        &mut self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Output, Error> {
        let args = serde_json::to_value(cmd).map_err(|e| Error::Decode {
            command: C::NAME.to_owned(),
            source: e,
        })?;
        let value = self.call_raw(C::NAME, Some(&args), &[], timeout)?;
        decode_output::<C>(value)
    }

    /// Runs a typed command with descriptors attached (for `getfd`, `add-fd`).
    pub fn run_with_fds<C: Command>(
        &mut self,
        cmd: &C,
        fds: &[BorrowedFd<'_>],
    ) -> Result<C::Output, Error> {
        let args = serde_json::to_value(cmd).map_err(|e| Error::Decode {
            command: C::NAME.to_owned(),
            source: e,
        })?;
        let value = self.call_raw(C::NAME, Some(&args), fds, self.options.command_timeout)?;
        decode_output::<C>(value)
    }

    /// Runs any command with JSON arguments and returns its raw `return`.
    pub fn execute_raw(&mut self, name: &str, arguments: Option<Value>) -> Result<Value, Error> {
        self.call_raw(name, arguments.as_ref(), &[], self.options.command_timeout)
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// The next event: a queued one, or the next to arrive within `timeout`
    /// (`Ok(None)` when none came).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, Error> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, timeout, "event") {
                Ok(Message::Event(e)) => return Ok(Some(e)),
                Ok(other) => self.stray(other),
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits up to `timeout` for an event that `pred` accepts; other events
    /// stay queued.
    pub fn wait_for_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Option<Event>, Error> {
        if let Some(pos) = self.events.iter().position(&mut pred) {
            return Ok(self.events.remove(pos));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, timeout, "event") {
                Ok(Message::Event(e)) if pred(&e) => return Ok(Some(e)),
                Ok(Message::Event(e)) => self.events.push_back(e),
                Ok(other) => self.stray(other),
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Closes the connection.
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn stray(&mut self, msg: Message) {
        match msg {
            Message::Return { id: Some(id), .. } | Message::Error { id: Some(id), .. }
                if self.abandoned.remove(&id) =>
            {
                tracing::debug!(id, "dropping the late reply of a timed-out QMP call");
            }
            other => tracing::warn!(?other, "unexpected QMP message"),
        }
    }

    fn call_raw(
        &mut self,
        name: &str,
        args: Option<&Value>,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Value, Error> {
        if self.closed {
            return Err(Error::Closed {
                command: Some(name.to_owned()),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let line = encode_command(id, name, args);
        tracing::trace!(command = name, id, "QMP call");
        let deadline = Instant::now() + timeout;
        self.send(&line, fds, name)?;
        loop {
            let msg = match self.read_message(deadline, timeout, name) {
                Ok(m) => m,
                Err(e @ Error::Timeout { .. }) => {
                    self.abandoned.insert(id);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            match msg {
                Message::Event(e) => self.events.push_back(e),
                Message::Return { id: rid, value } if rid == Some(id) || rid.is_none() => {
                    return Ok(value)
                }
                Message::Error {
                    id: rid,
                    class,
                    desc,
                } if rid == Some(id) || rid.is_none() => {
                    return Err(Error::Qmp {
                        command: name.to_owned(),
                        class,
                        desc,
                    })
                }
                other => self.stray(other),
            }
        }
    }

    fn send(&mut self, line: &[u8], fds: &[BorrowedFd<'_>], name: &str) -> Result<(), Error> {
        let result = if fds.is_empty() {
            self.stream.write_all(line)
        } else {
            crate::sys::send_with_fds(self.stream.as_raw_fd(), line, fds)
                .and_then(|n| self.stream.write_all(&line[n..]))
        };
        result.map_err(|e| self.fail(e, name))
    }

    fn fail(&mut self, e: std::io::Error, name: &str) -> Error {
        self.closed = true;
        match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => Error::Closed {
                command: Some(name.to_owned()),
            },
            _ => Error::io(format!("QMP command {name}"), e),
        }
    }

    /// Reads until one message is complete or `deadline` passes.
    fn read_message(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<Message, Error> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(m) = self.decoder.next_message() {
                if m.is_err() {
                    self.closed = true;
                }
                return m;
            }
            if self.closed {
                return Err(Error::Closed {
                    command: Some(what.to_owned()),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    command: what.to_owned(),
                    timeout,
                });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| Error::io("set socket timeout", e))?;
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    return Err(Error::Closed {
                        command: Some(what.to_owned()),
                    });
                }
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.fail(e, what)),
            }
        }
    }
}
