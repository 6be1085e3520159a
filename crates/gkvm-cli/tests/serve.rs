//! `gkvm serve`: the same answers as the command line, without a process
//! start per call; one server per socket; it steps aside when its binary is
//! replaced or its socket removed, and survives callers that send garbage.

use gkvm_testkit::ScratchDir;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const GKVM: &str = env!("CARGO_BIN_EXE_gkvm");

/// A server in the foreground, killed at the end of the test.
struct Server(Child);

impl Server {
    fn start(binary: &Path, socket: &Path) -> Server {
        Server::start_with(binary, socket, &[])
    }

    /// With gkvm's global options `globals` (e.g. `--run-dir X`).
    fn start_with(binary: &Path, socket: &Path, globals: &[&str]) -> Server {
        let child = Command::new(binary)
            .args(globals)
            .args(["-q", "serve", "--socket"])
            .arg(socket)
            .args(["--idle-exit", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn gkvm serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the server never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Server(child)
    }

    /// Waits for the server to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.0.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `line` as is; the answer line, or None when the server closed
/// the connection unanswered.
fn raw(socket: &Path, line: &[u8]) -> Option<Value> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(line).unwrap();
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    if answer.is_empty() {
        return None;
    }
    assert!(answer.ends_with('\n'), "one line: {answer:?}");
    Some(serde_json::from_str(&answer).expect("the answer is JSON"))
}

fn call(socket: &Path, request: &Value) -> Value {
    raw(socket, format!("{request}\n").as_bytes()).expect("an answer")
}

fn cli(args: &[&str]) -> Output {
    Command::new(GKVM).args(args).output().expect("run gkvm")
}

/// The served answer equals the command line's: code, stdout, stderr.
fn same_as_cli(socket: &Path, args: &[&str]) {
    let served = call(socket, &json!({ "argv": args }));
    let out = cli(args);
    assert_eq!(
        served["code"],
        json!(out.status.code().unwrap()),
        "{args:?}: {served}"
    );
    assert_eq!(
        served["stdout"],
        json!(String::from_utf8_lossy(&out.stdout))
    );
    assert_eq!(
        served["stderr"],
        json!(String::from_utf8_lossy(&out.stderr))
    );
    assert_eq!(served["version"], json!(env!("CARGO_PKG_VERSION")));
}

#[test]
fn answers_as_the_command_line_and_survives_garbage() {
    let dir = ScratchDir::new("gkvm-serve");
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let socket = dir.path().join("s.sock");
    let _server = Server::start_with(Path::new(GKVM), &socket, &["--run-dir", run_s]);
    let mode = std::fs::symlink_metadata(&socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only its user may connect");

    same_as_cli(&socket, &["--run-dir", run_s, "--json", "list"]);
    same_as_cli(&socket, &["--run-dir", run_s, "list"]);
    same_as_cli(&socket, &["--run-dir", run_s, "--json", "info", "nosuch"]);
    same_as_cli(&socket, &["--run-dir", run_s, "info", "bad/name"]);
    same_as_cli(&socket, &["--json", "no-such-command"]);
    same_as_cli(&socket, &["--version"]);
    let info = call(
        &socket,
        &json!({"argv": ["--json", "info", "nosuch"], "env": {"GKVM_RUN_DIR": run_s}}),
    );
    assert_ne!(info["code"], json!(0));
    assert!(
        info["stderr"].as_str().unwrap().contains("nosuch"),
        "{info}"
    );

    // The instance definition on stdin, relative paths from cwd.
    let def = r#"{"name":"s1","memory":64,"hvparams":{"vnc_bind_address":"","kernel_path":""}}"#;
    std::fs::write(dir.path().join("s1.json"), def).unwrap();
    let by_file = cli(&[
        "--run-dir",
        run_s,
        "argv",
        dir.path().join("s1.json").to_str().unwrap(),
    ]);
    assert!(by_file.status.success());
    let on_stdin = call(
        &socket,
        &json!({"argv": ["--run-dir", run_s, "argv", "/dev/stdin"], "stdin": def}),
    );
    assert_eq!(on_stdin["code"], json!(0), "{on_stdin}");
    assert_eq!(
        on_stdin["stdout"],
        json!(String::from_utf8_lossy(&by_file.stdout))
    );
    let in_cwd = call(
        &socket,
        &json!({"argv": ["--run-dir", run_s, "argv", "s1.json"], "cwd": dir.path()}),
    );
    assert_eq!(in_cwd["stdout"], on_stdin["stdout"]);

    // Garbage: a usage error, and the server goes on serving.
    for line in [
        &b"not json\n"[..],
        b"{\"argv\": 3}\n",
        b"{\"argv\": [], \"surprise\": 1}\n",
        b"\xff\xfe\n",
        b"{\"argv\": [\"list\"]}",
    ] {
        let answer = raw(&socket, line).expect("garbage is answered");
        assert_eq!(answer["code"], json!(2), "{answer}");
        let err: Value = serde_json::from_str(answer["stderr"].as_str().unwrap()).unwrap();
        assert_eq!(err["kind"], json!("usage"));
    }
    // A caller of another interface: nothing is run.
    let refused = call(
        &socket,
        &json!({"argv": ["--run-dir", run_s, "start", "--file", dir.path().join("s1.json")],
                "versions": ["9.9"]}),
    );
    assert_eq!(refused["code"], json!(2), "{refused}");
    assert!(refused["stderr"]
        .as_str()
        .unwrap()
        .contains("does not speak"));
    assert!(!run.join("pid").join("s1").exists());
    let mine = env!("CARGO_PKG_VERSION").rsplit_once('.').unwrap().0;
    let spoken = call(
        &socket,
        &json!({"argv": ["--run-dir", run_s, "list"], "versions": ["9.9", mine]}),
    );
    assert_eq!(spoken["code"], json!(0), "{spoken}");

    // A call without a run dir is run in the server's.
    let served = call(&socket, &json!({"argv": ["--json", "list"]}));
    assert_eq!(served["stdout"], json!("[]\n"), "{served}");

    // A second server on the same socket returns at once; the first serves on.
    let t = Instant::now();
    let second = Command::new(GKVM)
        .args(["serve", "--detach", "--socket"])
        .arg(&socket)
        .status()
        .unwrap();
    assert!(second.success());
    assert!(t.elapsed() < Duration::from_secs(5));
    same_as_cli(&socket, &["--version"]);
}

#[test]
fn steps_aside_when_its_socket_is_removed() {
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let mut server = Server::start(Path::new(GKVM), &socket);
    std::fs::remove_file(&socket).unwrap();
    assert!(
        server.wait_exit(Duration::from_secs(10)),
        "the server outlived its socket"
    );
}

#[test]
fn steps_aside_when_its_binary_is_replaced() {
    let dir = ScratchDir::new("gkvm-serve");
    let binary: PathBuf = dir.path().join("gkvm");
    std::fs::copy(GKVM, &binary).unwrap();
    let socket = dir.path().join("s.sock");
    let mut server = Server::start(&binary, &socket);
    let before = call(&socket, &json!({"argv": ["--version"]}));
    assert_eq!(before["code"], json!(0));
    // An upgrade: a new file renamed over the old one.
    let new = dir.path().join("gkvm.new");
    std::fs::copy(GKVM, &new).unwrap();
    std::fs::rename(&new, &binary).unwrap();
    let retired = raw(&socket, b"{\"argv\": [\"--version\"]}\n").expect("an answer");
    assert_eq!(retired["retired"], json!(true), "{retired}");
    assert!(retired.get("code").is_none(), "nothing was run: {retired}");
    assert!(server.wait_exit(Duration::from_secs(10)));
    assert!(!socket.exists(), "the retired server left its socket");
    // The caller starts the new binary's server.
    let _new = Server::start(&binary, &socket);
    assert_eq!(
        call(&socket, &json!({"argv": ["--version"]}))["code"],
        json!(0)
    );
}

#[test]
fn a_detached_server_serves_and_idles_out() {
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let st = Command::new(GKVM)
        .args(["serve", "--detach", "--idle-exit", "2", "--socket"])
        .arg(&socket)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        call(&socket, &json!({"argv": ["--version"]}))["code"],
        json!(0)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while socket.exists() {
        assert!(Instant::now() < deadline, "the idle server never left");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nor is its child that was waiting for a call left behind.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !serving(&socket).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            serving(&socket)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Live (not zombie) processes whose command line names `socket`.
fn serving(socket: &Path) -> Vec<i32> {
    let needle = socket.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

#[test]
fn a_terminated_server_leaves_nothing_that_stops_the_next() {
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let mut server = Server::start(Path::new(GKVM), &socket);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(i32::try_from(server.0.id()).unwrap(), libc::SIGTERM) };
    assert!(server.wait_exit(Duration::from_secs(10)));
    // Its waiting child goes with it; the stale socket is replaced.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !serving(&socket).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            serving(&socket)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _next = Server::start(Path::new(GKVM), &socket);
    assert_eq!(
        call(&socket, &json!({"argv": ["--version"]}))["code"],
        json!(0)
    );
}

#[test]
fn tampered_paths_are_refused_by_name() {
    let dir = ScratchDir::new("gkvm-serve");
    let serve = |socket: &Path| {
        Command::new(GKVM)
            .args(["serve", "--detach", "--socket"])
            .arg(socket)
            .output()
            .unwrap()
    };
    // A regular file where the socket goes is not removed.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, "keep").unwrap();
    let out = serve(&file);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a socket") && err.contains("file.sock"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // A symlink planted as the lock file is not followed.
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, "").unwrap();
    let linked = dir.path().join("l.sock");
    std::os::unix::fs::symlink(&target, dir.path().join("l.sock.lock")).unwrap();
    let out = serve(&linked);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lock file") && err.contains("l.sock"), "{err}");
    assert!(!linked.exists());
}

/// The pids of `pid`'s children.
fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The server's worker (it answers the calls that only read), by its
/// process name.
fn is_worker(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "gkvm-worker")
}

/// The server's worker, once it runs.
fn wait_worker(server: u32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(w) = children_of(server).into_iter().find(|p| is_worker(*p)) {
            return w;
        }
        assert!(Instant::now() < deadline, "{server} has no worker");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `pid` has `n` children besides its worker (the server
/// forks its waiting child ahead of calls); they are returned.
fn wait_children(pid: u32, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut now = children_of(pid);
        now.retain(|p| !is_worker(*p));
        if now.len() == n {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{pid} has children {now:?}, not {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_waiting_child_is_replaced() {
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let server = Server::start(Path::new(GKVM), &socket);
    for _ in 0..3 {
        let [waiting] = wait_children(server.0.id(), 1)[..] else {
            unreachable!()
        };
        // SAFETY: a signal to the server's child, which this test made.
        unsafe { libc::kill(waiting, libc::SIGKILL) };
        // Gone (a call that reached it while it died would be lost, as
        // with any killed process: not what this test is about).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{waiting}")).exists() {
            assert!(Instant::now() < deadline, "{waiting} outlived SIGKILL");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The next call is answered (before: it connected and waited for ever).
        let answer = raw(&socket, b"{\"argv\": [\"--version\"]}\n")
            .expect("a call after the waiting child was killed is answered");
        assert_eq!(answer["code"], json!(0), "{answer}");
    }
}

/// The server SIGKILLed while a child runs a call: the child runs it to its
/// end and answers once (it holds the caller's connection), and a new
/// server on the same socket serves the next call.
#[test]
fn a_call_outlives_its_killed_server() {
    let Some(env) = gkvm_testkit::require("serve_killed_mid_call", &[gkvm_testkit::Need::Qemu])
    else {
        return;
    };
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let run = dir.path().join("run");
    let run_arg = run.to_str().unwrap().to_owned();
    let mut server = Server::start_with(Path::new(GKVM), &socket, &["--run-dir", &run_arg]);
    // A QEMU whose probe waits until the test lets it go.
    let (probed, hold) = (dir.path().join("probed"), dir.path().join("hold"));
    std::fs::write(&hold, "").unwrap();
    let qemu = dir.path().join("held-qemu");
    std::fs::write(
        &qemu,
        format!(
            "#!/bin/sh\necho x >> {}\nwhile [ -e {} ]; do sleep 0.02; done\nexec {} \"$@\"\n",
            probed.display(),
            hold.display(),
            env.qemu.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut call = UnixStream::connect(&socket).unwrap();
    let request = json!({"argv": ["--json", "caps"], "env": {"GKVM_KVM_PATH": qemu}});
    call.write_all(format!("{request}\n").as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probed.exists() {
        assert!(Instant::now() < deadline, "the call never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    std::fs::remove_file(&hold).unwrap();
    call.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&call).read_line(&mut answer).unwrap();
    let answer: Value = serde_json::from_str(&answer).expect("an answer after the server died");
    assert_eq!(answer["code"], json!(0), "{answer}");
    // Nothing else answers on it: the connection ends after the one line.
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut call, &mut rest).unwrap();
    assert_eq!(rest, "");
    let _next = Server::start_with(Path::new(GKVM), &socket, &["--run-dir", &run_arg]);
    let answer = call_ok(&socket);
    assert_eq!(answer["code"], json!(0), "{answer}");
}

/// `--version` through the server: its answer.
fn call_ok(socket: &Path) -> Value {
    call(socket, &json!({"argv": ["--version"]}))
}

/// The worker (calls that only read, answered in process) killed in the
/// middle of a call: that call's connection is closed at once, not left
/// waiting; while no worker runs, children answer; the worker is replaced.
#[test]
fn a_worker_killed_mid_call_is_replaced() {
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let server = Server::start(Path::new(GKVM), &socket);
    let first = wait_worker(server.0.id());
    // A "QEMU" that hangs when probed holds the call in the worker.
    let marker = dir.path().join("probed");
    let qemu = dir.path().join("hanging-qemu");
    std::fs::write(
        &qemu,
        format!("#!/bin/sh\necho $$ > {}\nexec sleep 60\n", marker.display()),
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut held = UnixStream::connect(&socket).unwrap();
    let request = json!({"request": {"op": "capabilities", "kvm_path": qemu}});
    held.write_all(format!("{request}\n").as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = loop {
        if let Some(pid) = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the probe never ran");
        std::thread::sleep(Duration::from_millis(10));
    };
    // SAFETY: signals to processes this test made (the server's worker,
    // then the probe it left).
    unsafe { libc::kill(first, libc::SIGKILL) };
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut held, &mut rest);
    // SAFETY: as above.
    unsafe { libc::kill(probe, libc::SIGKILL) };
    assert!(read.is_ok(), "the held call was not closed: {read:?}");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // Calls go on being answered, and a new worker takes over. A call
    // that reaches the worker as it dies is closed unanswered, and may be
    // repeated (it changed nothing): under load (one run in about forty
    // here) the first call after the kill was, so it is repeated once.
    let mut listed = api_call(&socket, &json!({"op": "list"}));
    if listed.is_empty() {
        eprintln!("the first call after the worker's death was closed unanswered; repeated");
        listed = api_call(&socket, &json!({"op": "list"}));
    }
    assert!(
        listed.first().is_some_and(|l| l.get("response").is_some()),
        "{listed:?}"
    );
    let second = wait_worker(server.0.id());
    assert_ne!(first, second);
    let listed = api_call(&socket, &json!({"op": "list"}));
    assert!(
        listed.first().is_some_and(|l| l.get("response").is_some()),
        "{listed:?}"
    );
}

#[test]
fn calls_are_bounded_and_slow_callers_time_out() {
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let server = Server::start(Path::new(GKVM), &socket);
    // 1,000 callers that connect and say nothing: the server reads from
    // them itself, so they hold no process (only the child forked ahead
    // runs), and an honest call is answered at once, while they all still
    // wait for their deadline.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let answer = raw(&socket, b"{\"argv\": [\"--version\"]}\n").expect("answered");
    assert_eq!(answer["code"], json!(0), "{answer}");
    let mut unanswered = 0;
    for c in &idle {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        if matches!(std::io::Read::read(&mut &*c, &mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        {
            unanswered += 1;
        }
    }
    assert_eq!(
        unanswered, 1000,
        "idle callers were answered before the honest one"
    );
    let mut children = children_of(server.0.id());
    children.retain(|p| !is_worker(*p));
    assert!(
        children.len() <= 2,
        "{children:?} processes for 1,000 idle callers"
    );
    drop(idle);

    // A caller that sends a byte a second is cut off after the request's
    // 10 s in all, not 10 s per byte.
    let mut slow = UnixStream::connect(&socket).unwrap();
    let start = Instant::now();
    let mut answer = String::new();
    slow.set_read_timeout(Some(Duration::from_millis(900)))
        .unwrap();
    while start.elapsed() < Duration::from_secs(60) {
        if slow.write_all(b" ").is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match std::io::Read::read(&mut slow, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.push_str(&String::from_utf8_lossy(&buf[..n]));
                if answer.ends_with('\n') {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "a slow caller held its child for {:?}",
        start.elapsed()
    );
    assert!(answer.contains("no whole request"), "{answer}");
}

#[test]
fn a_server_only_touches_its_own_run_dir() {
    let dir = ScratchDir::new("gkvm-serve");
    let (ours, other) = (dir.path().join("ours"), dir.path().join("other"));
    let socket = dir.path().join("s.sock");
    let mut server = Server::start_with(
        Path::new(GKVM),
        &socket,
        &["--run-dir", ours.to_str().unwrap()],
    );
    // No run dir in the call: the server's (node-info fills its caps cache).
    let answer = call(&socket, &json!({"argv": ["--json", "node-info"]}));
    assert_eq!(answer["code"], json!(0), "{answer}");
    assert!(ours.join("caps").exists());
    // Another one, by flag or by variable: not run, and the server retires
    // so that the caller's next call starts a server for its own.
    for request in [
        json!({"argv": ["--run-dir", other.to_str().unwrap(), "--json", "node-info"]}),
        json!({"argv": ["--json", "node-info"], "env": {"GKVM_RUN_DIR": other}}),
        // A typed request that only reads (answered by the worker).
        json!({"request": {"op": "overview"}, "env": {"GKVM_RUN_DIR": other}}),
    ] {
        let answer = call(&socket, &request);
        assert_eq!(answer["retired"], json!(true), "{request}: {answer}");
        assert!(
            answer["reason"].as_str().unwrap().contains("run directory"),
            "{answer}"
        );
        assert!(!other.exists(), "the server touched {}", other.display());
        if answer["retired"] == json!(true) && server.wait_exit(Duration::from_secs(10)) {
            server = Server::start_with(
                Path::new(GKVM),
                &socket,
                &["--run-dir", ours.to_str().unwrap()],
            );
        }
    }
}

/// Sends a typed API request to the server; its reply lines. The QEMU
/// the tests use is every call's (`GKVM_KVM_PATH`).
fn api_call(socket: &Path, request: &Value) -> Vec<Value> {
    api_call_env(socket, request, &json!({}))
}

fn test_qemu() -> PathBuf {
    gkvm_testkit::qemu_binary().expect("a QEMU")
}

/// ... with the caller's gkvm variables `env`.
fn api_call_env(socket: &Path, request: &Value, env: &Value) -> Vec<Value> {
    let mut env = env.clone();
    env["GKVM_KVM_PATH"] = json!(test_qemu());
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("{}\n", json!({ "request": request, "env": env })).as_bytes())
        .unwrap();
    BufReader::new(&s)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("a reply line")).expect("JSON"))
        .collect()
}

/// `gkvm api` run as a process: its reply lines.
fn api_cli(run: &Path, request: &Value) -> Vec<Value> {
    let mut child = Command::new(GKVM)
        .arg("--run-dir")
        .arg(run)
        .arg("--kvm-path")
        .arg(test_qemu())
        .arg("api")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The typed API: the served answer, `gkvm api`'s and the facade's own
/// `handle` in process are the same JSON, valid against the schema; a
/// long operation's progress reaches the caller while it runs.
#[test]
fn typed_requests_are_answered_as_the_facade_answers() {
    let Some(env) = gkvm_testkit::require(
        "serve_api",
        &[gkvm_testkit::Need::Root, gkvm_testkit::Need::Qemu],
    ) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-serve-api");
    let run = dir.path().join("run");
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let other = dir.path().join("other");
    let _kill_other = gkvm_testkit::KillRunDir(other.clone());
    let socket = dir.path().join("s.sock");
    let _server = Server::start_with(
        Path::new(GKVM),
        &socket,
        &["--run-dir", run.to_str().unwrap()],
    );
    let schema_text = Command::new(GKVM)
        .args(["api", "--schema"])
        .output()
        .unwrap()
        .stdout;
    let schema: Value = serde_json::from_slice(&schema_text).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let reply_ok = |line: &Value| {
        let wrapped = json!({"request": {"op": "list"}, "reply": line});
        let errors: Vec<String> = validator
            .iter_errors(&wrapped)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}\n{line:#}");
    };

    let kvm = if gkvm_testkit::guestless_accel() == "kvm" {
        "enabled"
    } else {
        "disabled"
    };
    let spec = json!({"name": "api1", "memory": 64,
        "hvparams": {"kvm_flag": kvm, "kernel_path": "", "vnc_bind_address": ""}});
    let start = api_call(
        &socket,
        &json!({"op": "start", "spec": spec, "mode": "paused"}),
    );
    assert_eq!(start.len(), 1, "{start:?}");
    assert_eq!(
        start[0]["response"]["answer"],
        json!("started"),
        "{start:?}"
    );
    reply_ok(&start[0]);

    let hv = hv_kvm::KvmHypervisor::new({
        let mut c = hv_kvm::Config::new(hv_kvm::RunDir::new(&run));
        c.kvm_path = Some(test_qemu());
        c
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for request in [
        json!({"op": "list"}),
        json!({"op": "plan", "spec": spec}),
        json!({"op": "capabilities", "kvm_path": env.qemu}),
        json!({"op": "console", "instance": "api1"}),
        json!({"op": "hotplug_supported", "instance": "api1"}),
        json!({"op": "migration_info", "instance": "api1", "for_ganeti": false}),
        json!({"op": "stop", "instance": "nosuch", "mode": {"kind": "force"}}),
        json!({"op": "balloon", "instance": "nosuch", "mib": 32}),
    ] {
        let served = api_call(&socket, &request);
        let by_cli = api_cli(&run, &request);
        let typed: hv_kvm::Request = serde_json::from_value(request.clone()).unwrap();
        let in_process = match rt.block_on(hv.handle(typed)) {
            Ok(r) => serde_json::to_value(hv_kvm::Reply::Response(r)).unwrap(),
            Err(e) => {
                serde_json::to_value(hv_kvm::Reply::Error(hv_kvm::ErrorReply::from(&e))).unwrap()
            }
        };
        assert_eq!(served, vec![in_process.clone()], "{request}");
        assert_eq!(by_cli, served, "{request}");
        reply_ok(&served[0]);
    }
    // Garbage and unknown operations: an error reply of kind usage.
    for request in [
        json!({"op": "lisst"}),
        json!({"op": "stop"}),
        json!({"op": "list", "surprise": 1}),
    ] {
        let served = api_call(&socket, &request);
        assert_eq!(served.len(), 1);
        assert_eq!(
            served[0]["error"]["kind"],
            json!("usage"),
            "{request}: {served:?}"
        );
        reply_ok(&served[0]);
    }

    // Progress streams: a receive says it listens (a progress line) while
    // it still waits; its answer (no guest came) follows.
    // Sealed with the nodes' shared key: the caller's GKVM_MIGRATION_KEY
    // reaches the call.
    let key = dir.path().join("migration.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let env_key = json!({ "GKVM_MIGRATION_KEY": key, "GKVM_KVM_PATH": test_qemu() });
    let info = api_call_env(
        &socket,
        &json!({"op": "migration_info", "instance": "api1", "for_ganeti": false}),
        &env_key,
    );
    let info = info[0]["response"]["value"].as_str().unwrap().to_owned();
    let other_socket = dir.path().join("o.sock");
    let _other_server = Server::start_with(
        Path::new(GKVM),
        &other_socket,
        &["--run-dir", other.to_str().unwrap()],
    );
    let mut s = UnixStream::connect(&other_socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let request = json!({"request": {"op": "receive", "info": info, "address": "127.0.0.1", "port": port,
        "timeout_secs": 3, "config": null}, "env": env_key});
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut lines = BufReader::new(&s).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(first.get("progress").is_some(), "{first}");
    reply_ok(&first);
    assert!(
        std::fs::read_dir(other.join("pid"))
            .unwrap()
            .next()
            .is_some(),
        "the destination waits (its QEMU listens) when the progress line arrives"
    );
    let last: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(last.get("error").is_some(), "{last}");
    reply_ok(&last);
    rt.block_on(hv.stop("api1", hv_kvm::StopMode::Force))
        .unwrap();
}

/// A request larger than the server takes is answered an error, not read
/// for ever; a caller of another user is closed on at once (it holds
/// nothing), and the server serves on.
#[test]
fn oversize_requests_and_other_users_are_turned_away() {
    let dir = ScratchDir::new("gkvm-serve");
    let socket = dir.path().join("s.sock");
    let _server = Server::start(Path::new(GKVM), &socket);
    let mut big = UnixStream::connect(&socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0usize;
    // The server stops reading past 16 MiB: a write then fails or the
    // answer comes.
    while sent < (32 << 20) && big.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    let mut answer = String::new();
    let _ = BufReader::new(&big).read_line(&mut answer);
    assert!(
        answer.contains("too large"),
        "after {sent} bytes: {answer:?}"
    );

    if nix::unistd::Uid::effective().is_root() {
        // SAFETY: fork in a test; the child only switches user, connects
        // and exits with what it saw.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| {
                nix::unistd::setgid(nix::unistd::Gid::from_raw(65534)).ok()?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(65534)).ok()?;
                // The socket is 0600: another user may not even connect,
                // whatever the directory allows.
                match UnixStream::connect(&socket) {
                    Err(_) => Some(0),
                    Ok(s) => {
                        let _ = (&s).write_all(b"{\"argv\": [\"--version\"]}\n");
                        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                        let mut line = String::new();
                        let _ = BufReader::new(&s).read_line(&mut line);
                        Some(i32::from(!line.is_empty()))
                    }
                }
            })()
            .unwrap_or(2);
            // SAFETY: the forked child ends here.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0, "another user was answered");
    }
    let ok = raw(&socket, b"{\"argv\": [\"--version\"]}\n").expect("served on");
    assert_eq!(ok["code"], json!(0));
}
