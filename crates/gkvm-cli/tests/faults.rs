//! Faults of gkvm itself and of what it reads, as a hostile operator (or a
//! bad day) produces them: `gkvm` interrupted by SIGINT, SIGTERM or SIGKILL
//! at several points of a start, a migration and an accept; a pid file
//! removed or garbled behind its back; a migration info file edited on the
//! way; symlinks planted in and foreign owners of its run directory; a
//! forced stop racing a graceful one; closed and full outputs; inputs far
//! out of bounds. Each test asserts the invariants that matter: one
//! instance is never two running QEMUs, a migrated-away source never runs
//! again, and nothing is left behind once the reconciling operation ran.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use gkvm_testkit::{qemus_in, require, Bridge, KillRunDir, Need, ScratchDir};
use hv_kvm::{Config, KvmHypervisor, RunDir};

/// One node: a run dir, the QEMU to use, and a guard killing its QEMUs.
struct Node {
    run: PathBuf,
    qemu: PathBuf,
    _kill: KillRunDir,
    dir: ScratchDir,
}

impl Node {
    fn new(tag: &str, qemu: &Path) -> Node {
        let dir = ScratchDir::new(tag);
        let run = dir.path().join("run");
        Node {
            _kill: KillRunDir(run.clone()),
            run,
            qemu: qemu.to_owned(),
            dir,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_in(&self.run, args)
    }

    /// [`Node::cmd`] on another run dir of this node's. As cluster
    /// software calls it: `--idempotent` (the next operation after a kill
    /// reconciles, and a kill early enough leaves no trace of the name).
    fn cmd_in(&self, run: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gkvm"));
        c.arg("--idempotent")
            .arg("--run-dir")
            .arg(run)
            .arg("--kvm-path")
            .arg(&self.qemu)
            .args(args)
            .env_remove("GKVM_MIGRATION_KEY")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run gkvm")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "gkvm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `info --json`'s state, or `None` when the instance does not run.
    fn state(&self, name: &str) -> Option<String> {
        let out = self.run(&["--json", "info", name]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info --json");
        v[0]["state"].as_str().map(str::to_owned)
    }

    fn qemus(&self) -> Vec<i32> {
        qemus_in(&self.run)
    }

    /// Files kept about instances (the capability cache aside).
    fn files(&self) -> Vec<PathBuf> {
        KvmHypervisor::new(Config::new(RunDir::new(&self.run))).state_files()
    }

    fn assert_empty(&self, why: &str) {
        assert_eq!(self.qemus(), Vec::<i32>::new(), "{why}: QEMU left");
        assert_eq!(self.files(), Vec::<PathBuf>::new(), "{why}: files left");
    }

    /// Waits until `name`'s state is `want` (or the time is up).
    fn wait_state(&self, name: &str, want: Option<&str>, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.state(name);
            if s.as_deref() == want || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn accel() -> String {
    gkvm_testkit::guestless_kvm_flag().to_owned()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id().cast_signed(), sig) };
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that no TAP is left on the bridge. The kernel unregisters a
/// TAP once the last process holding it has exited, which can trail that
/// exit by a moment: give it up to three seconds.
fn assert_no_tap(bridge: &Bridge, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !brif(bridge).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(brif(bridge), Vec::<String>::new(), "{why}: TAP left");
}

/// Interfaces attached to a bridge.
fn brif(bridge: &Bridge) -> Vec<String> {
    std::fs::read_dir(format!("/sys/class/net/{}/brif", bridge.0))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A port nobody else uses in this run.
fn port(offset: u16) -> u16 {
    30000 + (std::process::id() % 15000) as u16 + offset
}

#[test]
fn interrupted_start_rolls_back_or_is_reconciled() {
    let Some(env) = require("faults_interrupted_start", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-start", &env.qemu);
    let br = Bridge::new("gkvmflt0");
    let nic = format!("bridge={}", br.0);
    let accel = accel();
    let start: Vec<&str> = vec![
        "start", "fs1", "--memory", "64", "--nic", &nic, "-H", &accel, "--paused",
    ];
    // Warm the capability cache so the delays land inside the start proper.
    node.ok(&["caps"]);
    let mut reconciled_half_started = 0;
    for (sig, code) in [
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
        (libc::SIGKILL, 0),
    ] {
        for (round, ms) in [3u64, 15, 30, 45, 60, 80, 120, 200].into_iter().enumerate() {
            let why = format!("signal {sig} after {ms} ms");
            let child = node
                .cmd(&start)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(ms));
            signal(&child, sig);
            let out = child.wait_with_output().unwrap();
            // A QEMU that daemonizes is two processes for a moment (the
            // parent waits for the child's initialization, then exits):
            // that is one instance, and settles at once.
            let deadline = Instant::now() + Duration::from_secs(5);
            while node.qemus().len() > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(node.qemus().len() <= 1, "{why}: two QEMUs");
            match out.status.code() {
                // Done before the signal came: one instance, running.
                Some(0) => assert_eq!(node.qemus().len(), 1, "{why}"),
                // Rolled back: nothing at all.
                Some(c) if c == code => {
                    assert!(
                        stderr(&out).contains("rolled back"),
                        "{why}: {}",
                        stderr(&out)
                    );
                    node.assert_empty(&why);
                    assert_no_tap(&br, &why);
                    continue;
                }
                Some(c) => panic!("{why}: exit {c}: {}", stderr(&out)),
                // Killed (SIGKILL, or a signal before the handlers were
                // set): the next operation reconciles.
                None => {
                    let had = node.qemus().len();
                    let op = if round % 2 == 0 { "start" } else { "cleanup" };
                    let again = if op == "start" {
                        node.run(&start)
                    } else {
                        node.run(&["cleanup", "fs1"])
                    };
                    if !again.status.success() {
                        assert!(
                            stderr(&again).contains("already running"),
                            "{why}: {op}: {}",
                            stderr(&again)
                        );
                    } else if had == 1 && op == "cleanup" {
                        reconciled_half_started += 1;
                        node.assert_empty(&why);
                        assert_no_tap(&br, &why);
                        continue;
                    } else if had == 1 {
                        reconciled_half_started += 1;
                    }
                    if op == "cleanup" && again.status.success() {
                        node.assert_empty(&why);
                        continue;
                    }
                    assert_eq!(node.qemus().len(), 1, "{why}: after {op}");
                    assert_eq!(brif(&br).len(), 1, "{why}: after {op}");
                }
            }
            node.ok(&["stop", "fs1", "--force"]);
            node.assert_empty(&why);
            assert_no_tap(&br, &why);
        }
    }
    eprintln!("half-started instances reconciled: {reconciled_half_started}");
}

#[test]
fn lost_or_garbled_pid_file_never_makes_a_second_copy() {
    let Some(env) = require("faults_pid_file", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-pid", &env.qemu);
    let accel = accel();
    let start = ["start", "pf1", "--memory", "64", "-H", &accel, "--paused"];
    let pid_file = node.run.join("pid/pf1");
    for tamper in ["remove", "garble", "point at init", "point at gkvm"] {
        node.ok(&start);
        let qemu = node.qemus();
        assert_eq!(qemu.len(), 1);
        match tamper {
            "remove" => std::fs::remove_file(&pid_file).unwrap(),
            "garble" => std::fs::write(&pid_file, "\u{1}garbage\n").unwrap(),
            "point at init" => std::fs::write(&pid_file, "1\n").unwrap(),
            _ => std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap(),
        }
        // Still listed and inspected, with the real pid.
        let list = node.ok(&["--json", "list"]);
        assert!(list.contains("\"pf1\""), "{tamper}: {list}");
        assert_eq!(node.state("pf1").as_deref(), Some("paused"), "{tamper}");
        // No second copy.
        let again = node.run(&start);
        assert!(
            stderr(&again).contains("already running"),
            "{tamper}: {}",
            stderr(&again)
        );
        assert_eq!(node.qemus(), qemu, "{tamper}");
        // cleanup refuses; a forced stop kills the real QEMU.
        assert!(!node.run(&["cleanup", "pf1"]).status.success(), "{tamper}");
        assert!(node.run.join("ctrl/pf1.qmp").exists(), "{tamper}");
        let out = node.ok(&["stop", "pf1", "--force"]);
        assert!(out.contains("killed"), "{tamper}: {out}");
        node.assert_empty(tamper);
    }
    // Socket gone, process alive: the error says so instead of "not running".
    node.ok(&start);
    std::fs::remove_file(node.run.join("ctrl/pf1.qmp")).unwrap();
    let out = node.run(&["resume", "pf1"]);
    assert!(
        stderr(&out).contains("runs, but its socket is gone"),
        "{}",
        stderr(&out)
    );
    node.ok(&["stop", "pf1", "--force"]);
    node.assert_empty("socket removed");
}

/// A runtime record whose instance definition does not parse is an
/// error naming the file (it was rebuilt from the argv, silently losing
/// what only the definition has); the instance can still be stopped.
#[test]
fn a_tampered_runtime_record_is_an_error_not_a_guess() {
    let Some(env) = require("faults_runtime_record", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-rec", &env.qemu);
    let accel = accel();
    node.ok(&["start", "tr1", "--memory", "64", "-H", &accel, "--paused"]);
    let file = node.run.join("conf/tr1.runtime");
    let text = std::fs::read_to_string(&file).unwrap();
    let tampered = text.replacen(
        "\"memory\":64,\"name\":\"tr1\"",
        "\"memory\":\"lots\",\"name\":\"tr1\"",
        1,
    );
    assert_ne!(
        tampered, text,
        "the record has no spec to tamper with: {text}"
    );
    std::fs::write(&file, tampered).unwrap();
    let out = node.run(&["hotplug-supported", "tr1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("conf/tr1.runtime") && err.contains("spec"),
        "{err}"
    );
    let out = node.ok(&["stop", "tr1", "--force"]);
    assert!(out.contains("killed"), "{out}");
    node.assert_empty("tampered record");
}

/// The runtime record keeps the instance once, as its definition, and
/// every hot-plugged device in it (hot plug updated a second NIC list and
/// no disk list, which drifted apart from the definition).
#[test]
fn the_runtime_record_has_the_instance_once_with_hot_plugged_devices() {
    let Some(env) = require("faults_record_once", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-once", &env.qemu);
    let accel = accel();
    node.ok(&["start", "ro1", "--memory", "64", "-H", &accel, "--paused"]);
    let image = node.run.parent().unwrap().join("ro1-extra.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    node.ok(&["disk-add", "ro1", "--disk", image.to_str().unwrap()]);
    node.ok(&["nic-add", "ro1", "--nic", "ext=,mac=52:54:00:00:77:01"]);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.run.join("conf/ro1.runtime")).unwrap()).unwrap();
    for key in ["nics", "disks", "hvparams"] {
        assert!(
            record.get(key).is_none(),
            "a second copy of {key}: {record}"
        );
    }
    let spec = &record["payload"]["spec"];
    assert_eq!(spec["disks"][0]["path"], serde_json::json!(image), "{spec}");
    assert_eq!(spec["nics"][0]["mac"], "52:54:00:00:77:01", "{spec}");
    // And it reads back.
    let out = node.ok(&["--json", "info", "ro1"]);
    assert!(out.contains("\"ro1\""), "{out}");
    node.ok(&["stop", "ro1", "--force"]);
    node.assert_empty("record once");
}

/// `list` while instances start beside it warns of nothing: a QEMU found
/// in /proc before its start recorded the pid is an operation under way,
/// not a tampered pid file.
#[test]
fn list_during_concurrent_starts_is_quiet() {
    let Some(env) = require("faults_list_quiet", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-quiet", &env.qemu);
    let accel = accel();
    let names: Vec<String> = (0..4).map(|i| format!("lq{i}")).collect();
    let starts: Vec<Child> = names
        .iter()
        .map(|n| {
            node.cmd(&["start", n, "--memory", "32", "-H", &accel, "--paused"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut lists = 0;
    loop {
        let out = node.run(&["list"]);
        lists += 1;
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stderr(&out), "", "list {lists} warned");
        if names
            .iter()
            .all(|n| node.state(n).as_deref() == Some("paused"))
        {
            break;
        }
        assert!(lists < 2000, "the starts never finished");
    }
    for child in starts {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for n in &names {
        node.ok(&["stop", n, "--force"]);
    }
    node.assert_empty("the end");
}

#[test]
fn force_stop_preempts_a_graceful_stop() {
    let Some(env) = require("faults_force_stop", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-force", &env.qemu);
    let accel = accel();
    // No guest OS: the ACPI power button is never answered.
    node.ok(&["start", "ff1", "--memory", "64", "-H", &accel]);
    let graceful = node
        .cmd(&["stop", "ff1", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let out = node.ok(&["stop", "ff1", "--force"]);
    assert!(out.contains("killed"), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "force stop waited {:?} behind the graceful one",
        t.elapsed()
    );
    let g = graceful.wait_with_output().unwrap();
    assert!(g.status.code().is_some(), "graceful stop: {}", stderr(&g));
    // The guest never powered off: the graceful stop does not say it did.
    let said = String::from_utf8_lossy(&g.stdout);
    assert!(!said.contains("powered off"), "{said}");
    node.assert_empty("force during graceful");
}

#[test]
fn tampered_migration_info_is_refused() {
    let Some(env) = require("faults_migration_info", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let a = Node::new("gkvm-fault-info-a", &env.qemu);
    let b = Node::new("gkvm-fault-info-b", &env.qemu);
    let accel = accel();
    let disk = a.dir.path().join("ti1.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    a.ok(&[
        "start",
        "ti1",
        "--memory",
        "64",
        "--disk",
        disk.to_str().unwrap(),
        "-H",
        &accel,
    ]);
    let info = a.ok(&["migration-info", "ti1"]);
    let file = b.dir.path().join("ti1.mig");
    let listen = format!("127.0.0.1:{}", port(1));
    let accept = |text: &str, extra: &[&str]| {
        std::fs::write(&file, text).unwrap();
        let mut args = vec![
            "accept",
            file.to_str().unwrap(),
            "--listen",
            &listen,
            "--timeout",
            "5",
        ];
        args.extend_from_slice(extra);
        b.run(&args)
    };
    // A node without a migration key takes no unsealed file unless told.
    let out = accept(&info, &[]);
    assert_eq!(out.status.code(), Some(1));
    let said = stderr(&out);
    assert!(
        said.contains("ti1")
            && said.contains("no migration key")
            && said.contains("--trust-unsealed"),
        "{said}"
    );
    assert!(!said.contains("waiting for the migration"), "{said}");
    b.assert_empty("unsealed");
    let mut v: serde_json::Value = serde_json::from_str(&info).unwrap();
    for (key, value) in [
        ("kvm_extra", "-qmp tcp:0.0.0.0:4444,server=on,wait=off"),
        ("use_chroot", "true"),
        ("security_model", "user"),
        ("vnc_password_file", "/etc/shadow"),
    ] {
        let mut edited = v.clone();
        edited["hvparams"][key] = serde_json::Value::String(value.into());
        edited["payload"]["spec"]["hvparams"][key] = serde_json::Value::String(value.into());
        let out = accept(&edited.to_string(), &["--trust-unsealed"]);
        assert_eq!(out.status.code(), Some(1), "{key}");
        assert!(
            stderr(&out).contains(&format!("hvparam {key}")),
            "{key}: {}",
            stderr(&out)
        );
        b.assert_empty(key);
    }
    // The disks: a file that names a host file as the guest's disk does
    // not choose what QEMU opens when this node's definition lists its
    // own disks (`--current`): QEMU opens the node's path.
    let secret = b.dir.path().join("secret");
    std::fs::write(&secret, "not the guest's").unwrap();
    let mine = b.dir.path().join("ti1-on-b.img");
    std::fs::write(&mine, vec![0u8; 1 << 20]).unwrap();
    let mut edited = v.clone();
    let disks = &mut edited["payload"]["spec"]["disks"];
    assert_eq!(disks.as_array().map(Vec::len), Some(1), "{edited}");
    disks[0]["path"] = secret.to_str().unwrap().into();
    let current = b.dir.path().join("ti1.json");
    let write_current = |disks: serde_json::Value| {
        let mut def = v["payload"]["spec"].clone();
        def["disks"] = disks;
        std::fs::write(&current, def.to_string()).unwrap();
    };
    let cur = ["--trust-unsealed", "--current", current.to_str().unwrap()];
    for (disks, refusal) in [
        (serde_json::json!([]), "the file has 1 disks"),
        (serde_json::json!([{}]), "names the host path"),
    ] {
        write_current(disks.clone());
        let out = accept(&edited.to_string(), &cur);
        assert_eq!(out.status.code(), Some(1), "{disks}");
        let said = stderr(&out);
        assert!(
            said.contains("ti1") && said.contains(refusal),
            "{disks}: {said}"
        );
        b.assert_empty("disks refused");
    }
    write_current(serde_json::json!([{"path": mine.to_str().unwrap()}]));
    let mut no_wait = cur.to_vec();
    no_wait.push("--no-wait");
    let out = accept(&edited.to_string(), &no_wait);
    assert!(out.status.success(), "{}", stderr(&out));
    let pid = b.qemus();
    assert_eq!(pid.len(), 1, "one QEMU waits");
    let argv = std::fs::read(format!("/proc/{}/cmdline", pid[0])).unwrap();
    let argv = String::from_utf8_lossy(&argv);
    assert!(argv.contains(mine.to_str().unwrap()), "{argv}");
    assert!(!argv.contains(secret.to_str().unwrap()), "{argv}");
    b.ok(&["finalize-migration", "ti1", "--destination", "--failed"]);
    b.assert_empty("own disk");

    // Without a node override of the QEMU binary, the file's is compared too.
    let mut edited = v.clone();
    edited["payload"]["spec"]["hvparams"]["kvm_path"] = "/bin/sh".into();
    std::fs::write(&file, edited.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gkvm"))
        .arg("--run-dir")
        .arg(&b.run)
        .args(["accept", file.to_str().unwrap(), "--listen", &listen])
        .arg("--trust-unsealed")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("hvparam kvm_path"),
        "{}",
        stderr(&out)
    );
    b.assert_empty("kvm_path");

    // Sealed with a key both nodes share.
    let key = a.dir.path().join("migration.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = a.run(&[
        "--migration-key",
        key.to_str().unwrap(),
        "migration-info",
        "ti1",
    ]);
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A private key that belongs to somebody else (nobody): refused too.
    std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
    let out = a.run(&[
        "--migration-key",
        key.to_str().unwrap(),
        "migration-info",
        "ti1",
    ]);
    assert!(
        stderr(&out).contains("owned by uid 65534"),
        "{}",
        stderr(&out)
    );
    std::os::unix::fs::chown(&key, Some(0), None).unwrap();
    let k = ["--migration-key", key.to_str().unwrap()];
    let sealed = a.ok(&[k[0], k[1], "migration-info", "ti1"]);
    v = serde_json::from_str(&sealed).unwrap();
    assert!(v["hmac_sha256"].is_string(), "{sealed}");
    // An unsealed file on a keyed node.
    let out = accept(&info, &k);
    assert!(stderr(&out).contains("not sealed"), "{}", stderr(&out));
    // An edited sealed file.
    let edited = sealed.replace("\\\"memory\\\":64", "\\\"memory\\\":65");
    assert_ne!(edited, sealed);
    let out = accept(&edited, &k);
    let said = stderr(&out);
    // Named as the file claims (nothing vouches for it), not "(unknown)".
    assert!(
        said.contains("integrity check failed") && said.contains("ti1"),
        "{said}"
    );
    b.assert_empty("sealed");
    // The intact sealed file is accepted (and times out waiting here).
    let out = accept(&sealed, &k);
    assert!(
        stderr(&out).contains("incoming migration did not finish"),
        "{}",
        stderr(&out)
    );
    b.assert_empty("accepted, then timed out");
    a.ok(&["stop", "ti1", "--force"]);
}

#[test]
fn untrusted_run_dirs_and_planted_symlinks() {
    let Some(env) = require("faults_run_dir", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-fault-trust");
    let gkvm = |run: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gkvm"))
            .arg("--run-dir")
            .arg(run)
            .arg("--kvm-path")
            .arg(&env.qemu)
            .args(args)
            .output()
            .unwrap()
    };
    let accel = accel();
    // A shared sticky directory is refused and keeps its mode.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = gkvm(&shared, &["start", "rd1", "--memory", "64", "-H", &accel]);
    assert!(stderr(&out).contains("refusing to use"), "{}", stderr(&out));
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777);
    assert!(qemus_in(&shared).is_empty());
    // Owned by another user.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let out = gkvm(&foreign, &["start", "rd1", "--memory", "64", "-H", &accel]);
    assert!(
        stderr(&out).contains("owned by uid 65534"),
        "{}",
        stderr(&out)
    );
    let out = gkvm(&foreign, &["verify"]);
    assert!(!out.status.success());

    // Symlinks planted where gkvm writes: the targets are never touched.
    let run = dir.path().join("run");
    let _kill = KillRunDir(run.clone());
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::create_dir_all(run.join("caps")).unwrap();
    std::fs::create_dir_all(run.join("pid")).unwrap();
    for n in 0..8 {
        let _ = std::os::unix::fs::symlink(&victim, run.join(format!("caps/x.tmp.{n}")));
    }
    std::os::unix::fs::symlink(&victim, run.join("pid/rd1")).unwrap();
    let out = gkvm(&run, &["caps"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = gkvm(
        &run,
        &["start", "rd1", "--memory", "64", "-H", &accel, "--paused"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!std::fs::symlink_metadata(run.join("pid/rd1"))
        .unwrap()
        .is_symlink());
    let out = gkvm(&run, &["stop", "rd1", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // A symlink in place of the caps directory is refused, not followed.
    let caps = run.join("caps");
    std::fs::remove_dir_all(&caps).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &caps).unwrap();
    let _ = gkvm(&run, &["caps"]);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // A run dir that is a symlink: one rule for every command (refused,
    // naming it), a list included.
    let linked = dir.path().join("linked");
    std::os::unix::fs::symlink(&run, &linked).unwrap();
    for args in [
        &["list"][..],
        &["info", "rd1"],
        &["start", "rd1", "--memory", "64", "-H", &accel, "--paused"],
        &["stop", "rd1"],
    ] {
        let out = gkvm(&linked, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("linked is not a directory"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(qemus_in(&run).is_empty());

    // A user who may not read the run dir is told so, not "instance *".
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_gkvm"))
        .arg("--run-dir")
        .arg(&run)
        .arg("list")
        .output()
        .unwrap();
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("run directory {}", run.display()))
            && said.contains("run gkvm as root")
            && !said.contains("instance *"),
        "{said}"
    );
}

#[test]
fn closed_and_full_outputs() {
    let dir = ScratchDir::new("gkvm-fault-out");
    let gkvm = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gkvm"));
        c.arg("--run-dir").arg(dir.path().join("run")).args(args);
        c
    };
    // The reader went away before the first byte: quiet, success.
    for args in [
        vec!["completions", "bash"],
        vec!["completions", "zsh"],
        vec!["list"],
        vec!["--json", "list"],
        vec!["--help"],
    ] {
        let mut child = gkvm(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.code() == Some(0) || out.status.code() == Some(2),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
    // A full disk is an error that says what succeeded.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = gkvm(&["completions", "bash"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("succeeded, but writing its output failed"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn start_to_a_full_disk_says_the_instance_started() {
    let Some(env) = require("faults_full_output", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-full", &env.qemu);
    let accel = accel();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = node
        .cmd(&["start", "of1", "--memory", "64", "-H", &accel, "--paused"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("start of of1 succeeded, but writing its output failed"),
        "{err}"
    );
    assert_eq!(node.state("of1").as_deref(), Some("paused"));
    node.ok(&["stop", "of1", "--force"]);
    node.assert_empty("after stop");
}

/// Unmounts what a test mounted, when it ends or fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A tmpfs of `size` (mount's syntax) at `dir`, made here, unmounted when
/// the guard drops.
fn small_tmpfs(dir: &Path, size: &str) -> Unmount {
    std::fs::create_dir(dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(mounted.success());
    Unmount(dir.to_owned())
}

/// A start on a run dir that is (nearly) full fails saying why, whatever
/// step runs out of space (a runtime file, QEMU's pid file or log), and
/// leaves no QEMU behind.
#[test]
fn a_start_on_a_full_run_dir_says_why() {
    let Some(env) = require("faults_full_run_dir", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-fullrun", &env.qemu);
    let fs = node.dir.path().join("fs");
    let _unmount = small_tmpfs(&fs, "256k");
    let run = fs.join("run");
    let _kill = KillRunDir(run.clone());
    let cmd = |args: &[&str]| node.cmd_in(&run, args).output().unwrap();
    assert!(cmd(&["verify"]).status.code().is_some());
    let accel = accel();
    let fill = fs.join("fill");
    for free_pages in 0..6u64 {
        // All but `free_pages` of the file system's 64 pages (the run
        // dir's own files take the rest).
        let used = nix::sys::statvfs::statvfs(&fs).unwrap();
        let free = used.blocks_available() * used.fragment_size();
        let size = usize::try_from(free - free_pages * 4096).unwrap();
        std::fs::write(&fill, vec![0u8; size]).unwrap();
        let out = cmd(&["start", "fr1", "--memory", "32", "-H", &accel, "--paused"]);
        std::fs::remove_file(&fill).unwrap();
        let said = stderr(&out);
        if out.status.success() {
            cmd(&["stop", "fr1", "--force"]);
            continue;
        }
        assert!(
            said.contains("No space left") || said.contains("is full"),
            "{free_pages} pages free: {said}"
        );
        assert!(!said.contains(":  (log"), "{said}");
        assert!(qemus_in(&run).is_empty(), "{free_pages}: {said}");
    }
}

/// Growing an image file past the free space of its file system works
/// (it grows sparse, as Ganeti's file storage does) and says that the
/// guest will run out of space.
#[test]
fn a_disk_grown_past_free_space_is_warned_of() {
    let Some(env) = require("faults_grow_space", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-grow", &env.qemu);
    let fs = node.dir.path().join("fs");
    let _unmount = small_tmpfs(&fs, "1m");
    let image = fs.join("g1.img");
    std::fs::write(&image, vec![0u8; 512 << 10]).unwrap();
    let accel = accel();
    node.ok(&[
        "start",
        "g1",
        "--memory",
        "32",
        "-H",
        &accel,
        "--paused",
        "--disk",
        image.to_str().unwrap(),
    ]);
    let out = node.run(&["disk-grow", "g1", "0", "768K"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("no space left"), "{}", stderr(&out));
    let out = node.run(&["disk-grow", "g1", "0", "64M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("no space left"), "{}", stderr(&out));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 << 20);
    node.ok(&["stop", "g1", "--force"]);
    node.assert_empty("grown");
}

#[test]
fn inputs_out_of_bounds_are_clear_errors() {
    let Some(env) = require("faults_bounds", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-bounds", &env.qemu);
    let accel = accel();
    let one_line = |out: &Output, needle: &str| {
        let err = stderr(out);
        assert_eq!(out.status.code(), Some(1), "{needle}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    one_line(
        &node.run(&["start", "--file", "/dev/zero"]),
        "not a regular file",
    );
    one_line(
        &node.run(&["start", "b1", "--memory", "0", "-H", &accel]),
        "memory",
    );
    // Refused before anything was made: no rollback warning above the error.
    one_line(
        &node.run(&[
            "start",
            "b1",
            "--memory",
            "64",
            "-H",
            &accel,
            "--disk",
            "/nonexistent/d.img",
        ]),
        "/nonexistent/d.img",
    );
    one_line(
        &node.run(&[
            "start",
            "b1",
            "--memory",
            "64",
            "-H",
            &accel,
            "--nic",
            "bridge=gkvmnobr77",
        ]),
        "gkvmnobr77",
    );
    let nics: Vec<String> = (0..9).map(|_| "--nic=bridge=br0".to_owned()).collect();
    let mut args = vec!["start", "b1", "--memory", "64"];
    args.extend(nics.iter().map(String::as_str));
    one_line(&node.run(&args), "at most 8");
    one_line(
        &node.run(&["start", "b1", "--nic", "bridge=br0,mac=01:00:5e:00:00:01"]),
        "multicast",
    );
    one_line(&node.run(&["start", "b1", "--nic", "bridge="]), "bridge");
    let long = "n".repeat(100);
    one_line(&node.run(&["start", &long, "-H", &accel]), "too long");
    one_line(
        &node.run(&["start", "bad\nname\u{1b}[31m"]),
        "bad\\nname\\u{1b}",
    );
    for listen in ["127.0.0.1:0", "127.0.0.1:x"] {
        let out = node.run(&["accept", "/dev/null", "--listen", listen]);
        assert_eq!(out.status.code(), Some(2), "{listen}: {}", stderr(&out));
    }
    let out = node.run(&["migrate", "b1", "--to", "10.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Nothing was created by refused input.
    assert_eq!(node.files(), Vec::<PathBuf>::new());

    node.ok(&["start", "b1", "--memory", "64", "-H", &accel, "--paused"]);
    for mib in ["17592186044417", "65", "0"] {
        let out = node.run(&["balloon", "b1", mib]);
        one_line(&out, "not between 1 MiB and the instance's memory (64 MiB)");
    }
    node.ok(&["stop", "b1", "--force"]);
    node.assert_empty("bounds");
}

/// Two nodes on this host and a guest-less instance on the first.
fn migration_pair(tag: &str, qemu: &Path) -> (Node, Node) {
    let a = Node::new(&format!("{tag}-a"), qemu);
    let b = Node::new(&format!("{tag}-b"), qemu);
    (a, b)
}

/// `gkvm accept` on `b` for `name`, its info taken from `a` now (both
/// nodes are this machine: the unsealed file is trusted), stderr piped.
fn accept_cmd(a: &Node, b: &Node, name: &str, listen: &str) -> Command {
    let info = a.ok(&["migration-info", name]);
    let file = b.dir.path().join(format!("{name}.mig"));
    std::fs::write(&file, info).unwrap();
    let mut c = b.cmd(&[
        "accept",
        file.to_str().unwrap(),
        "--listen",
        listen,
        "--timeout",
        "60",
        "--trust-unsealed",
    ]);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Starts `gkvm accept` on `b` for `name` (info from `a`) and waits until
/// its QEMU listens.
fn spawn_accept(a: &Node, b: &Node, name: &str, listen: &str) -> Child {
    let child = accept_cmd(a, b, name, listen).spawn().unwrap();
    let state = b.wait_state(name, Some("incoming"), Duration::from_secs(20));
    assert_eq!(
        state.as_deref(),
        Some("incoming"),
        "destination never listened"
    );
    child
}

/// Running copies of `name`, source `a` and destination `b`. The
/// destination is asked first: QEMU stops the source before the
/// destination runs, so a destination seen running and a source seen
/// running after it is a real second copy, never a race of the two looks.
fn running_copies(a: &Node, b: &Node, name: &str) -> usize {
    let dst = b.state(name);
    let src = a.state(name);
    [src, dst]
        .iter()
        .filter(|s| s.as_deref() == Some("running"))
        .count()
}

#[test]
fn killed_migrate_never_leaves_two_running_copies() {
    let Some(env) = require("faults_killed_migrate", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let (a, b) = migration_pair("gkvm-fault-mig", &env.qemu);
    let accel = accel();
    let mut handed_over = 0;
    for (i, ms) in [0u64, 5, 15, 30, 60, 120].into_iter().enumerate() {
        let why = format!("migrate SIGKILLed after {ms} ms");
        a.ok(&["start", "km1", "--memory", "64", "-H", &accel]);
        assert_eq!(a.state("km1").as_deref(), Some("running"));
        let listen = format!("127.0.0.1:{}", port(10 + u16::try_from(i).unwrap()));
        let accept = spawn_accept(&a, &b, "km1", &listen);
        let migrate = a
            .cmd(&["migrate", "km1", "--to", &listen])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        signal(&migrate, libc::SIGKILL);
        let _ = { migrate }.wait();
        // QEMU may finish the migration on its own: let it settle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            assert!(
                running_copies(&a, &b, "km1") <= 1,
                "{why}: two running copies"
            );
            let src = a.state("km1");
            if src.as_deref() == Some("migrated") || b.state("km1").as_deref() == Some("running") {
                break;
            }
            if src.as_deref() == Some("running") && b.state("km1").as_deref() == Some("incoming") {
                // Killed before QEMU was asked to migrate.
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            running_copies(&a, &b, "km1") <= 1,
            "{why}: two running copies"
        );
        match a.state("km1").as_deref() {
            Some("migrated") => {
                handed_over += 1;
                // The source never runs again: not resumed, not restarted,
                // shown as migrated until cleaned up.
                let out = a.run(&["resume", "km1"]);
                assert!(
                    stderr(&out).contains("migrated away"),
                    "{why}: {}",
                    stderr(&out)
                );
                let out = a.run(&["start", "km1", "--memory", "64", "-H", &accel]);
                assert!(
                    stderr(&out).contains("migrated away"),
                    "{why}: {}",
                    stderr(&out)
                );
                assert!(a.ok(&["list"]).contains("migrated"), "{why}");
                a.ok(&["cleanup", "km1"]);
                a.assert_empty(&why);
                let out = accept.wait_with_output().unwrap();
                assert!(out.status.success(), "{why}: accept: {}", stderr(&out));
                assert_eq!(b.state("km1").as_deref(), Some("running"), "{why}");
                b.ok(&["stop", "km1", "--force"]);
            }
            Some("running") => {
                // Nothing was handed over: the destination still waits.
                signal(&accept, libc::SIGINT);
                let out = accept.wait_with_output().unwrap();
                assert_eq!(out.status.code(), Some(130), "{why}: {}", stderr(&out));
                a.ok(&["stop", "km1", "--force"]);
            }
            None => {
                // The migration was done and the source's QEMU stopped
                // before the kill (its files may remain if the kill came
                // in the middle of finalizing: the next operation clears
                // them).
                handed_over += 1;
                assert_eq!(a.qemus(), Vec::<i32>::new(), "{why}");
                a.ok(&["cleanup", "km1"]);
                let out = accept.wait_with_output().unwrap();
                assert!(out.status.success(), "{why}: accept: {}", stderr(&out));
                assert_eq!(b.state("km1").as_deref(), Some("running"), "{why}");
                b.ok(&["stop", "km1", "--force"]);
            }
            other => panic!("{why}: source in state {other:?}"),
        }
        a.assert_empty(&why);
        b.assert_empty(&why);
    }
    eprintln!("handed over before the kill landed: {handed_over} of 6");
}

#[test]
fn interrupted_accept_leaves_nothing_or_is_cleaned_up() {
    let Some(env) = require("faults_interrupted_accept", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let (a, b) = migration_pair("gkvm-fault-acc", &env.qemu);
    let accel = accel();
    a.ok(&["start", "ia1", "--memory", "64", "-H", &accel]);
    let listen = format!("127.0.0.1:{}", port(30));
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let accept = spawn_accept(&a, &b, "ia1", &listen);
        signal(&accept, sig);
        let out = accept.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        b.assert_empty("interrupted accept");
    }
    // SIGKILL: the waiting QEMU stays, shown as incoming, never resumable;
    // cleanup removes it and frees the port.
    let accept = spawn_accept(&a, &b, "ia1", &listen);
    signal(&accept, libc::SIGKILL);
    let _ = { accept }.wait();
    assert_eq!(b.state("ia1").as_deref(), Some("incoming"));
    let out = b.run(&["resume", "ia1"]);
    assert!(stderr(&out).contains("has not arrived"), "{}", stderr(&out));
    b.ok(&["cleanup", "ia1"]);
    b.assert_empty("cleanup after killed accept");
    // The port is free again: a real migration goes through.
    let accept = spawn_accept(&a, &b, "ia1", &listen);
    a.ok(&["migrate", "ia1", "--to", &listen]);
    let out = accept.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    a.assert_empty("migrated");
    assert_eq!(b.state("ia1").as_deref(), Some("running"));
    b.ok(&["stop", "ia1", "--force"]);
    b.assert_empty("end");
}

#[test]
fn interrupted_slow_migrations_keep_exactly_one_copy() {
    let Some(env) = require("faults_slow_migration", &[Need::Root, Need::Guest]) else {
        return;
    };
    let guest = env.guest.clone().unwrap();
    let (a, b) = migration_pair("gkvm-fault-slow", &env.qemu);
    let mut hv: Vec<String> = guest
        .hvparams()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // About two seconds for the loaded kernel's pages.
    hv.push("migration_bandwidth=16".into());
    let mut start = vec!["start", "sm1", "--memory", "128"];
    for h in &hv {
        start.push("-H");
        start.push(h);
    }
    let listen = format!("127.0.0.1:{}", port(40));
    // SIGINT / SIGTERM of the source's migrate in flight, live and not:
    // cancelled, the source runs again, the destination is gone.
    for (sig, code, extra) in [
        (libc::SIGINT, 130, None),
        (libc::SIGTERM, 143, Some("--non-live")),
    ] {
        a.ok(&start);
        let accept = spawn_accept(&a, &b, "sm1", &listen);
        let mut args = vec!["migrate", "sm1", "--to", &listen];
        args.extend(extra);
        let migrate = a
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            a.state("sm1").as_deref().map(|s| s != "migrated"),
            Some(true)
        );
        signal(&migrate, sig);
        let out = migrate.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert_eq!(
            a.wait_state("sm1", Some("running"), Duration::from_secs(5))
                .as_deref(),
            Some("running"),
            "{extra:?}"
        );
        let out = accept.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        b.assert_empty("destination of a cancelled migration");
        a.ok(&["stop", "sm1", "--force"]);
        a.assert_empty("cancelled");
    }
    // SIGKILL of accept mid-transfer: the migration still lands, the guest
    // runs on the destination by itself, the source finalizes itself.
    a.ok(&start);
    let accept = spawn_accept(&a, &b, "sm1", &listen);
    let migrate = a
        .cmd(&["migrate", "sm1", "--to", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    signal(&accept, libc::SIGKILL);
    let _ = { accept }.wait();
    let out = migrate.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    a.assert_empty("source after the hand-over");
    assert_eq!(
        b.wait_state("sm1", Some("running"), Duration::from_secs(5))
            .as_deref(),
        Some("running")
    );
    b.ok(&["stop", "sm1", "--force"]);
    b.assert_empty("end");
}

/// `save` killed (SIGKILL) or interrupted (SIGINT) at any moment: either
/// the file is whole and the guest is in it alone (no QEMU runs it here
/// once the next operation is done), or there is no file at all and the
/// guest runs on (the next operation resumes it). Never both, never
/// neither, never a half-made file.
#[test]
fn interrupted_saves_keep_the_guest_in_exactly_one_place() {
    let Some(env) = require("faults_save", &[Need::Root, Need::Guest]) else {
        return;
    };
    let guest = env.guest.clone().unwrap();
    let node = Node::new("gkvm-fault-save", &env.qemu);
    let hv: Vec<String> = guest
        .hvparams()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut start = vec!["start", "fv1", "--memory", "128"];
    for h in &hv {
        start.push("-H");
        start.push(h);
    }
    node.ok(&start);
    let file = node.dir.path().join("fv1.save");
    let file_s = file.to_str().unwrap();
    let (mut saved, mut resumed) = (0, 0);
    for (round, (sig, ms)) in [
        (libc::SIGKILL, 5u64),
        (libc::SIGKILL, 30),
        (libc::SIGKILL, 60),
        (libc::SIGKILL, 90),
        (libc::SIGKILL, 130),
        (libc::SIGKILL, 200),
        (libc::SIGINT, 40),
        (libc::SIGINT, 90),
    ]
    .into_iter()
    .enumerate()
    {
        let why = format!("signal {sig} after {ms} ms");
        let child = node
            .cmd(&["save", "fv1", file_s])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        if file.exists() {
            // The guest is in the file: its QEMU here is gone, or goes
            // with the next operation.
            saved += 1;
            let _ = node.run(&["stop", "fv1", "--force"]);
            assert!(node.qemus().is_empty(), "{why}: saved, yet a QEMU runs");
            node.ok(&["restore", file_s]);
            std::fs::remove_file(&file).unwrap();
        } else {
            // No file: the guest runs on (resumed by the next operation
            // when the save's gkvm was killed).
            resumed += 1;
            if round % 2 == 0 {
                let again = node.run(&["resume", "fv1"]);
                assert!(
                    again.status.success(),
                    "{why}: {}; the save said {}",
                    stderr(&again),
                    stderr(&out)
                );
            } else {
                // A start settles it too, then finds the guest running.
                let again = node.run(&start);
                assert!(
                    stderr(&again).contains("already running"),
                    "{why}: {}; the save said {}",
                    stderr(&again),
                    stderr(&out)
                );
            }
        }
        assert_eq!(node.qemus().len(), 1, "{why}");
        assert_eq!(node.state("fv1").as_deref(), Some("running"), "{why}");
        let left: Vec<_> = std::fs::read_dir(node.dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("save"))
            .collect();
        assert!(left.is_empty(), "{why}: {left:?}");
    }
    eprintln!("interrupted saves: {saved} completed first, {resumed} left the guest running");
    node.ok(&["stop", "fv1", "--force"]);
    node.assert_empty("end");
}

#[test]
fn verify_reports_a_read_only_run_dir() {
    let Some(env) = require("faults_verify_read_only", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-fault-ro");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let sh = |cmd: &str| {
        Command::new("sh")
            .args(["-c", cmd])
            .status()
            .unwrap()
            .success()
    };
    assert!(sh(&format!(
        "mount -t tmpfs -o size=1m,mode=0700 gkvm-ro {}",
        mnt.display()
    )));
    let node = Node {
        run: mnt.join("run"),
        qemu: env.qemu.clone(),
        _kill: KillRunDir(mnt.join("run")),
        dir: ScratchDir::new("gkvm-fault-ro-scratch"),
    };
    let ok = node.run(&["verify"]);
    let remounted = sh(&format!("mount -o remount,ro {}", mnt.display()));
    let ro = node.run(&["verify"]);
    let _ = sh(&format!("umount {}", mnt.display()));
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(remounted);
    assert_eq!(ro.status.code(), Some(1));
    let out = String::from_utf8_lossy(&ro.stdout);
    assert!(out.contains("run directory is not writable"), "{out}");
}

/// The device ids QEMU holds (`qom-list /machine/peripheral`), asked on
/// the instance's QMP socket with a bare exchange.
fn qemu_devices(node: &Node, name: &str) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let sock = node.run.join("ctrl").join(format!("{name}.qmp"));
    let s = std::os::unix::net::UnixStream::connect(&sock).expect("QMP socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"qom-list\",\"arguments\":{\"path\":\"/machine/peripheral\"}}\n").unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("QMP reply");
        if let Some(list) = v["return"].as_array() {
            if list.is_empty() {
                continue;
            }
            let mut ids: Vec<String> = list
                .iter()
                .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .filter(|n| n.starts_with("nic"))
                .collect();
            ids.sort();
            return ids;
        }
    }
}

/// The NIC device ids the runtime record has, and its NIC files' TAPs.
fn recorded_nics(node: &Node, name: &str) -> (Vec<String>, Vec<String>) {
    let record = std::fs::read(node.run.join("conf").join(format!("{name}.runtime"))).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let mut ids: Vec<String> = v["payload"]["spec"]["nics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["address"]["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    let mut taps: Vec<String> = (0..)
        .map_while(|i| {
            std::fs::read_to_string(node.run.join("nic").join(name).join(i.to_string())).ok()
        })
        .map(|t| t.trim().to_owned())
        .collect();
    taps.sort();
    (ids, taps)
}

/// After a killed hot plug and the operation that settles it: the record
/// has exactly the NICs QEMU has, each TAP recorded is on the bridge and
/// nothing else is, and the journal is gone.
fn assert_settled(node: &Node, name: &str, br: &Bridge, why: &str) {
    let (ids, taps) = recorded_nics(node, name);
    assert_eq!(ids, qemu_devices(node, name), "{why}: record vs QEMU");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut on_bridge = brif(br);
    while on_bridge.len() > taps.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        on_bridge = brif(br);
    }
    on_bridge.sort();
    assert_eq!(on_bridge, taps, "{why}: TAPs on the bridge vs recorded");
    let journal = node.run.join("conf").join(format!("{name}.hotplug"));
    assert!(!journal.exists(), "{why}: journal left");
}

#[test]
fn killed_hot_plugs_are_settled_by_the_next_operation() {
    let Some(env) = require("faults_killed_hotplug", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new("gkvm-fault-hp", &env.qemu);
    let br = Bridge::new("gkvmflh0");
    let accel = accel();
    // NIC scripts that can be held (a file says so) and that log teardowns.
    let dir = node.dir.path();
    let (hold, inside, downs) = (dir.join("hold"), dir.join("inside"), dir.join("downs"));
    let up = dir.join("ifup");
    std::fs::write(
        &up,
        format!(
            "#!/bin/sh\nif [ -e {hold} ]; then touch {inside}; sleep 30; fi\n\
             ip link set \"$INTERFACE\" up && ip link set \"$INTERFACE\" master \"$LINK\"\n",
            hold = hold.display(),
            inside = inside.display()
        ),
    )
    .unwrap();
    let down = dir.join("ifdown");
    std::fs::write(
        &down,
        format!("#!/bin/sh\necho \"$INTERFACE\" >> {}\n", downs.display()),
    )
    .unwrap();
    for s in [&up, &down] {
        std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "nic_up_script = {:?}\nnic_down_script = {:?}\n",
            up.to_str().unwrap(),
            down.to_str().unwrap()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config.to_str().unwrap().to_owned();
    let nic = format!("bridge={}", br.0);
    let gkvm = |args: &[&str]| {
        let mut all = vec!["--node-config", cfg.as_str()];
        all.extend_from_slice(args);
        node.cmd(&all)
    };
    let ok = |args: &[&str]| {
        let out = gkvm(args).output().unwrap();
        assert!(out.status.success(), "gkvm {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Runs gkvm ARGS with its NIC script held, and SIGKILLs it there.
    let kill_in_script = |args: &[&str]| {
        std::fs::write(&hold, "").unwrap();
        let _ = std::fs::remove_file(&inside);
        let child = gkvm(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !inside.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(inside.exists(), "the NIC script never ran");
        signal(&child, libc::SIGKILL);
        let _ = child.wait_with_output();
        std::fs::remove_file(&hold).unwrap();
    };
    let start = ["start", "kh1", "--memory", "64", "-H", &accel, "--paused"];
    ok(&start);
    node.ok(&["caps"]);

    // Killed while its NIC script runs: QEMU was never touched; the next
    // hot plug undoes it (down script for that TAP) and does its own.
    kill_in_script(&["nic-add", "kh1", "--nic", &nic]);
    let journal = node.run.join("conf/kh1.hotplug");
    let pending = std::fs::read_to_string(&journal).expect("a journal left by the killed hot plug");
    assert!(pending.contains("add-nic"), "{pending}");
    // Migration info is refused by the facade while unsettled, and the
    // CLI's (through Request) settles first.
    let hv = KvmHypervisor::new(Config::new(RunDir::new(&node.run)));
    let e = hv.migration_info("kh1").unwrap_err().to_string();
    assert!(e.contains("not settled"), "{e}");
    ok(&["nic-add", "kh1", "--nic", &nic]);
    let downs_log = std::fs::read_to_string(&downs).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&pending).unwrap();
    let killed_tap = v[0]["tap"].as_str().unwrap();
    assert!(
        downs_log.contains(killed_tap),
        "down script not run for {killed_tap}: {downs_log}"
    );
    assert_settled(&node, "kh1", &br, "killed in the NIC script");
    assert_eq!(recorded_nics(&node, "kh1").0.len(), 1);

    // Killed at any moment of a hot plug: the next operation (a hot plug,
    // migration info, stop) leaves the record equal to QEMU's devices.
    let mut outcomes = std::collections::BTreeMap::<&str, u32>::new();
    let delays = (1..=24u64).map(|i| i * 700).chain([20000, 40000]);
    for (round, us) in delays.enumerate() {
        let why = format!("nic-add SIGKILLed after {us} µs");
        if recorded_nics(&node, "kh1").0.len() >= 6 {
            ok(&["stop", "kh1", "--force"]);
            node.assert_empty(&why);
            assert_no_tap(&br, &why);
            ok(&start);
        }
        let child = gkvm(&["nic-add", "kh1", "--nic", &nic])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(us));
        signal(&child, libc::SIGKILL);
        let status = child.wait_with_output().unwrap().status;
        let left = journal.exists();
        let ahead = left && qemu_devices(&node, "kh1") != recorded_nics(&node, "kh1").0;
        *outcomes
            .entry(match (status.code(), left, ahead) {
                (Some(0), _, _) => "finished",
                (_, true, true) => "killed with the NIC in QEMU, not recorded",
                (_, true, false) => "killed mid-way, QEMU as recorded",
                (_, false, _) => "killed before starting",
            })
            .or_default() += 1;
        match round % 3 {
            0 => {
                ok(&["nic-add", "kh1", "--nic", &nic]);
            }
            1 => {
                ok(&["migration-info", "kh1"]);
            }
            _ => {
                ok(&["stop", "kh1", "--force"]);
                node.assert_empty(&why);
                assert_no_tap(&br, &why);
                ok(&start);
                continue;
            }
        }
        assert_settled(&node, "kh1", &br, &why);
    }
    eprintln!("killed nic-add outcomes: {outcomes:?}");

    // Two hot plugs at once: the instance's lock serializes them; both
    // NICs land, at different slots.
    ok(&["stop", "kh1", "--force"]);
    ok(&start);
    let racers: Vec<Child> = (0..2)
        .map(|_| {
            gkvm(&["--json", "nic-add", "kh1", "--nic", &nic])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut slots = Vec::new();
    for r in racers {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success(), "racing nic-add: {}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        slots.push(v["pci_slot"].as_u64());
    }
    assert_ne!(slots[0], slots[1], "{slots:?}");
    assert_settled(&node, "kh1", &br, "racing hot plugs");
    assert_eq!(recorded_nics(&node, "kh1").0.len(), 2);

    // Killed while moving a NIC to another bridge (its up script held):
    // the next operation puts the recorded settings back.
    let br2 = Bridge::new("gkvmflh1");
    let (ids, taps) = recorded_nics(&node, "kh1");
    let moved = format!("bridge={}", br2.0);
    kill_in_script(&["nic-modify", "kh1", &ids[0], "--nic", &moved]);
    assert!(std::fs::read_to_string(&journal)
        .unwrap()
        .contains("modify-nic"));
    ok(&["migration-info", "kh1"]);
    assert_settled(&node, "kh1", &br, "killed nic-modify");
    assert!(brif(&br2).is_empty(), "a TAP on the new bridge");
    assert_eq!(recorded_nics(&node, "kh1").1, taps);

    // A tampered journal: garbage, or a symlink planted in its place, is
    // an error naming it (nothing is guessed); the instance runs on.
    let secret = dir.join("secret");
    std::fs::write(&secret, "[]").unwrap();
    for tamper in ["garbage", "symlink"] {
        if tamper == "garbage" {
            std::fs::write(&journal, "{not json").unwrap();
        } else {
            std::os::unix::fs::symlink(&secret, &journal).unwrap();
        }
        let out = gkvm(&["nic-add", "kh1", "--nic", &nic]).output().unwrap();
        assert!(!out.status.success(), "{tamper}");
        assert!(
            stderr(&out).contains("kh1.hotplug"),
            "{tamper}: {}",
            stderr(&out)
        );
        assert_eq!(node.state("kh1").as_deref(), Some("paused"), "{tamper}");
        std::fs::remove_file(&journal).unwrap();
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "[]");
    // A journal that names a device QEMU holds as something it is not (a
    // disk as a NIC being added): checked against QEMU, the entry is
    // dropped; the disk stays a disk, no NIC is recorded for it.
    let image = dir.join("kh1-disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let added = ok(&[
        "--json",
        "disk-add",
        "kh1",
        "--disk",
        image.to_str().unwrap(),
    ]);
    let added: serde_json::Value = serde_json::from_str(&added).unwrap();
    let disk_id = added["device"].as_str().unwrap().to_owned();
    let record = std::fs::read(node.run.join("conf/kh1.runtime")).unwrap();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let mut fake = record["payload"]["spec"]["nics"][0].clone();
    fake["address"]["id"] = disk_id.clone().into();
    let entry = serde_json::json!([{"op": "add-nic", "nic": fake, "tap": "gkvmfake0", "fds": []}]);
    let before = recorded_nics(&node, "kh1");
    std::fs::write(&journal, entry.to_string()).unwrap();
    ok(&["migration-info", "kh1"]);
    assert!(!journal.exists(), "journal left");
    assert_eq!(recorded_nics(&node, "kh1"), before);
    let record = std::fs::read(node.run.join("conf/kh1.runtime")).unwrap();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let disks = record["payload"]["spec"]["disks"].to_string();
    assert!(disks.contains(&disk_id), "{disks}");
    ok(&["stop", "kh1", "--force"]);
    node.assert_empty("the end");
    assert_no_tap(&br, "the end");
}

/// The README's two-terminal flow, automated: `migrate` starts the moment
/// `accept` says it waits. The line comes once QEMU listens, so the
/// migration never finds the port closed (50 hops back and forth).
#[test]
fn accept_says_it_waits_only_once_it_listens() {
    let Some(env) = require("faults_accept_announce", &[Need::Root, Need::Qemu]) else {
        return;
    };
    use std::io::BufRead as _;
    let (a, b) = migration_pair("gkvm-fault-ann", &env.qemu);
    let accel = accel();
    a.ok(&["start", "ann1", "--memory", "32", "-H", &accel]);
    let (mut src, mut dst) = (&a, &b);
    for hop in 0..50u16 {
        let listen = format!("127.0.0.1:{}", port(60 + hop % 2));
        // Every fifth hop as a script reading JSON would: the first line
        // on stdout.
        let json = hop % 5 == 4;
        let mut cmd = accept_cmd(src, dst, "ann1", &listen);
        if json {
            cmd.arg("--json").stdout(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let said = if json {
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
            out.next().map(Result::unwrap).unwrap_or_default()
        } else {
            lines.next().map(Result::unwrap).unwrap_or_default()
        };
        let announced = if json {
            said.contains("\"listening\":true")
        } else {
            said.starts_with("waiting for the migration on")
        };
        if !announced {
            let rest: Vec<String> = lines.map(Result::unwrap).collect();
            panic!("hop {hop}: {said:?} {rest:?}");
        }
        let out = src.run(&["migrate", "ann1", "--to", &listen]);
        assert!(out.status.success(), "hop {hop}: {}", stderr(&out));
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        assert!(child.wait().unwrap().success(), "hop {hop}: {rest:?}");
        std::mem::swap(&mut src, &mut dst);
    }
    src.ok(&["stop", "ann1", "--force"]);
    a.assert_empty("announce");
    b.assert_empty("announce");
}

/// A gkvm SIGKILLed at any point of a start of an instance with a TPM
/// and a cgroup leaves no swtpm and no cgroup once the next operation (a
/// cleanup, or a start) and a stop have run: the helper is found by its
/// pid file and identified by its socket, and ended with the QEMU it was
/// for.
#[test]
fn a_killed_tpm_start_leaves_no_swtpm() {
    let Some(env) = require("faults_tpm_start", &[Need::Root, Need::Qemu]) else {
        return;
    };
    if !Path::new("/usr/bin/swtpm").exists() {
        gkvm_testkit::skip("faults_tpm_start", "no swtpm (Debian's swtpm)");
        return;
    }
    let node = Node::new("gkvm-fault-tpm", &env.qemu);
    // The TPM's state in this test's directory, not the host's.
    let conf = node.dir.path().join("node.toml");
    std::fs::write(
        &conf,
        format!(
            "state_dir = \"{}\"\nlog_dir = \"{}\"\n",
            node.dir.path().join("state").display(),
            node.dir.path().join("log").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        node.cmd(args)
            .env("GKVM_NODE_CONFIG", &conf)
            .output()
            .unwrap()
    };
    let accel = accel();
    // With a cgroup too: it must go with the rest.
    let start: Vec<&str> = vec![
        "start",
        "tp1",
        "--memory",
        "64",
        "-H",
        &accel,
        "-H",
        "tpm=tpm2",
        "-H",
        "cgroup_pids_max=300",
        "--paused",
    ];
    let cgroup = hv_kvm::RunDir::new(&node.run)
        .instance("tp1")
        .unwrap()
        .cgroup;
    run(&["caps"]);
    // Rounds that left a swtpm without its QEMU (the window this is about).
    let mut orphans = 0;
    for (round, ms) in [5u64, 10, 20, 30, 45, 70, 110, 200].into_iter().enumerate() {
        let why = format!("SIGKILL after {ms} ms");
        let child = node
            .cmd(&start)
            .env("GKVM_NODE_CONFIG", &conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        signal(&child, libc::SIGKILL);
        let _ = child.wait_with_output();
        if node.qemus().is_empty() && !gkvm_testkit::helpers_in(&node.run).is_empty() {
            orphans += 1;
        }
        let next = if round % 2 == 0 {
            run(&["cleanup", "tp1"])
        } else {
            run(&start)
        };
        assert!(
            next.status.success() || stderr(&next).contains("already running"),
            "{why}: {}",
            stderr(&next)
        );
        let _ = run(&["stop", "tp1", "--force"]);
        let _ = run(&["cleanup", "tp1"]);
        assert_eq!(
            gkvm_testkit::helpers_in(&node.run),
            Vec::<i32>::new(),
            "{why}: swtpm left"
        );
        assert!(!cgroup.exists(), "{why}: its cgroup left");
        node.assert_empty(&why);
    }
    eprintln!("swtpm orphaned by a killed start, then ended: {orphans}");
}
