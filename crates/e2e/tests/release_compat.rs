//! An instance started by gkvm 0.1 — the release before device addresses —
//! is managed by this build. The fixture in `tests/data/release-0.1/` is
//! what 0.1 left on its node (its runtime file, and QEMU's full argv from
//! `/proc/PID/cmdline`), captured from `gkvm start oldrel1 --memory 64
//! --disk DISK --nic bridge=BR,mac=52:54:00:0d:00:01 -H kvm_flag=disabled`.
//! The test recreates that QEMU exactly, then lists, inspects, reboots and
//! live-migrates it to a node running this build (which must rebuild the
//! same hardware: positional ids, QEMU-chosen PCI slots) and stops it
//! there; a second one is stopped where 0.1 left it.

mod common;
use common::{node, rt};
use gkvm_testkit::{require, Bridge, KillRunDir, Need, ScratchDir};
use hv_kvm::RunDir;
use kvm_runtime::RuntimeRecord;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

const NAME: &str = "oldrel1";
/// The descriptor 0.1 passed the NIC's TAP on (`-netdev tap,...,fd=11`).
const TAP_FD: i32 = 11;

fn fixture(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/release-0.1")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct Places<'a> {
    run: &'a Path,
    files: &'a Path,
    qemu: &'a Path,
    bridge: &'a str,
    tap: &'a str,
}

fn materialize(text: &str, p: &Places) -> String {
    text.replace("@RUN@", &p.run.display().to_string())
        .replace("@FILES@", &p.files.display().to_string())
        .replace("@QEMU@", &p.qemu.display().to_string())
        .replace("@BRIDGE@", p.bridge)
        .replace("@TAP@", p.tap)
}

