//! Save and restore with the real test guest (TCG): what the guest had in
//! memory and its clock carry on after a restore, with its disk and NIC;
//! a partial or changed file is refused before anything starts; a save
//! interrupted at any moment leaves no file and the guest running.

mod common;
use common::{guest_spec, rt};
use gkvm_testkit::{require, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::{KvmHypervisor, RunDir};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// The guest's uptime, in seconds, by its own clock.
fn uptime(serial: &mut Serial) -> f64 {
    let out = serial
        .run(
            "echo up''time $(cut -d' ' -f1 /proc/uptime)",
            Duration::from_secs(30),
        )
        .unwrap();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("uptime "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no uptime in {out}"))
}

fn no_qemu(run: &Path, why: &str) {
    assert!(
        gkvm_testkit::qemus_in(run).is_empty(),
        "{why}: a QEMU runs in {}",
        run.display()
    );
}

#[test]
fn a_saved_guest_comes_back_where_it_was_and_a_failed_save_leaves_it_running() {
    let Some(env) = require("save_restore", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-save");
    let run = dir.path().join("run");
    let _guard = gkvm_testkit::KillRunDir(run.clone());
    let mut config = common::node_config(dir.path(), &env.qemu);
    // A saved file is trusted as the administrator's own, not as unsealed
    // migration info.
    config.trust_unsealed_migration_info = false;
    let hv = KvmHypervisor::new(config);
    let bridge = gkvm_testkit::Bridge::new("gkvmsv0");
    let disk = dir.path().join("data.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let mut spec = guest_spec(&env, "sv1");
    spec.disks.push(kvm_cmdline::DiskSpec::new(&disk));
    spec.nics.push(kvm_cmdline::NicSpec::new(
        "52:54:00:00:72:01".parse().unwrap(),
        bridge.0.clone(),
    ));
    let file = dir.path().join("sv1.save");
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let paths = RunDir::new(&run).instance("sv1").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("sv1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = serial
            .run(
                "echo gkvm-marker-4711 > /tmp/mark; echo da''ta-disk > /dev/vda; sync",
                Duration::from_secs(30),
            )
            .unwrap();
        assert!(!out.contains("can't"), "{out}");
        let before = uptime(&mut serial);
        drop(serial);

        // Interrupted at once and a little later: no file, the guest runs.
        for ms in [1u64, 40, 70, 100, 150] {
            let r = tokio::time::timeout(Duration::from_millis(ms), hv.save("sv1", &file, |_| {}))
                .await;
            match r {
                Ok(done) => {
                    let report = done.unwrap_or_else(|e| panic!("{}", e.report()));
                    eprintln!(
                        "save done within {ms} ms ({:?} ms in QEMU)",
                        report.total_time_ms
                    );
                }
                Err(_) => eprintln!("save dropped after {ms} ms (file named: {})", file.exists()),
            }
            if file.exists() {
                // Named inside the window: the guest is in the file, and
                // its QEMU is gone even if the save was dropped after.
                no_qemu(&run, &format!("saved within {ms} ms"));
                hv.restore(&file)
                    .await
                    .unwrap_or_else(|e| panic!("{}", e.report()));
                std::fs::remove_file(&file).unwrap();
            }
            let info = hv.info("sv1").await.unwrap();
            assert_eq!(info.state, hv_kvm::InstanceState::Running, "after {ms} ms");
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            assert!(
                names.iter().all(|n| !n.contains("save")),
                "after {ms} ms: {names:?}"
            );
        }

        // The save: a 0600 file, the instance gone with its QEMU and TAP.
        let report = hv
            .save("sv1", &file, |_| {})
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        eprintln!(
            "saved: {} bytes, {:?} ms in QEMU",
            report.bytes, report.total_time_ms
        );
        assert_eq!(report.file, file);
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), report.bytes);
        no_qemu(&run, "after the save");
        assert!(hv.list().unwrap().is_empty());
        // An existing file is not overwritten.
        let header = hv.saved_header(&file).unwrap();
        assert_eq!(header.name, "sv1");
        // QEMU ≥ 9 writes each page at its offset (mapped-ram): the file
        // is no larger than the guest's memory and its state; 7.2 streams.
        let major = hv.capabilities(&env.qemu).await.unwrap().version.major;
        let expected = if major >= 9 { "mapped-ram" } else { "stream" };
        assert_eq!(header.stream, expected, "QEMU {major}");

        // A partial file and a changed one are refused; nothing starts.
        let partial = dir.path().join("partial.img");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&partial, &bytes[..bytes.len() - 4096]).unwrap();
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = hv.restore(&partial).await.unwrap_err();
        assert_eq!(e.kind(), "save_file", "{}", e.report());
        assert!(e.report().contains("partial"), "{}", e.report());
        let mut changed = bytes.clone();
        changed[20] ^= 0x20;
        std::fs::write(&partial, &changed).unwrap();
        let e = hv.restore(&partial).await.unwrap_err();
        assert_eq!(e.kind(), "save_file", "{}", e.report());
        no_qemu(&run, "after refused files");

        // The restore: same memory, the clock going on, disk and NIC back.
        let back = hv
            .restore(&file)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        assert_eq!(back.name, "sv1");
        assert_eq!(back.taps.len(), 1);
        assert!(Path::new("/sys/class/net").join(&back.taps[0]).exists());
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        let out = serial
            .run(
                "cat /tmp/mark; head -c 9 /dev/vda; echo",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(out.contains("gkvm-marker-4711"), "{out}");
        assert!(out.contains("data-disk"), "{out}");
        let after = uptime(&mut serial);
        assert!(after >= before, "uptime went back: {before} -> {after}");
        assert!(file.exists(), "restore keeps the file");
        // Restoring it again while it runs is refused, and changes nothing.
        let e = hv.restore(&file).await.unwrap_err();
        assert_eq!(e.kind(), "already_running", "{}", e.report());
        assert_eq!(hv.info("sv1").await.unwrap().pid, back.pid);
        // Saving onto an existing file is refused, and the guest runs on.
        let e = hv.save("sv1", &file, |_| {}).await.unwrap_err();
        assert!(e.report().contains("exists"), "{}", e.report());
        assert_eq!(
            hv.info("sv1").await.unwrap().state,
            hv_kvm::InstanceState::Running
        );
        hv.stop("sv1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

/// A save dropped at every moment of its course (SIGINT, SIGTERM, a
/// caller's timeout): the guest always ends up running in exactly one
/// place — here, resumed, when its file was not named; in the file when
/// it was. Guest-less on KVM, so that the moments are many and cheap; the
/// course is measured first, so the drops cover it on a fast or busy
/// machine alike. (Such drops found a completed migration left in QEMU's
/// finish-migrate for a moment, which the rollback did not resume; the
/// moment is short, so a run finds it about one time in three.)
#[test]
fn a_save_dropped_at_any_moment_leaves_the_guest_running_once() {
    let Some(env) = require("save_dropped_anywhere", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-save-drop");
    let run = dir.path().join("run");
    let _guard = gkvm_testkit::KillRunDir(run.clone());
    let hv = KvmHypervisor::new(common::node_config(dir.path(), &env.qemu));
    let mut spec = hv_kvm::InstanceSpec::new("svdrop1", 256);
    spec.hvparams
        .set_pair(gkvm_testkit::guestless_kvm_flag())
        .unwrap();
    let file = dir.path().join("svdrop1.save");
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Running).await.unwrap();
        // How long a whole save takes here.
        let t0 = std::time::Instant::now();
        hv.save("svdrop1", &file, |_| {}).await.unwrap();
        let whole = t0.elapsed();
        hv.restore(&file).await.unwrap();
        std::fs::remove_file(&file).unwrap();
        // Every ~2% of it, and past its end (its end moves from run to run).
        let steps = 60u32;
        for i in 0..=steps {
            let at = whole * i * 13 / (steps * 10);
            let r = tokio::time::timeout(at, hv.save("svdrop1", &file, |_| {})).await;
            let named = file.exists();
            if named {
                no_qemu(&run, &format!("named, dropped at {at:?}"));
                hv.restore(&file).await.unwrap();
                std::fs::remove_file(&file).unwrap();
            }
            let info = hv.info("svdrop1").await.unwrap();
            assert_eq!(
                info.state,
                hv_kvm::InstanceState::Running,
                "dropped at {at:?} of {whole:?} (file named: {named}, save {})",
                if r.is_ok() { "done" } else { "dropped" }
            );
            assert_eq!(gkvm_testkit::qemus_in(&run).len(), 1, "at {at:?}");
        }
        hv.stop("svdrop1", hv_kvm::StopMode::Force).await.unwrap();
    });
}
