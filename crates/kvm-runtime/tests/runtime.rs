//! kvm-runtime against the real file system and real processes.

use kvm_runtime::{Error, Liveness, Origin, RunDir, RuntimeRecord, UidPool};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir as ScratchDir;

fn scratch(prefix: &str) -> ScratchDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run_dir() -> (ScratchDir, RunDir) {
    let tmp = scratch("kvm-runtime");
    let run = RunDir::new(tmp.path().join("run"));
    run.ensure().unwrap();
    (tmp, run)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn record(tag: &str) -> RuntimeRecord {
    RuntimeRecord {
        argv: vec!["qemu-system-x86_64".into(), "-name".into(), tag.into()],
        nics: vec![json!({"mac": "52:54:00:00:00:01", "mode": "bridged", "link": "br0"})],
        hvparams: json!({"acpi": true, "tag": tag})
            .as_object()
            .unwrap()
            .clone(),
        disks: vec![json!({"path": "/dev/vg/disk0", "mode": "rw"})],
        payload: json!({"machine": "pc-i440fx-7.2"}),
        origin: Origin::Gkvm,
    }
}

#[test]
fn layout_is_private_and_ganeti_named() {
    let (_t, run) = run_dir();
    for d in [
        "",
        "pid",
        "uid",
        "ctrl",
        "conf",
        "nic",
        "keymap",
        "chroot",
        "chroot-quarantine",
    ] {
        assert_eq!(mode(&run.root().join(d)), 0o700, "{d}");
    }
    let p = run.instance("inst1.example.com").unwrap();
    assert!(p.qmp.ends_with("ctrl/inst1.example.com.qmp"));
    assert!(p.serial.ends_with("ctrl/inst1.example.com.serial"));
    assert!(p.runtime.ends_with("conf/inst1.example.com.runtime"));
    assert!(p.nic_file(2).ends_with("nic/inst1.example.com/2"));
    assert_eq!(
        RunDir::ganeti().root(),
        Path::new("/var/run/ganeti/kvm-hypervisor")
    );
    // An existing dir that only its owner can write is used as it is:
    // what gkvm did not create, it does not chmod.
    std::fs::set_permissions(
        run.root().join("conf"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    run.ensure().unwrap();
    assert_eq!(mode(&run.root().join("conf")), 0o755);
}

#[test]
fn untrusted_run_dirs_are_refused_and_never_chmodded() {
    let tmp = scratch("kvm-runtime-trust");
    // A shared sticky directory, as /tmp: refused, mode untouched.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let err = RunDir::new(&shared).ensure().unwrap_err();
    assert!(matches!(err, Error::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("1777"), "{err}");
    assert_eq!(
        std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777,
        0o1777
    );

    // A subdirectory writable by its group (not root's group).
    let (_t, run) = run_dir();
    std::fs::set_permissions(
        run.root().join("pid"),
        std::fs::Permissions::from_mode(0o770),
    )
    .unwrap();
    if is_root() {
        std::os::unix::fs::chown(run.root().join("pid"), None, Some(65534)).unwrap();
    }
    assert!(matches!(run.ensure(), Err(Error::Untrusted { .. })));
    assert_eq!(mode(&run.root().join("pid")), 0o770);
    if is_root() {
        // Ganeti's own run directories: 0775 root:root, trusted (only
        // root writes there).
        std::os::unix::fs::chown(run.root().join("pid"), None, Some(0)).unwrap();
        std::fs::set_permissions(
            run.root().join("pid"),
            std::fs::Permissions::from_mode(0o775),
        )
        .unwrap();
        run.ensure().unwrap();
    }

    // Owned by another user (root can chown; elsewhere this part is moot).
    if is_root() {
        let (_t, run) = run_dir();
        std::os::unix::fs::chown(run.root().join("ctrl"), Some(65534), None).unwrap();
        let err = run.ensure().unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        let p = run.instance("x1").unwrap();
        assert!(p.lock(Duration::from_millis(10)).is_err());
    }

    // A subdirectory replaced by a symlink to elsewhere.
    let (_t, run) = run_dir();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir(run.root().join("conf")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, run.root().join("conf")).unwrap();
    assert!(matches!(
        run.ensure(),
        Err(Error::UnexpectedFileType { .. })
    ));
}

#[test]
fn temp_names_are_unpredictable_and_cleanup_removes_leftovers() {
    let (_t, run) = run_dir();
    let p = run.instance("tmp1").unwrap();
    // A planted file at a guessable temp name does not stop the write and
    // is not written through.
    let target = run.root().join("victim");
    std::fs::write(&target, "precious").unwrap();
    for n in 0..4 {
        let guess = p
            .runtime
            .with_file_name(format!(".tmp1.runtime.tmp.{}.{n}", std::process::id()));
        std::os::unix::fs::symlink(&target, guess).unwrap();
    }
    p.write_runtime(&record("a")).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    // What a killed writer leaves is removed by cleanup.
    let left = p
        .runtime
        .with_file_name(".tmp1.runtime.tmp.0123456789abcdef");
    std::fs::write(&left, "half").unwrap();
    p.cleanup().unwrap();
    assert!(!left.exists());
    let conf: Vec<_> = std::fs::read_dir(run.root().join("conf"))
        .unwrap()
        .collect();
    assert!(conf.is_empty(), "{conf:?}");
}

#[test]
fn a_directory_planted_at_a_files_place_does_not_keep_the_rest() {
    let (_t, run) = run_dir();
    let p = run.instance("dir1").unwrap();
    p.write_runtime(&record("a")).unwrap();
    std::fs::write(&p.pid, "1\n").unwrap();
    std::fs::create_dir(&p.hotplug).unwrap();
    let err = p.clear_state().unwrap_err().to_string();
    assert!(err.contains("dir1.hotplug"), "{err}");
    // The pid and runtime files went anyway; the planted directory stays.
    assert!(!p.pid.exists() && !p.runtime.exists());
    assert!(p.hotplug.is_dir());
}

#[test]
fn oversized_and_special_files_are_not_read() {
    let (_t, run) = run_dir();
    let p = run.instance("big1").unwrap();
    let f = std::fs::File::create(&p.runtime).unwrap();
    f.set_len(kvm_runtime::fsutil::MAX_STATE_FILE + 1).unwrap();
    assert!(matches!(p.read_runtime(), Err(Error::TooLarge { .. })));
    let zero = kvm_runtime::fsutil::read_capped(Path::new("/dev/zero"), 1 << 20);
    assert!(
        matches!(zero, Err(Error::UnexpectedFileType { .. })),
        "{zero:?}"
    );
}

/// A process that looks like the QEMU of `name` in run dir `run`.
fn spawn_qemu_like(p: &kvm_runtime::InstancePaths) -> std::process::Child {
    let child = Command::new("sh")
        .args(["-c", "sleep 30; :", "-name", &p.name, "-pidfile"])
        .arg(&p.pid)
        .spawn()
        .unwrap();
    exec_done(child)
}

/// The child once it has exec'd: until then /proc shows the test's own
/// command line, and a liveness check would race with it.
fn exec_done(child: std::process::Child) -> std::process::Child {
    let cmdline = format!("/proc/{}/cmdline", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read(&cmdline)
        .unwrap_or_default()
        .windows(5)
        .any(|w| w == b"-name")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never exec'd"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child
}

#[test]
fn a_lost_or_garbled_pid_file_does_not_hide_a_running_instance() {
    let (_t, run) = run_dir();
    let p = run.instance("lost1").unwrap();
    let mut child = spawn_qemu_like(&p);
    let pid = child.id().cast_signed();
    p.write_runtime(&record("lost1")).unwrap();
    // No pid file at all: found in /proc by its -pidfile and -name.
    assert_eq!(p.liveness().unwrap(), Liveness::Running { pid });
    assert!(run.instances().unwrap().contains(&"lost1".to_owned()));
    // Garbled.
    std::fs::write(&p.pid, "garbage\n\x01").unwrap();
    assert_eq!(p.liveness().unwrap(), Liveness::Running { pid });
    // Pointing at another process.
    p.write_pid(std::process::id().cast_signed()).unwrap();
    assert_eq!(p.liveness().unwrap(), Liveness::Running { pid });
    // The same name in another run dir is another instance.
    let (_t2, run2) = run_dir();
    let q = run2.instance("lost1").unwrap();
    q.write_pid(pid).unwrap();
    assert!(matches!(q.liveness().unwrap(), Liveness::Stale { .. }));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(matches!(p.liveness().unwrap(), Liveness::Stale { .. }));
}

#[test]
fn a_served_socket_is_never_removed() {
    let (_t, run) = run_dir();
    let p = run.instance("sock1").unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&p.qmp).unwrap();
    // No process can be identified, yet the socket answers: unknown.
    let err = p.liveness().unwrap_err();
    assert!(matches!(err, Error::Unidentified { .. }), "{err}");
    let err = p.cleanup().unwrap_err();
    assert!(matches!(err, Error::SocketInUse { .. }), "{err}");
    assert!(p.qmp.exists());
    drop(listener);
    // Nobody serves it any more: stale, removable.
    assert_eq!(p.liveness().unwrap(), Liveness::NoPidFile);
    p.cleanup().unwrap();
    assert!(!p.qmp.exists());
}

#[test]
fn socket_paths_too_long_are_refused() {
    let tmp = scratch("kvm-runtime-long");
    let run = RunDir::new(tmp.path().join("x".repeat(60)));
    match run.instance(&"a".repeat(60)) {
        Err(Error::SocketPathTooLong { path }) => assert!(path.as_os_str().len() > 107),
        other => panic!("{other:?}"),
    }
}

#[test]
fn runtime_round_trip_is_atomic_0600() {
    let (_t, run) = run_dir();
    let p = run.instance("web1").unwrap();
    assert_eq!(p.read_runtime().unwrap(), None);
    let r = record("web1");
    p.write_runtime(&r).unwrap();
    assert_eq!(mode(&p.runtime), 0o600);
    assert_eq!(p.read_runtime().unwrap().unwrap(), r);
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(run.root().join("conf"))
        .unwrap()
        .collect();
    assert_eq!(leftovers.len(), 1);
}

#[test]
fn ganeti_runtime_formats_are_read() {
    let (_t, run) = run_dir();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");

    let p = run.instance("inst1.example.com").unwrap();
    std::fs::copy(data.join("ganeti-runtime-3.json"), &p.runtime).unwrap();
    let r = p.read_runtime().unwrap().unwrap();
    assert_eq!(r.origin, Origin::Ganeti);
    assert_eq!(r.argv[2], "inst1.example.com");
    assert_eq!(r.argv[4], "128", "numbers in Ganeti argv become strings");
    assert_eq!(r.nics[0]["nicparams"]["link"], "br0");
    assert_eq!(r.hvparams["serial_speed"], 38400);
    assert!(r.disks.is_empty());

    let p = run.instance("inst2").unwrap();
    std::fs::copy(data.join("ganeti-runtime-4.json"), &p.runtime).unwrap();
    let r = p.read_runtime().unwrap().unwrap();
    assert_eq!(r.nics.len(), 2);
    assert_eq!(r.disks.len(), 1);
    assert_eq!(r.disks[0][1], "/var/run/ganeti/instance-disks/inst2:0");
    // And back to Ganeti's form.
    let again: serde_json::Value = serde_json::from_slice(&r.to_ganeti_json()).unwrap();
    assert_eq!(again.as_array().unwrap().len(), 4);
}

#[test]
fn corrupt_and_future_runtime_files_are_clear_errors() {
    let (_t, run) = run_dir();
    let p = run.instance("bad").unwrap();
    for (content, want) in [
        ("{not json", "not JSON"),
        ("[1, 2]", "2 elements"),
        ("{\"argv\": []}", "no gkvm_runtime version"),
        ("{\"gkvm_runtime\": 1, \"argv\": 5}", "bad runtime record"),
        ("[[1, {}], [], {}]", "Ganeti argv"),
        ("42", "neither"),
    ] {
        std::fs::write(&p.runtime, content).unwrap();
        match p.read_runtime() {
            Err(Error::Corrupt { path, reason }) => {
                assert_eq!(path, p.runtime);
                assert!(reason.contains(want), "{content}: {reason}");
            }
            other => panic!("{content}: {other:?}"),
        }
    }
    std::fs::write(&p.runtime, "{\"gkvm_runtime\": 99, \"argv\": []}").unwrap();
    assert!(matches!(
        p.read_runtime(),
        Err(Error::UnsupportedVersion { version: 99, .. })
    ));
}

#[test]
fn symlinks_are_not_followed() {
    let (t, run) = run_dir();
    let p = run.instance("sym").unwrap();
    let target = t.path().join("secret");
    std::fs::write(&target, "do not touch").unwrap();
    std::os::unix::fs::symlink(&target, &p.runtime).unwrap();
    assert!(matches!(
        p.read_runtime(),
        Err(Error::UnexpectedFileType { .. })
    ));
    // Writing replaces the link itself, never the file it points to.
    p.write_runtime(&record("sym")).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "do not touch");
    assert!(!std::fs::symlink_metadata(&p.runtime)
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Re-executed as a child by `killed_writer_never_leaves_a_torn_file`.
#[test]
fn crash_writer_helper() {
    let Ok(root) = std::env::var("KVM_RUNTIME_CRASH_ROOT") else {
        return;
    };
    let run = RunDir::new(root);
    let p = run.instance("crash").unwrap();
    let big: Vec<String> = (0..20_000).map(|i| format!("arg-{i}")).collect();
    for i in 0u64.. {
        let mut r = record(if i % 2 == 0 { "even" } else { "odd" });
        r.argv.extend(big.iter().cloned());
        p.write_runtime(&r).unwrap();
    }
}

#[test]
fn killed_writer_never_leaves_a_torn_file() {
    let (_t, run) = run_dir();
    let p = run.instance("crash").unwrap();
    p.write_runtime(&record("initial")).unwrap();
    let exe = std::env::current_exe().unwrap();
    for round in 0..25 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KVM_RUNTIME_CRASH_ROOT", run.root())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + (round * 7) % 60));
        // SIGKILL: no destructor, no cleanup, mid-write most likely.
        child.kill().unwrap();
        child.wait().unwrap();
        let r = p.read_runtime().unwrap().expect("runtime file vanished");
        assert!(
            ["initial", "even", "odd"].contains(&r.argv[2].as_str()),
            "round {round}: unexpected {:?}",
            r.argv[2]
        );
        if r.argv[2] != "initial" {
            assert_eq!(r.argv.len(), 3 + 20_000, "round {round}: torn record");
        }
    }
}

/// Re-executed as a child by `lock_contention_between_processes`: holds
/// the lock of instance "contended" for a while.
#[test]
fn lock_holder_helper() {
    let Ok(root) = std::env::var("KVM_RUNTIME_LOCK_ROOT") else {
        return;
    };
    let p = RunDir::new(root).instance("contended").unwrap();
    let _g = p.lock(Duration::from_secs(5)).unwrap();
    println!("LOCKED");
    std::thread::sleep(Duration::from_millis(800));
}

#[test]
fn lock_contention_between_processes() {
    let (_t, run) = run_dir();
    let p = run.instance("contended").unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args([
            "--exact",
            "lock_holder_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVM_RUNTIME_LOCK_ROOT", run.root())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the child holds it.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("LOCKED") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "helper died"
        );
    }
    match p.lock(Duration::from_millis(150)) {
        Err(e @ Error::Busy { .. }) => {
            assert!(e.to_string().contains("instance contended is busy"), "{e}");
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    // Released when the holder exits: a patient caller gets it.
    let t = Instant::now();
    let _g = p.lock(Duration::from_secs(10)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    child.wait().unwrap();
}

#[test]
fn lock_survives_cleanup_removing_its_file() {
    let (_t, run) = run_dir();
    let p = run.instance("relock").unwrap();
    let g = p.lock(Duration::from_secs(1)).unwrap();
    p.cleanup().unwrap();
    assert!(!p.lock.exists());
    drop(g);
    let _g2 = p.lock(Duration::from_secs(1)).unwrap();
    // While held, a second locker is refused even though the file is new.
    assert!(matches!(
        p.lock(Duration::from_millis(50)),
        Err(Error::Busy { .. })
    ));
}

#[test]
fn eight_threads_four_uids() {
    let (_t, run) = run_dir();
    // A high range nobody's processes use.
    let pool = UidPool::new(3_900_000_000, 3_900_000_003);
    let results: Vec<Result<u32, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let run = run.clone();
                s.spawn(move || {
                    let p = run.instance(&format!("vm{i}")).unwrap();
                    pool.allocate(&run, &p, Duration::from_secs(10))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut got: Vec<u32> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    got.sort_unstable();
    assert_eq!(
        got,
        vec![3_900_000_000, 3_900_000_001, 3_900_000_002, 3_900_000_003]
    );
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, Error::PoolExhausted { .. }), "{e}");
            assert!(e.to_string().contains("exhausted"));
        }
    }
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 4);
    // Cleanup gives a uid back; the next instance gets it.
    let holder = (0..8)
        .map(|i| run.instance(&format!("vm{i}")).unwrap())
        .find(|p| kvm_runtime::read_uid(p).unwrap() == Some(3_900_000_002))
        .unwrap();
    assert_eq!(holder.cleanup().unwrap().released_uid, Some(3_900_000_002));
    let late = run.instance("late").unwrap();
    assert_eq!(
        pool.allocate(&run, &late, Duration::from_secs(1)).unwrap(),
        3_900_000_002
    );
}

#[test]
fn uid_owning_a_process_is_skipped() {
    let (_t, run) = run_dir();
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let pool = UidPool::new(me, me);
    let p = run.instance("mine").unwrap();
    assert!(matches!(
        pool.allocate(&run, &p, Duration::from_secs(1)),
        Err(Error::PoolExhausted { .. })
    ));
}

fn spawn_named(name: &str) -> std::process::Child {
    exec_done(
        Command::new("sh")
            .args(["-c", "sleep 30; :", "-name", name])
            .spawn()
            .unwrap(),
    )
}

#[test]
fn liveness_from_proc() {
    let (_t, run) = run_dir();
    let p = run.instance("live1").unwrap();
    assert_eq!(p.liveness().unwrap(), Liveness::NoPidFile);

    let mut child = spawn_named("live1");
    let pid = child.id().cast_signed();
    p.write_pid(pid).unwrap();
    assert_eq!(mode(&p.pid), 0o600);
    assert_eq!(p.liveness().unwrap(), Liveness::Running { pid });

    // Another instance's name on the same pid is not this instance.
    let other = run.instance("live10").unwrap();
    other.write_pid(pid).unwrap();
    assert_eq!(other.liveness().unwrap(), Liveness::Stale { pid });

    // A zombie is dead: kill it but do not reap it yet.
    child.kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !kvm_runtime::is_zombie_or_gone(pid) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "reaped too early"
    );
    assert_eq!(p.liveness().unwrap(), Liveness::Stale { pid });
    child.wait().unwrap();
    assert_eq!(p.liveness().unwrap(), Liveness::Stale { pid });

    // A pid reused by an unrelated process (this test) is not trusted.
    p.write_pid(std::process::id().cast_signed()).unwrap();
    assert!(matches!(p.liveness().unwrap(), Liveness::Stale { .. }));

    // Garbage in the pid file: stale, not an error.
    std::fs::write(&p.pid, "garbage").unwrap();
    assert!(matches!(p.liveness().unwrap(), Liveness::Stale { .. }));
    assert_eq!(
        run.instances_with_pid_files().unwrap(),
        vec!["live1", "live10"]
    );
}

#[test]
fn qemu_style_name_arguments_match() {
    let (_t, run) = run_dir();
    let p = run.instance("vmx").unwrap();
    for arg in ["vmx,debug-threads=on", "guest=vmx,debug-threads=on"] {
        let mut child = exec_done(
            Command::new("sh")
                .args(["-c", "sleep 30; :", "-name", arg])
                .spawn()
                .unwrap(),
        );
        p.write_pid(child.id().cast_signed()).unwrap();
        assert!(p.liveness().unwrap().running_pid().is_some(), "{arg}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn cleanup_removes_everything_and_quarantines_a_full_chroot() {
    let (_t, run) = run_dir();
    let p = run.instance("gone").unwrap();
    p.write_pid(1).unwrap();
    p.write_runtime(&record("gone")).unwrap();
    p.write_nic(0, "tap0").unwrap();
    p.write_nic(1, "tap1").unwrap();
    assert_eq!(p.read_nics().unwrap(), vec!["tap0", "tap1"]);
    p.write_keymap("include en-us\n").unwrap();
    for s in [&p.qmp, &p.serial, &p.monitor] {
        std::os::unix::net::UnixListener::bind(s).unwrap();
    }
    let _ = UidPool::new(3_900_000_100, 3_900_000_101)
        .allocate(&run, &p, Duration::from_secs(1))
        .unwrap();
    let _g = p.lock(Duration::from_secs(1)).unwrap();
    std::fs::create_dir(&p.chroot).unwrap();
    std::fs::write(p.chroot.join("left-behind"), "x").unwrap();

    let report = p.cleanup().unwrap();
    assert_eq!(report.released_uid, Some(3_900_000_100));
    let q = report.quarantined_chroot.unwrap();
    assert!(q.starts_with(run.root().join("chroot-quarantine")));
    assert!(q.join("left-behind").exists());
    for f in [
        &p.pid, &p.runtime, &p.keymap, &p.qmp, &p.serial, &p.monitor, &p.uid, &p.lock, &p.chroot,
        &p.nic_dir,
    ] {
        assert!(!f.exists(), "{} left", f.display());
    }
    // Idempotent; an empty chroot is simply removed.
    assert_eq!(p.cleanup().unwrap(), Default::default());
    std::fs::create_dir(&p.chroot).unwrap();
    assert_eq!(p.cleanup().unwrap().quarantined_chroot, None);
    assert!(!p.chroot.exists());
}

#[test]
fn bad_names_are_rejected_before_any_path() {
    let bad = [
        "",
        ".",
        "..",
        "../etc",
        "a/b",
        "/abs",
        "-name",
        "-",
        ".hidden",
        "a..b",
        "nul\0x",
        "tab\tx",
        "nl\nx",
        "cr\rx",
        "esc\x1b",
        "space x",
        "comma,x",
        "colon:x",
        "semi;x",
        "quote'x",
        "dollar$x",
        "star*",
        "ü-umlaut",
        "back\\slash",
        "percent%d",
    ];
    let tmp = scratch("kvm-runtime-names");
    // A root that does not exist: nothing may be created for a bad name.
    let run = RunDir::new(tmp.path().join("never-created"));
    for name in bad {
        match run.instance(name) {
            Err(Error::InvalidName { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    let long = "a".repeat(129);
    assert!(matches!(
        run.instance(&long),
        Err(Error::InvalidName { .. })
    ));
    for good in ["web1", "inst1.example.com", "a_b-c+d", "x", &"a".repeat(50)] {
        assert!(kvm_runtime::validate_name(good).is_ok(), "{good}");
    }
    assert!(!run.root().exists());
}