/// Runs the fixture's argv as 0.1 did (daemonized, `-S`), the TAP on its
/// descriptor, and lets the guest run as 0.1's start ended.
fn start_as_release_0_1(argv: &[String], tap: &gkvm_tap::Tap, qmp: &Path) {
    let from = tap.fds()[0].as_raw_fd();
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    gkvm_testkit::pass_fds_at(&mut cmd, vec![(from, TAP_FD)]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "QEMU refused 0.1's argv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut q = gkvm_qmp::blocking::Qmp::connect(qmp, gkvm_qmp::Options::default()).unwrap();
    q.run(&gkvm_qmp::commands::Cont).unwrap();
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[test]
fn release_0_1_instance_is_managed_and_migrates_to_this_release() {
    let Some(env) = require("release_0_1_instance", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let (da, db) = (ScratchDir::new("gkvm-rel-a"), ScratchDir::new("gkvm-rel-b"));
    let _guards = [
        KillRunDir(da.path().join("run")),
        KillRunDir(db.path().join("run")),
    ];
    let bridge = Bridge::new("gkvmrel0");
    let files = da.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let disk = std::fs::File::create(files.join("disk0.img")).unwrap();
    disk.set_len(16 << 20).unwrap();

    let run_a = da.path().join("run");
    let run_dir = RunDir::new(&run_a);
    run_dir.ensure().unwrap();
    let paths = run_dir.instance(NAME).unwrap();
    let tap = gkvm_tap::TapBuilder::new()
        .name_template("gkrel%d")
        .open()
        .unwrap();
    let places = Places {
        run: &run_a,
        files: &files,
        qemu: &env.qemu,
        bridge: &bridge.0,
        tap: tap.name(),
    };
    let record = materialize(&fixture("oldrel1.runtime"), &places);
    let record = RuntimeRecord::from_json(record.as_bytes(), Path::new("fixture")).unwrap();
    paths.write_runtime(&record).unwrap();
    paths.write_nic(0, tap.name()).unwrap();
    let argv: Vec<String> = materialize(&fixture("oldrel1.argv"), &places)
        .lines()
        .map(str::to_owned)
        .collect();
    start_as_release_0_1(&argv, &tap, &paths.qmp);
    drop(tap); // QEMU holds the interface now, as after 0.1's start

    let (a, b) = (node(da.path(), &env.qemu), node(db.path(), &env.qemu));
    rt().block_on(async {
        // Listed, inspected and rebooted by this build.
        assert_eq!(a.list().unwrap(), vec![NAME.to_owned()]);
        let info = a.info(NAME).await.unwrap();
        assert_eq!(info.state, hv_kvm::InstanceState::Running);
        assert_eq!((info.memory_mib, info.vcpus), (64, 1));
        a.reboot(NAME).await.unwrap();
        let after = a.info(NAME).await.unwrap();
        assert_eq!(after.state, hv_kvm::InstanceState::Running);

        // Migrated to a node running this build.
        let port = 24000 + u16::try_from(std::process::id() % 4000).unwrap();
        let migration_info = a.migration_info(NAME).unwrap();
        b.accept_instance(&migration_info, "127.0.0.1", port)
            .await
            .unwrap();
        let t = Instant::now();
        let status = a
            .migrate(NAME, "127.0.0.1", port, hv_kvm::MigrationMode::Live, |_| {})
            .await
            .unwrap();
        assert_eq!(
            status.status,
            hv_kvm::MigrationState::Completed,
            "{status:?}"
        );
        b.wait_incoming(NAME, Duration::from_secs(30))
            .await
            .unwrap();
        a.finalize_migration_source(NAME, hv_kvm::MigrationOutcome::Completed)
            .await
            .unwrap();
        b.finalize_migration_dst(NAME, hv_kvm::MigrationOutcome::Completed)
            .await
            .unwrap();
        eprintln!("0.1 → this build: migrated in {:?}", t.elapsed());
        assert!(a.list().unwrap().is_empty());
        let landed = b.info(NAME).await.unwrap();
        assert_eq!(landed.state, hv_kvm::InstanceState::Running);

        // The destination rebuilt 0.1's hardware: positional ids, no
        // explicit PCI slots (a different slot would have failed the
        // migration; this says why it did not).
        let argv_b = cmdline(landed.pid);
        assert!(
            argv_b.iter().any(|a| a.starts_with("tap,id=netdev0,")),
            "{argv_b:?}"
        );
        assert!(argv_b
            .iter()
            .any(|a| a == "virtio-net-pci,mac=52:54:00:0d:00:01,netdev=netdev0"));
        assert!(argv_b
            .iter()
            .any(|a| a == "virtio-blk-pci,drive=disk0,bootindex=1"));
        assert!(!argv_b.iter().any(|a| a.contains("addr=")), "{argv_b:?}");

        // And stopped there.
        b.stop(NAME, hv_kvm::StopMode::Force).await.unwrap();
        assert!(b.list().unwrap().is_empty());
    });

    // A second 0.1 instance, stopped where 0.1 left it: nothing remains.
    let tap = gkvm_tap::TapBuilder::new()
        .name_template("gkrel%d")
        .open()
        .unwrap();
    paths.write_runtime(&record).unwrap();
    paths.write_nic(0, tap.name()).unwrap();
    start_as_release_0_1(&argv, &tap, &paths.qmp);
    drop(tap);
    rt().block_on(async {
        assert_eq!(a.list().unwrap(), vec![NAME.to_owned()]);
        let outcome = a.stop(NAME, hv_kvm::StopMode::Force).await.unwrap();
        assert_eq!(outcome, hv_kvm::StopOutcome::Killed);
        assert!(a.list().unwrap().is_empty());
        assert_eq!(a.state_files(), Vec::<std::path::PathBuf>::new());
    });
}

#[test]
fn placed_devices_keep_their_ids_and_slots_across_a_migration() {
    let Some(env) = require("placed_devices_migrate", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let (da, db) = (ScratchDir::new("gkvm-pl-a"), ScratchDir::new("gkvm-pl-b"));
    let _guards = [
        KillRunDir(da.path().join("run")),
        KillRunDir(db.path().join("run")),
    ];
    let bridge = Bridge::new("gkvmrel1");
    let disk = da.path().join("disk0.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut spec = common::guestless_spec("placed1");
    spec.disks.push(hv_kvm::DiskSpec::new(&disk));
    spec.disks[0].name = Some("root".into());
    spec.nics.push(hv_kvm::NicSpec::new(
        "52:54:00:0d:00:02".parse().unwrap(),
        &bridge.0,
    ));
    let (a, b) = (node(da.path(), &env.qemu), node(db.path(), &env.qemu));
    rt().block_on(async {
        let started = a.start(&spec, hv_kvm::StartMode::Running).await.unwrap();
        let want = [
            "virtio-blk-pci,drive=disk-root,write-cache=on,bootindex=1,id=disk-root,addr=0x0c",
            "virtio-net-pci,mac=52:54:00:0d:00:02,netdev=nic0,id=nic0,addr=0x0d",
        ];
        let argv_a = cmdline(started.pid);
        for w in want {
            assert!(argv_a.iter().any(|a| a == w), "{w} not in {argv_a:?}");
        }
        let port = 28000 + u16::try_from(std::process::id() % 4000).unwrap();
        common::hop(&a, &b, "placed1", port).await;
        let landed = b.info("placed1").await.unwrap();
        assert_eq!(landed.state, hv_kvm::InstanceState::Running);
        let argv_b = cmdline(landed.pid);
        for w in want {
            assert!(argv_b.iter().any(|a| a == w), "{w} not in {argv_b:?}");
        }
        b.stop("placed1", hv_kvm::StopMode::Force).await.unwrap();
    });
}
