//! The async client (tokio).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::codec::{encode_command, Decoder, Greeting, Message};
use crate::commands::{decode_output, Command};
use crate::{Error, Event, Options};

/// What the reader task hands a waiting call.
enum Reply {
    Return(Value),
    Qmp { class: String, desc: String },
}

/// The id of `qmp_capabilities`, sent first; commands count from 1.
const CAPABILITIES_ID: u64 = 0;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once the connection is gone; the reason for later calls.
    closed: Option<Error>,
}

/// A negotiated QMP connection for async code.
///
/// Calls take `&self` and may run concurrently: each carries its own id and
/// its reply is matched by id. A reader task decodes everything QEMU sends;
/// events go to a queue read with [`Qmp::next_event`], never dropped.
pub struct Qmp {
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    events: tokio::sync::Mutex<EventQueue>,
    greeting: Greeting,
    options: Options,
    reader: tokio::task::JoinHandle<()>,
}

struct EventQueue {
    rx: mpsc::UnboundedReceiver<Event>,
    /// Events passed over by [`Qmp::wait_for_event`], delivered first.
    stash: VecDeque<Event>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("greeting", &self.greeting)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and negotiates
    /// capabilities, all within `options.connect_timeout`.
    pub async fn connect(path: impl AsRef<Path>, options: Options) -> Result<Qmp, Error> {
        let path = path.as_ref();
        let timeout = options.connect_timeout;
        // QEMU serves one client per QMP socket and queues one more: while
        // another client holds it, a connect fails with EAGAIN. Wait for
        // it to let go, within the connect timeout.
        let connect = async {
            let mut pause = std::time::Duration::from_millis(2);
            loop {
                match UnixStream::connect(path).await {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_millis(50));
                    }
                    r => return r,
                }
            }
        };
        let stream = match tokio::time::timeout(timeout, connect).await {
            Err(_) => {
                return Err(Error::Timeout {
                    command: format!(
                        "connect to {} (another client keeps QEMU's QMP socket busy)",
                        path.display()
                    ),
                    timeout,
                })
            }
            Ok(r) => r.map_err(|e| crate::sys::connect_error(path, e))?,
        };
        let (mut read, mut write) = stream.into_split();
        // `qmp_capabilities` goes out before the greeting is read: QEMU
        // reads it only after sending its greeting, so it is answered in
        // negotiation mode as if sent after it, and the connection costs
        // one round trip instead of two.
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (caps_tx, caps_rx) = oneshot::channel();
        lock(&pending).waiters.insert(CAPABILITIES_ID, caps_tx);
        let caps = encode_command(CAPABILITIES_ID, "qmp_capabilities", None);
        match tokio::time::timeout(timeout, write.write_all(&caps)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    command: "qmp_capabilities".into(),
                    timeout,
                })
            }
            Ok(r) => r.map_err(|e| Error::io("QMP write", e))?,
        }
        let mut decoder = Decoder::new(options.max_message);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let greeting =
            match tokio::time::timeout(timeout, read_greeting(&mut read, &mut decoder, &events_tx))
                .await
            {
                Err(_) => {
                    return Err(Error::Timeout {
                        command: "greeting".into(),
                        timeout,
                    })
                }
                Ok(r) => r?,
            };
        let reader = tokio::spawn(read_loop(read, decoder, pending.clone(), events_tx));
        let qmp = Qmp {
            pending,
            next_id: AtomicU64::new(1),
            writer: tokio::sync::Mutex::new(write),
            events: tokio::sync::Mutex::new(EventQueue {
                rx: events_rx,
                stash: VecDeque::new(),
            }),
            greeting,
            options,
            reader,
        };
        qmp.finish(
            CAPABILITIES_ID,
            "qmp_capabilities",
            timeout,
            qmp.reply(caps_rx, "qmp_capabilities"),
        )
        .await?;
        Ok(qmp)
    }

    /// The server's greeting (QEMU version, capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The options this connection was made with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Runs a typed command with the default timeout.
    pub async fn run<C: Command>(&self, cmd: &C) -> Result<C::Output, Error> {
        self.run_with_timeout(cmd, self.options.command_timeout)
            .await
    }

    /// Runs a typed command with its own timeout.
    pub async fn run_with_timeout<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Output, Error> {
        let args = to_args::<C>(cmd)?;
        let value = self.call_raw(C::NAME, Some(&args), &[], timeout).await?;
        decode_output::<C>(value)
    }

    /// Runs a typed command with descriptors attached (SCM_RIGHTS), for
    /// `getfd` and `add-fd`.
    pub async fn run_with_fds<C: Command>(
        &self,
        cmd: &C,
        fds: &[BorrowedFd<'_>],
    ) -> Result<C::Output, Error> {
        let args = to_args::<C>(cmd)?;
        let value = self
            .call_raw(C::NAME, Some(&args), fds, self.options.command_timeout)
            .await?;
        decode_output::<C>(value)
    }

    /// Runs any command with JSON arguments and returns its raw `return`.
    pub async fn execute_raw(&self, name: &str, arguments: Option<Value>) -> Result<Value, Error> {
        self.call_raw(name, arguments.as_ref(), &[], self.options.command_timeout)
            .await
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` when none came,
    /// [`Error::Closed`] when the connection is gone and no event is left.
    pub async fn next_event(&self, timeout: Duration) -> Result<Option<Event>, Error> {
        let mut q = self.events.lock().await;
        if let Some(e) = q.stash.pop_front() {
            return Ok(Some(e));
        }
        match tokio::time::timeout(timeout, q.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(Some(e)) => Ok(Some(e)),
            Ok(None) => Err(Error::Closed { command: None }),
        }
    }

    /// Waits up to `timeout` for an event that `pred` accepts. Events it
    /// passes over stay queued for later calls.
    pub async fn wait_for_event(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Option<Event>, Error> {
        let mut q = self.events.lock().await;
        if let Some(pos) = q.stash.iter().position(&mut pred) {
            return Ok(q.stash.remove(pos));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, q.rx.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(Error::Closed { command: None }),
                Ok(Some(e)) if pred(&e) => return Ok(Some(e)),
                Ok(Some(e)) => q.stash.push_back(e),
            }
        }
    }

    /// Whether the connection is known to be gone.
    pub fn is_closed(&self) -> bool {
        self.pending
            .lock()
            .map(|p| p.closed.is_some())
            .unwrap_or(true)
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.writer.lock().await.shutdown().await;
        self.reader.abort();
    }

    async fn call_raw(
        &self,
        name: &str,
        args: Option<&Value>,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Value, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.pending);
            if let Some(reason) = &p.closed {
                return Err(closed_error(reason, name));
            }
            p.waiters.insert(id, tx);
        }
        let line = encode_command(id, name, args);
        tracing::trace!(command = name, id, "QMP call");
        let exchange = async {
            self.send(&line, fds).await?;
            self.reply(rx, name).await
        };
        self.finish(id, name, timeout, exchange).await
    }

    /// The reply `rx` brings; the connection's end names `name` if it
    /// brings none.
    async fn reply(&self, rx: oneshot::Receiver<Reply>, name: &str) -> Result<Reply, Error> {
        rx.await.map_err(|_| {
            let p = lock(&self.pending);
            match &p.closed {
                Some(reason) => closed_error(reason, name),
                None => Error::Closed {
                    command: Some(name.to_owned()),
                },
            }
        })
    }

    /// Waits for command `id`'s `exchange` within `timeout` (forgetting
    /// the command if it fails) and turns its reply into a result.
    async fn finish(
        &self,
        id: u64,
        name: &str,
        timeout: Duration,
        exchange: impl std::future::Future<Output = Result<Reply, Error>>,
    ) -> Result<Value, Error> {
        let result = tokio::time::timeout(timeout, exchange).await;
        match result {
            Err(_) => {
                lock(&self.pending).waiters.remove(&id);
                Err(Error::Timeout {
                    command: name.to_owned(),
                    timeout,
                })
            }
            Ok(Err(e)) => {
                lock(&self.pending).waiters.remove(&id);
                Err(e)
            }
            Ok(Ok(Reply::Return(v))) => Ok(v),
            Ok(Ok(Reply::Qmp { class, desc })) => Err(Error::Qmp {
                command: name.to_owned(),
                class,
                desc,
            }),
        }
    }

    async fn send(&self, line: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        let mut w = self.writer.lock().await;
        let mut sent = 0;
        if !fds.is_empty() {
            let sock: &UnixStream = (*w).as_ref();
            loop {
                sock.writable()
                    .await
                    .map_err(|e| Error::io("QMP write", e))?;
                match sock.try_io(Interest::WRITABLE, || {
                    crate::sys::send_with_fds(sock.as_raw_fd(), line, fds)
                }) {
                    Ok(n) => {
                        sent = n;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(write_error(e)),
                }
            }
        }
        w.write_all(&line[sent..]).await.map_err(write_error)
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn to_args<C: Command>(cmd: &C) -> Result<Value, Error> {
    serde_json::to_value(cmd).map_err(|e| Error::Decode {
        command: C::NAME.to_owned(),
        source: e,
    })
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_error(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            Error::Closed { command: None }
        }
        _ => Error::io("QMP write", e),
    }
}

/// The error a call gets once the connection is gone, naming the call.
fn closed_error(reason: &Error, name: &str) -> Error {
    match reason {
        Error::Protocol { reason, excerpt } => Error::Protocol {
            reason: format!("{reason} (connection dropped; {name} not sent or not answered)"),
            excerpt: excerpt.clone(),
        },
        _ => Error::Closed {
            command: Some(name.to_owned()),
        },
    }
}

async fn read_greeting(
    read: &mut OwnedReadHalf,
    decoder: &mut Decoder,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Greeting, Error> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some(m) = decoder.next_message() {
            match m? {
                Message::Greeting(g) => return Ok(g),
                Message::Event(e) => {
                    let _ = events.send(e);
                }
                other => {
                    return Err(Error::protocol(
                        "expected the QMP greeting",
                        format!("{other:?}").as_bytes(),
                    ))
                }
            }
        }
        match read.read(&mut buf).await {
            Ok(0) => {
                return Err(Error::Closed {
                    command: Some("greeting".into()),
                })
            }
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) => return Err(Error::io("reading the QMP greeting", e)),
        }
    }
}

async fn read_loop(
    mut read: OwnedReadHalf,
    mut decoder: Decoder,
    pending: Arc<Mutex<Pending>>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let reason = 'outer: loop {
        while let Some(m) = decoder.next_message() {
            match m {
                Ok(Message::Event(e)) => {
                    tracing::debug!(event = %e.name, "QMP event");
                    let _ = events.send(e);
                }
                Ok(Message::Return { id, value }) => deliver(&pending, id, Reply::Return(value)),
                Ok(Message::Error { id, class, desc }) => {
                    deliver(&pending, id, Reply::Qmp { class, desc })
                }
                Ok(Message::Greeting(_)) => {
                    tracing::warn!("QMP greeting repeated mid-session; ignored")
                }
                // After garbage the stream cannot be trusted to line up
                // replies with calls any more: end the connection.
                Err(e) => break 'outer e,
            }
        }
        match read.read(&mut buf).await {
            Ok(0) => break Error::Closed { command: None },
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) => break Error::io("QMP read", e),
        }
    };
    tracing::debug!(%reason, "QMP connection ended");
    let mut p = lock(&pending);
    p.closed = Some(reason);
    // Dropping the senders wakes every waiting call with the reason above.
    p.waiters.clear();
}

fn deliver(pending: &Mutex<Pending>, id: Option<u64>, reply: Reply) {
    let mut p = lock(pending);
    // QEMU omits the id only when it could not parse the request; replies
    // come in request order, so that one belongs to the oldest call.
    let id = id.or_else(|| p.waiters.keys().min().copied());
    match id.and_then(|id| p.waiters.remove(&id)) {
        Some(tx) => {
            let _ = tx.send(reply);
        }
        None => tracing::debug!(?id, "QMP reply for no waiting call (timed out?) dropped"),
    }
}
