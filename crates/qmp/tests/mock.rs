//! Faults real QEMU will not produce, from a scripted mock QMP server:
//! garbage, byte-by-byte frames, events between request and reply, replies
//! that never come, EOF mid-message, over-long lines, broken greetings.

use gkvm_qmp::{blocking, commands, Error, Options, Qmp, TypedEvent};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "mock"}, "capabilities": []}}"#;

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn send(&mut self, s: &str) {
        let _ = self.w.write_all(s.as_bytes());
    }
    /// Reads one command; returns (id, name).
    fn command(&mut self) -> Option<(u64, String)> {
        let mut line = String::new();
        if self.r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let v: Value = serde_json::from_str(&line).expect("client sent JSON");
        Some((v["id"].as_u64()?, v["execute"].as_str()?.to_owned()))
    }
    fn reply(&mut self, id: u64, ret: &str) {
        self.send(&format!("{{\"return\": {ret}, \"id\": {id}}}\r\n"));
    }
    /// Greeting and capabilities negotiation.
    fn handshake(&mut self) {
        self.send(&format!("{GREETING}\r\n"));
        let (id, name) = self.command().expect("qmp_capabilities");
        assert_eq!(name, "qmp_capabilities");
        self.reply(id, "{}");
    }
}

struct Mock {
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Mock {
    fn start(script: impl FnOnce(Conn) + Send + 'static) -> Mock {
        let dir = scratch("gkvm-qmp-mock");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let r = BufReader::new(s.try_clone().unwrap());
            script(Conn { w: s, r });
        });
        Mock {
            path,
            thread: Some(thread),
            _dir: dir,
        }
    }
    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("mock script panicked");
        }
    }
}

fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

fn fast() -> Options {
    Options {
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(300),
        ..Options::default()
    }
}

#[test]
fn blocking_reply_split_byte_by_byte_with_event_before_it() {
    let mock = Mock::start(|mut c| {
        // Greeting one byte at a time.
        for b in GREETING.bytes().chain(*b"\r\n") {
            c.w.write_all(&[b]).unwrap();
            c.w.flush().unwrap();
        }
        let (id, _) = c.command().unwrap();
        c.reply(id, "{}");
        let (id, name) = c.command().unwrap();
        assert_eq!(name, "query-balloon");
        let msg = format!(
            "{{\"event\": \"BALLOON_CHANGE\", \"data\": {{\"actual\": 1024}}, \"timestamp\": {{\"seconds\": 5, \"microseconds\": 6}}}}\n{{\"return\": {{\"actual\": 2048}}, \"id\": {id}}}\n"
        );
        for b in msg.bytes() {
            c.w.write_all(&[b]).unwrap();
        }
    });
    let mut q = blocking::Qmp::connect(&mock.path, fast()).unwrap();
    assert_eq!(q.greeting().version.qemu.major, 10);
    assert_eq!(q.run(&commands::QueryBalloon).unwrap().actual, 2048);
    let events = q.take_events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].typed(),
        TypedEvent::BalloonChange { actual: 1024 }
    );
    mock.join();
}

#[test]
fn blocking_timeout_then_client_stays_usable() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let (slow, _) = c.command().unwrap(); // never answered in time
        let (id, _) = c.command().unwrap();
        c.reply(slow, "{\"running\": true, \"status\": \"running\"}"); // late
        c.reply(id, "{\"running\": false, \"status\": \"paused\"}");
    });
    let mut q = blocking::Qmp::connect(&mock.path, fast()).unwrap();
    match q.run_with_timeout(&commands::QueryStatus, Duration::from_millis(100)) {
        Err(Error::Timeout { command, timeout }) => {
            assert_eq!(command, "query-status");
            assert_eq!(timeout, Duration::from_millis(100));
        }
        other => panic!("expected timeout, got {other:?}"),
    }
    // The late reply to the first call must not be taken for the second.
    let s = q.run(&commands::QueryStatus).unwrap();
    assert!(!s.running);
    mock.join();
}

#[test]
fn blocking_garbage_is_a_protocol_error_then_closed() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let _ = c.command().unwrap();
        c.send("\u{1}\u{2}not json at all\r\n");
        std::thread::sleep(Duration::from_millis(50));
    });
    let mut q = blocking::Qmp::connect(&mock.path, fast()).unwrap();
    match q.run(&commands::QueryStatus) {
        Err(Error::Protocol { excerpt, .. }) => assert!(excerpt.contains("not json")),
        other => panic!("expected protocol error, got {other:?}"),
    }
    match q.run(&commands::QueryStatus) {
        Err(e) => assert!(e.is_fatal(), "{e}"),
        Ok(v) => panic!("{v:?}"),
    }
    mock.join();
}

#[test]
fn blocking_eof_mid_message_is_closed() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let _ = c.command().unwrap();
        c.send("{\"return\": {\"runn");
    });
    let mut q = blocking::Qmp::connect(&mock.path, fast()).unwrap();
    match q.run(&commands::QueryStatus) {
        Err(Error::Closed { command }) => assert_eq!(command.as_deref(), Some("query-status")),
        other => panic!("expected closed, got {other:?}"),
    }
    mock.join();
}

#[test]
fn blocking_over_long_line_is_refused() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let _ = c.command();
        let long = format!("{{\"return\": \"{}\"}}\n", "x".repeat(8192));
        c.send(&long);
        std::thread::sleep(Duration::from_millis(50));
    });
    let opts = Options {
        max_message: 1024,
        ..fast()
    };
    let mut q = blocking::Qmp::connect(&mock.path, opts).unwrap();
    match q.execute_raw("query-name", None) {
        Err(Error::Protocol { reason, .. }) => {
            assert!(reason.contains("longer than 1024"), "{reason}")
        }
        other => panic!("expected protocol error, got {other:?}"),
    }
    mock.join();
}

#[test]
fn greeting_faults_are_typed_errors() {
    type Check = fn(&Error) -> bool;
    let cases: [(&str, Check); 4] = [
        (r#"{"QMP": {"capabilities": []}}"#, |e| {
            matches!(e, Error::Protocol { .. })
        }),
        (
            r#"{"QMP": {"version": {"qemu": {"major": 1}}, "capabilities": []}}"#,
            |e| matches!(e, Error::Protocol { .. }),
        ),
        (
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}}}}"#,
            |e| matches!(e, Error::Protocol { .. }),
        ),
        (
            "",
            |e| matches!(e, Error::Timeout { command, .. } if command == "greeting"),
        ),
    ];
    for (greeting, check) in cases {
        let g = greeting.to_owned();
        let mock = Mock::start(move |mut c| {
            if !g.is_empty() {
                c.send(&format!("{g}\n"));
            }
            std::thread::sleep(Duration::from_millis(700));
        });
        match blocking::Qmp::connect(&mock.path, fast()) {
            Err(e) => assert!(check(&e), "{greeting:?}: {e}"),
            Ok(_) => panic!("{greeting:?} accepted"),
        }
        mock.join();
    }
}

#[test]
fn missing_socket_is_not_running() {
    let dir = scratch("gkvm-qmp-none");
    let path = dir.path().join("nothing.sock");
    match blocking::Qmp::connect(&path, fast()) {
        Err(Error::NotRunning { path: p, .. }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
    // A socket file nobody listens on refuses: also not running.
    drop(UnixListener::bind(&path).unwrap());
    match blocking::Qmp::connect(&path, fast()) {
        Err(Error::NotRunning { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn qmp_error_keeps_class_and_desc() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let (id, _) = c.command().unwrap();
        c.send(&format!(
            "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}, \"id\": {id}}}\n"
        ));
    });
    let mut q = blocking::Qmp::connect(&mock.path, fast()).unwrap();
    match q.execute_raw("nope", None) {
        Err(e @ Error::Qmp { .. }) => {
            assert_eq!(e.qmp_class(), Some("CommandNotFound"));
            assert!(e.to_string().contains("nope has not been found"));
            assert!(!e.is_fatal());
        }
        other => panic!("{other:?}"),
    }
    mock.join();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn async_replies_matched_by_id_out_of_order_and_events_kept() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let (a, na) = c.command().unwrap();
        let (b, nb) = c.command().unwrap();
        c.send("{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\n");
        // Answer the second first.
        let (first, second) = if na == "query-balloon" {
            (b, a)
        } else {
            (a, b)
        };
        let _ = nb;
        c.reply(first, "{\"running\": true, \"status\": \"running\"}");
        c.reply(second, "{\"actual\": 4096}");
        std::thread::sleep(Duration::from_millis(100));
    });
    rt().block_on(async {
        let q = Qmp::connect(&mock.path, fast()).await.unwrap();
        let (status, balloon) = tokio::join!(
            q.run(&commands::QueryStatus),
            q.run(&commands::QueryBalloon)
        );
        assert!(status.unwrap().running);
        assert_eq!(balloon.unwrap().actual, 4096);
        let ev = q.next_event(Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(ev.typed(), TypedEvent::Stop);
        // Connection closes after the script: the next event read says so.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(
            q.next_event(Duration::from_secs(1)).await,
            Err(Error::Closed { .. })
        ));
        assert!(q.is_closed());
    });
    mock.join();
}

#[test]
fn async_timeout_then_usable_and_closed_after_eof() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let (slow, _) = c.command().unwrap();
        let (id, _) = c.command().unwrap();
        c.reply(slow, "{}");
        c.reply(id, "{\"actual\": 1}");
        let _ = c.command().unwrap();
        c.send("{\"return\": ");
    });
    rt().block_on(async {
        let q = Qmp::connect(&mock.path, fast()).await.unwrap();
        match q
            .run_with_timeout(&commands::Stop, Duration::from_millis(50))
            .await
        {
            Err(Error::Timeout { command, .. }) => assert_eq!(command, "stop"),
            other => panic!("{other:?}"),
        }
        assert_eq!(q.run(&commands::QueryBalloon).await.unwrap().actual, 1);
        match q.run(&commands::QueryStatus).await {
            Err(Error::Closed { command }) => assert_eq!(command.as_deref(), Some("query-status")),
            other => panic!("{other:?}"),
        }
        // Later calls fail at once, naming themselves.
        match q.run(&commands::Cont).await {
            Err(Error::Closed { command }) => assert_eq!(command.as_deref(), Some("cont")),
            other => panic!("{other:?}"),
        }
    });
    mock.join();
}

#[test]
fn async_garbage_fails_the_waiting_call() {
    let mock = Mock::start(|mut c| {
        c.handshake();
        let _ = c.command().unwrap();
        c.send("]]]garbage[[[\n");
        std::thread::sleep(Duration::from_millis(100));
    });
    rt().block_on(async {
        let q = Qmp::connect(&mock.path, fast()).await.unwrap();
        match q.run(&commands::QueryStatus).await {
            Err(Error::Protocol { excerpt, reason }) => {
                assert!(excerpt.contains("garbage"), "{excerpt}");
                assert!(reason.contains("query-status"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    });
    mock.join();
}
