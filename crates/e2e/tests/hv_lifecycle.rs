//! The facade against real QEMU, real TAPs and a real run directory.
//! Linux guests boot under TCG (this machine's nested KVM cannot run them);
//! guest-less instances (SeaBIOS only) use KVM.

mod common;
use common::{guest_spec, guestless_spec, rt, sh};
use gkvm_testkit::{require, Bridge, Env, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::{Config, Error, KvmHypervisor, RunDir, StopOutcome};
use kvm_cmdline::{NicMode, NicSpec};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Node {
    hv: KvmHypervisor,
    // Declared before `dir`: kills leftovers before the directory goes.
    _guard: gkvm_testkit::KillRunDir,
    dir: ScratchDir,
}

impl Node {
    fn new(env: &Env, tweak: impl FnOnce(&mut Config)) -> Node {
        let dir = ScratchDir::new("gkvm-hv");
        let mut config = Config::new(RunDir::new(dir.path().join("run")));
        config.kvm_path = Some(env.qemu.clone());
        config.caps_cache_dir = Some(dir.path().join("caps"));
        config.trust_unsealed_migration_info = true;
        tweak(&mut config);
        Node {
            hv: KvmHypervisor::new(config),
            _guard: gkvm_testkit::KillRunDir(dir.path().join("run")),
            dir,
        }
    }

    fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Every file left under the run dir (the capability cache aside).
    fn leftovers(&self) -> Vec<PathBuf> {
        self.hv.state_files()
    }
}

fn nic(mac: &str, bridge: &str) -> NicSpec {
    NicSpec::new(mac.parse().unwrap(), bridge)
}

fn alive(pid: i32) -> bool {
    !kvm_runtime::is_zombie_or_gone(pid)
}

#[test]
fn start_info_balloon_graceful_stop_leaves_nothing() {
    let Some(env) = require("hv_lifecycle", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let br = Bridge::new("gkvmhvbr0");
    let mut spec = guest_spec(&env, "life1");
    spec.nics.push(nic("52:54:00:00:10:01", &br.0));
    rt().block_on(async {
        let hv = &node.hv;
        let t = Instant::now();
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        eprintln!("start (paused) took {:?}", t.elapsed());
        assert!(report.paused);
        assert_eq!(report.taps.len(), 1);
        let paths = RunDir::new(node.run()).instance("life1").unwrap();
        let info = hv.info("life1").await.unwrap();
        assert_eq!(info.state, hv_kvm::InstanceState::Paused);
        assert_eq!(
            (info.memory_mib, info.vcpus, info.pid),
            (128, 1, report.pid)
        );
        assert_eq!(hv.list().unwrap(), vec!["life1"]);

        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("life1").await.unwrap();
        let seen = serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(seen.contains("eth0 up 52:54:00:00:10:01"), "{seen}");
        assert_eq!(
            hv.info("life1").await.unwrap().state,
            hv_kvm::InstanceState::Running
        );

        hv.balloon("life1", 96).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = hv.info("life1").await.unwrap().memory_mib;
            if m == 96 {
                break;
            }
            assert!(Instant::now() < deadline, "balloon stuck at {m} MiB");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let outcome = hv
            .stop(
                "life1",
                hv_kvm::StopMode::Acpi {
                    timeout: Duration::from_secs(60),
                },
            )
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::PoweredOff);
        assert!(!alive(report.pid));
        assert!(!gkvm_tap::interface_exists(&report.taps[0]), "TAP left");
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
        assert!(hv.list().unwrap().is_empty());
        assert!(matches!(
            hv.info("life1").await,
            Err(Error::NotRunning { .. })
        ));
        // Stopping again is harmless.
        assert_eq!(
            hv.stop(
                "life1",
                hv_kvm::StopMode::Acpi {
                    timeout: Duration::from_secs(1)
                }
            )
            .await
            .unwrap(),
            StopOutcome::NotRunning
        );
    });
}

#[test]
fn reboot_resets_the_guest_then_force_stop() {
    let Some(env) = require("hv_reboot", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let spec = guest_spec(&env, "boot1");
    rt().block_on(async {
        let hv = &node.hv;
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(node.run()).instance("boot1").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("boot1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        serial.clear();
        hv.reboot("boot1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("after reboot: {e}"));
        assert_eq!(
            hv.info("boot1").await.unwrap().pid,
            report.pid,
            "reset in place"
        );

        let t = Instant::now();
        assert_eq!(
            hv.stop("boot1", hv_kvm::StopMode::Force).await.unwrap(),
            StopOutcome::Killed
        );
        eprintln!("force stop took {:?}", t.elapsed());
        assert!(!alive(report.pid));
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn reboot_with_exit_behavior_restarts_qemu() {
    let Some(env) = require("hv_reboot_exit", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let mut spec = guestless_spec("rbexit1");
    spec.hvparams.set_pair("reboot_behavior=exit").unwrap();
    rt().block_on(async {
        let hv = &node.hv;
        let first = hv.start(&spec, hv_kvm::StartMode::Running).await.unwrap();
        hv.reboot("rbexit1").await.unwrap();
        let info = hv.info("rbexit1").await.unwrap();
        assert_ne!(info.pid, first.pid, "a new QEMU");
        assert!(!alive(first.pid));
        assert_eq!(info.state, hv_kvm::InstanceState::Running);

        // With the cluster's current configuration: the keymap (safe to
        // change between starts) comes from it, the sound card (hardware
        // of the running instance) does not.
        let mut current = spec.hvparams.clone();
        for p in ["keymap=de", "soundhw=ac97"] {
            current.set_pair(p).unwrap();
        }
        hv.reboot_with("rbexit1", Some(&current)).await.unwrap();
        let pid = hv.info("rbexit1").await.unwrap().pid;
        let argv = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        let argv = argv.replace('\0', " ");
        assert!(argv.contains(" -k "), "keymap not taken: {argv}");
        assert!(
            !argv.contains("ac97"),
            "hardware changed on a restart: {argv}"
        );
        hv.stop("rbexit1", hv_kvm::StopMode::Force).await.unwrap();
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn two_nics_on_a_bridge() {
    let Some(env) = require("hv_two_nics", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let br = Bridge::new("gkvmhvbr1");
    let mut spec = guest_spec(&env, "nics2");
    // Also: the balloon takes it to its startup memory once the driver is up.
    spec.startup_memory = Some(96);
    spec.nics.push(nic("52:54:00:00:20:01", &br.0));
    spec.nics.push(nic("52:54:00:00:20:02", &br.0));
    // And Ganeti 3.1's virtio_net_queues: two TAP queues per NIC (the
    // guest's driver uses as many as it has vCPUs).
    spec.hvparams.set_pair("virtio_net_queues=2").unwrap();
    spec.vcpus = 2;
    rt().block_on(async {
        let hv = &node.hv;
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let argv = std::fs::read(format!("/proc/{}/cmdline", report.pid)).unwrap();
        let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
        assert!(argv.contains(",mq=on,vectors=6"), "{argv}");
        assert_eq!(argv.matches(",fds=").count(), 2, "{argv}");
        for tap in &report.taps {
            let flags = std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).unwrap();
            let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
            assert_ne!(flags & gkvm_tap::IFF_MULTI_QUEUE, 0, "{tap}: {flags:#x}");
        }
        let paths = RunDir::new(node.run()).instance("nics2").unwrap();
        assert_eq!(paths.read_nics().unwrap(), report.taps);
        for tap in &report.taps {
            let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
            assert_eq!(master.file_name().unwrap().to_str(), Some(br.0.as_str()));
        }
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("nics2").await.unwrap();
        let seen = serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(seen.contains("eth0 up 52:54:00:00:20:01"), "{seen}");
        let link = serial
            .run("cat /sys/class/net/eth1/address", Duration::from_secs(20))
            .unwrap();
        assert!(link.contains("52:54:00:00:20:02"), "{link}");
        let queues = serial
            .run("ls /sys/class/net/eth0/queues", Duration::from_secs(20))
            .unwrap();
        assert!(
            queues.contains("rx-0") && queues.contains("rx-1") && !queues.contains("rx-2"),
            "the guest should see two queues: {queues}"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while hv.info("nics2").await.unwrap().memory_mib != 96 {
            assert!(
                Instant::now() < deadline,
                "never ballooned to the startup memory"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        hv.stop("nics2", hv_kvm::StopMode::Force).await.unwrap();
        for tap in &report.taps {
            assert!(!gkvm_tap::interface_exists(tap));
        }
    });
}

fn cpus_allowed(tid: i64) -> String {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn cpu_mask_pins_each_vcpu() {
    let Some(env) = require("hv_pinning", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let mut spec = guestless_spec("pin1");
    spec.vcpus = 2;
    spec.hvparams.set_pair("cpu_mask=1:0").unwrap();
    rt().block_on(async {
        node.hv
            .start(&spec, hv_kvm::StartMode::Running)
            .await
            .unwrap();
        let paths = RunDir::new(node.run()).instance("pin1").unwrap();
        let mut q = gkvm_qmp::blocking::Qmp::connect(&paths.qmp, Default::default()).unwrap();
        let cpus = q.run(&gkvm_qmp::commands::QueryCpusFast).unwrap();
        q.close();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus_allowed(cpus[0].thread_id), "1");
        assert_eq!(cpus_allowed(cpus[1].thread_id), "0");
        node.hv.stop("pin1", hv_kvm::StopMode::Force).await.unwrap();

        // One set pins the whole VM, every thread.
        let mut spec = guestless_spec("pin2");
        spec.hvparams.set_pair("cpu_mask=1").unwrap();
        let r = node
            .hv
            .start(&spec, hv_kvm::StartMode::Running)
            .await
            .unwrap();
        for tid in std::fs::read_dir(format!("/proc/{}/task", r.pid))
            .unwrap()
            .flatten()
        {
            let tid: i64 = tid.file_name().to_str().unwrap().parse().unwrap();
            assert_eq!(cpus_allowed(tid), "1", "thread {tid}");
        }
        node.hv.stop("pin2", hv_kvm::StopMode::Force).await.unwrap();
    });
}

#[test]
fn vnc_password_never_leaves_qmp() {
    let Some(env) = require("hv_vnc_password", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let pw = node.dir.path().join("vnc.pass");
    std::fs::write(&pw, "s3cr3t-pw-4711\n").unwrap();
    let mut spec = guestless_spec("vnc1");
    spec.hvparams
        .set_pair("vnc_bind_address=127.0.0.1")
        .unwrap();
    spec.hvparams
        .set_pair(&format!("vnc_password_file={}", pw.display()))
        .unwrap();
    spec.network_port = Some(5977);
    rt().block_on(async {
        let r = node
            .hv
            .start(&spec, hv_kvm::StartMode::Running)
            .await
            .unwrap();
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", r.pid)).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains("s3cr3t"));
        assert!(String::from_utf8_lossy(&cmdline).contains("password=on"));
        let paths = RunDir::new(node.run()).instance("vnc1").unwrap();
        let runtime = std::fs::read_to_string(&paths.runtime).unwrap();
        assert!(!runtime.contains("s3cr3t"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&paths.runtime)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        match node.hv.console("vnc1").unwrap() {
            hv_kvm::ConsoleInfo::Serial { socket, .. } => assert_eq!(socket, paths.serial),
            other => panic!("{other:?}"),
        }
        node.hv.stop("vnc1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

/// A QEMU whose QMP never appears: the real binary (so probes answer and
/// the process carries `-name`) with every `-qmp` option removed.
fn qemu_without_qmp(dir: &Path, real: &Path) -> PathBuf {
    let script = dir.join("qemu-without-qmp");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nskip=0\nfor a do\n  shift\n  if [ $skip = 1 ]; then skip=0; continue; fi\n  \
             if [ \"$a\" = -qmp ]; then skip=1; continue; fi\n  set -- \"$@\" \"$a\"\ndone\nexec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn failed_starts_leave_nothing_behind() {
    let Some(env) = require("hv_failed_starts", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let br = Bridge::new("gkvmhvbr2");
    rt().block_on(async {
        // QEMU refuses to start: a disk that does not exist.
        let node = Node::new(&env, |_| {});
        let mut spec = guestless_spec("fail1");
        spec.nics.push(nic("52:54:00:00:30:01", &br.0));
        spec.disks
            .push(kvm_cmdline::DiskSpec::new("/nonexistent/disk.img"));
        match node.hv.start(&spec, hv_kvm::StartMode::Running).await {
            Err(Error::Start {
                instance,
                step,
                reason,
            }) => {
                assert_eq!((instance.as_str(), step), ("fail1", "spawn QEMU"));
                assert!(reason.contains("/nonexistent/disk.img"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
        assert!(
            std::fs::read_dir("/sys/class/net/gkvmhvbr2/brif")
                .unwrap()
                .next()
                .is_none(),
            "TAP left on the bridge"
        );

        // QEMU dies right after starting: an option it rejects late.
        let mut spec = guestless_spec("fail2");
        spec.hvparams
            .set_pair("kvm_extra=-device no-such-device-model")
            .unwrap();
        let err = node
            .hv
            .start(&spec, hv_kvm::StartMode::Running)
            .await
            .unwrap_err();
        assert!(err.report().contains("fail2"), "{err}");
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());

        // vhost_net=true: gkvm opens /dev/vhost-net per queue and passes
        // the descriptors. Where the node has none (this project's CI), a
        // clear error names the parameter and nothing is left behind.
        let mut spec = guestless_spec("fail5");
        spec.nics.push(nic("52:54:00:00:30:05", &br.0));
        for pair in ["vhost_net=true", "virtio_net_queues=2"] {
            spec.hvparams.set_pair(pair).unwrap();
        }
        let started = node.hv.start(&spec, hv_kvm::StartMode::Paused).await;
        if std::path::Path::new("/dev/vhost-net").exists() {
            let pid = started.unwrap().pid;
            let argv = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
            assert!(argv.contains(",vhost=on,vhostfds="), "{argv}");
            node.hv
                .stop("fail5", hv_kvm::StopMode::Force)
                .await
                .unwrap();
        } else {
            let err = started.unwrap_err();
            let report = err.report();
            assert!(
                report.contains("vhost_net") && report.contains("/dev/vhost-net"),
                "{report}"
            );
        }
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());

        // The QEMU binary is missing.
        let node2 = Node::new(&env, |c| c.kvm_path = Some("/nonexistent/qemu".into()));
        assert!(matches!(
            node2
                .hv
                .start(&guestless_spec("fail3"), hv_kvm::StartMode::Running)
                .await,
            Err(Error::QemuMissing { .. })
        ));
        assert_eq!(node2.leftovers(), Vec::<PathBuf>::new());

        // QMP never appears: the start gives up, kills what it started.
        let fake = qemu_without_qmp(node.dir.path(), &env.qemu);
        let node3 = Node::new(&env, |c| {
            c.kvm_path = Some(fake.clone());
            c.qmp_timeout = Duration::from_secs(2);
        });
        let mut spec = guestless_spec("fail4");
        spec.nics.push(nic("52:54:00:00:30:04", &br.0));
        match node3.hv.start(&spec, hv_kvm::StartMode::Running).await {
            Err(Error::Start { step, .. }) => assert_eq!(step, "QMP"),
            other => panic!("{other:?}"),
        }
        assert_eq!(node3.leftovers(), Vec::<PathBuf>::new());
        let out = std::process::Command::new("pgrep")
            .args(["-f", "-name fail4"])
            .output()
            .unwrap();
        assert!(
            out.stdout.is_empty(),
            "QEMU without QMP left running: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Its TAP went with it.
        assert!(
            std::fs::read_dir("/sys/class/net/gkvmhvbr2/brif")
                .unwrap()
                .next()
                .is_none(),
            "TAP left on the bridge"
        );
    });
}

#[test]
fn concurrent_starts_of_one_name() {
    let Some(env) = require("hv_concurrent", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let spec = guestless_spec("race1");
    rt().block_on(async {
        let (a, b) = tokio::join!(node.hv.start(&spec, hv_kvm::StartMode::Running), node.hv.start(&spec, hv_kvm::StartMode::Running));
        let (ok, err) = match (a, b) {
            (Ok(r), Err(e)) | (Err(e), Ok(r)) => (r, e),
            other => panic!("expected one winner: {other:?}"),
        };
        assert!(
            matches!(&err, Error::AlreadyRunning { instance, pid } if instance == "race1" && *pid == ok.pid)
                || err.report().contains("busy"),
            "{err}"
        );
        node.hv.stop("race1", hv_kvm::StopMode::Force).await.unwrap();
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn info_all_over_twenty_instances() {
    let Some(env) = require("hv_info_all", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    rt().block_on(async {
        let names: Vec<String> = (0..20).map(|i| format!("many{i:02}")).collect();
        for n in &names {
            node.hv
                .start(&guestless_spec(n), hv_kvm::StartMode::Running)
                .await
                .unwrap();
        }
        // One dies behind the facade's back: the list still comes.
        let victim = node.hv.info("many07").await.unwrap().pid;
        // SAFETY: killing a QEMU this test started.
        unsafe { libc::kill(victim, libc::SIGKILL) };
        let t = Instant::now();
        let all = node.hv.info_all().await.unwrap();
        eprintln!("info_all over 20 took {:?}", t.elapsed());
        assert!(all.len() == 19 || all.len() == 20, "{}", all.len());
        assert!(all
            .iter()
            .filter(|i| i.name != "many07")
            .all(|i| i.state == hv_kvm::InstanceState::Running && i.memory_mib == 64));
        for n in &names {
            node.hv.stop(n, hv_kvm::StopMode::Force).await.unwrap();
        }
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn nic_script_gets_the_ganeti_environment() {
    let Some(env) = require("hv_nic_script", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let tmp = ScratchDir::new("gkvm-nicscript");
    let script = tmp.path().join("ifup");
    let dump = tmp.path().join("env");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nenv | sort > {}.$ACTION.$INTERFACE_INDEX\n[ \"$ACTION\" = up ] && ip link set \"$1\" up\nexit 0\n",
            dump.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = Node::new(&env, |c| {
        c.nic_script = Some(script.clone());
        c.nic_down_script = Some(script.clone());
    });
    let mut spec = guestless_spec("script1");
    spec.tags = vec!["web".into(), "prod".into()];
    let mut n = nic("52:54:00:00:40:01", "br-none");
    n.ip = Some("192.0.2.10".into());
    n.vlan = Some(".100:200".into());
    n.uuid = Some("6d1e8c7a-6f0e-4c53-9d0b-1b2f3a4c5d6e".parse().unwrap());
    n.name = Some("front".into());
    let mut network = kvm_cmdline::NetworkSpec {
        name: "net1".into(),
        subnet: Some("192.0.2.0/24".into()),
        gateway: Some("192.0.2.1".into()),
        ..Default::default()
    };
    network.uuid = Some("0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b".parse().unwrap());
    network.tags = vec!["dmz".into(), "v4".into()];
    n.network = Some(network);
    spec.nics.push(n);
    let mut routed = nic("52:54:00:00:40:02", "100");
    routed.mode = NicMode::Routed;
    routed.ip = Some("192.0.2.11".into());
    spec.nics.push(routed);
    rt().block_on(async {
        let r = node
            .hv
            .start(&spec, hv_kvm::StartMode::Running)
            .await
            .unwrap();
        let e0 = std::fs::read_to_string(tmp.path().join("env.up.0")).unwrap();
        for want in [
            "INSTANCE=script1".to_owned(),
            "MAC=52:54:00:00:40:01".into(),
            "MODE=bridged".into(),
            format!("INTERFACE={}", r.taps[0]),
            "INTERFACE_INDEX=0".into(),
            "TAGS=web prod".into(),
            "IP=192.0.2.10".into(),
            "LINK=br-none".into(),
            "BRIDGE=br-none".into(),
            "NETWORK_NAME=net1".into(),
            "NETWORK_SUBNET=192.0.2.0/24".into(),
            "NETWORK_GATEWAY=192.0.2.1".into(),
            "NETWORK_UUID=0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b".into(),
            "NETWORK_TAGS=dmz v4".into(),
            "INTERFACE_UUID=6d1e8c7a-6f0e-4c53-9d0b-1b2f3a4c5d6e".into(),
            "INTERFACE_NAME=front".into(),
            "VLAN=.100:200".into(),
            "ACTION=up".into(),
        ] {
            assert!(e0.lines().any(|l| l == want), "{want} missing from:\n{e0}");
        }
        let e1 = std::fs::read_to_string(tmp.path().join("env.up.1")).unwrap();
        assert!(
            e1.contains("MODE=routed") && e1.contains("LINK=100") && !e1.contains("BRIDGE="),
            "{e1}"
        );
        assert!(!tmp.path().join("env.down.0").exists());
        node.hv
            .stop("script1", hv_kvm::StopMode::Force)
            .await
            .unwrap();
        // The down script ran for each TAP, with the same environment.
        for (i, tap) in r.taps.iter().enumerate() {
            let down = std::fs::read_to_string(tmp.path().join(format!("env.down.{i}"))).unwrap();
            assert!(
                down.contains("ACTION=down") && down.contains(&format!("INTERFACE={tap}")),
                "{down}"
            );
        }
    });
}

/// Ganeti 3.1's instance-communication NICs: their TAPs are named
/// `gnt.com.N` (the NIC's own template), and natively (no NIC up script)
/// the node's communication script configures them, as Ganeti's
/// `kvm-ifup` runs `kvm-ifup-os`, instead of the routed setup (they have
/// no routing table); a hot-added one is named and configured the same.
#[test]
fn instance_communication_nics_get_their_tap_names_and_script() {
    let Some(env) = require("hv_communication_nic", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let tmp = ScratchDir::new("gkvm-comm");
    let script = tmp.path().join("kvm-ifup-os");
    let log = tmp.path().join("log");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $INTERFACE $MODE $MAC $IP $INTERFACE_NAME $ACTION\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = Node::new(&env, |c| c.nic_communication_script = Some(script.clone()));
    let communication = |mac: &str, ip: &str| {
        let mut n = nic(mac, "communication_rt");
        n.mode = NicMode::Routed;
        n.ip = Some(ip.into());
        n.name = Some("ganeti:communication:comm1".into());
        n.tap_template = Some("gnt.com.%d".into());
        n
    };
    let mut spec = guestless_spec("comm1");
    spec.nics.push(nic("52:54:00:00:41:01", "br-none-x"));
    spec.nics[0].mode = NicMode::Ext;
    spec.nics
        .push(communication("52:54:00:00:41:02", "169.254.10.2"));
    rt().block_on(async {
        let r = node
            .hv
            .start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap();
        let tap = &r.taps[1];
        assert!(tap.starts_with("gnt.com."), "{:?}", r.taps);
        assert!(!r.taps[0].starts_with("gnt.com."), "{:?}", r.taps);
        let lines = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            lines.trim(),
            format!(
                "{tap} {tap} routed 52:54:00:00:41:02 169.254.10.2 \
                 ganeti:communication:comm1 up"
            )
        );
        // No rule for a table: the script, not gkvm, routes it.
        assert!(!sh("ip rule show").contains(&format!("iif {tap} ")));
        assert_eq!(
            sh(&format!("cat /sys/class/net/{tap}/operstate")).trim(),
            "unknown",
            "the TAP is up (a TAP with a carrier reads unknown)"
        );

        // Hot plug: a second one gets a TAP of its own under the template.
        let added = node
            .hv
            .nic_add("comm1", communication("52:54:00:00:41:03", "169.254.10.3"))
            .await
            .unwrap();
        assert_eq!(added.tap_template.as_deref(), Some("gnt.com.%d"));
        let taps = RunDir::new(node.run())
            .instance("comm1")
            .unwrap()
            .read_nics()
            .unwrap();
        let hot = taps.last().unwrap().clone();
        assert!(hot.starts_with("gnt.com.") && &hot != tap, "{taps:?}");
        let lines = std::fs::read_to_string(&log).unwrap();
        assert!(
            lines
                .lines()
                .last()
                .unwrap()
                .starts_with(&format!("{hot} {hot} routed 52:54:00:00:41:03")),
            "{lines}"
        );
        node.hv
            .stop("comm1", hv_kvm::StopMode::Force)
            .await
            .unwrap();
        assert!(!std::path::Path::new(&format!("/sys/class/net/{hot}")).exists());
    });
}

#[test]
fn instances_started_by_the_ganeti_layout_are_managed() {
    let Some(env) = require("hv_ganeti_layout", &[Need::Root, Need::Qemu]) else {
        return;
    };
    // A QEMU started the way Ganeti's KVM driver did, under a Ganeti-style run dir.
    let node = Node::new(&env, |_| {});
    let run = RunDir::new(node.run());
    run.ensure().unwrap();
    let paths = run.instance("ganeti1.example.com").unwrap();
    let accel = gkvm_testkit::guestless_accel();
    let st = std::process::Command::new(&env.qemu)
        .args([
            "-name",
            "ganeti1.example.com",
            "-m",
            "64",
            "-smp",
            "1",
            "-daemonize",
            "-display",
            "none",
        ])
        .args(["-machine", &format!("pc,accel={accel}")])
        .arg("-pidfile")
        .arg(&paths.pid)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", paths.qmp.display()))
        .arg("-serial")
        .arg(format!(
            "unix:{},server=on,wait=off",
            paths.serial.display()
        ))
        .args(["-device", "virtio-balloon-pci"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kvm-runtime/tests/data/ganeti-runtime-3.json");
    std::fs::copy(data, &paths.runtime).unwrap();
    rt().block_on(async {
        assert_eq!(node.hv.list().unwrap(), vec!["ganeti1.example.com"]);
        let info = node.hv.info("ganeti1.example.com").await.unwrap();
        assert_eq!((info.memory_mib, info.vcpus), (64, 1));
        assert!(matches!(
            node.hv.console("ganeti1.example.com").unwrap(),
            hv_kvm::ConsoleInfo::Serial { .. }
        ));
        assert_eq!(
            node.hv
                .stop("ganeti1.example.com", hv_kvm::StopMode::Force)
                .await
                .unwrap(),
            StopOutcome::Killed
        );
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn node_info_and_verify() {
    let Some(env) = require("hv_node_info", &[Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    rt().block_on(async {
        let n = node.hv.node_info().await.unwrap();
        assert!(n.memory_total_mib > 0 && n.memory_free_mib <= n.memory_total_mib);
        assert!(n.cpu_total >= 1 && n.cpu_sockets >= 1);
        assert!(n.hv_version.unwrap().0 >= 7);
        let report = node.hv.verify().await;
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let bad = Node::new(&env, |c| c.kvm_path = Some("/nonexistent/kvm".into()));
        let report = bad.hv.verify().await;
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("/nonexistent/kvm")),
            "{:?}",
            report.problems
        );
    });
}

#[test]
fn warm_start_forks_no_probe() {
    let Some(env) = require("hv_warm_start", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    rt().block_on(async {
        node.hv
            .start(&guestless_spec("warm1"), hv_kvm::StartMode::Running)
            .await
            .unwrap();
        node.hv
            .stop("warm1", hv_kvm::StopMode::Force)
            .await
            .unwrap();
        node.hv
            .start(&guestless_spec("warm1"), hv_kvm::StartMode::Running)
            .await
            .unwrap();
        assert_eq!(
            node.hv.caps_cache().probes_run(),
            1,
            "probed once for two starts"
        );
        node.hv
            .stop("warm1", hv_kvm::StopMode::Force)
            .await
            .unwrap();
        // A new facade (a new `gkvm` process) reads the cache from disk.
        let again = Node {
            _guard: gkvm_testkit::KillRunDir(node.run()),
            hv: KvmHypervisor::new({
                let mut c = Config::new(RunDir::new(node.run()));
                c.kvm_path = Some(env.qemu.clone());
                c.caps_cache_dir = Some(node.dir.path().join("caps"));
                c
            }),
            dir: ScratchDir::new("gkvm-hv-unused"),
        };
        again
            .hv
            .start(&guestless_spec("warm1"), hv_kvm::StartMode::Running)
            .await
            .unwrap();
        assert_eq!(
            again.hv.caps_cache().probes_run(),
            0,
            "warm start from the disk cache"
        );
        again
            .hv
            .stop("warm1", hv_kvm::StopMode::Force)
            .await
            .unwrap();
    });
}

#[test]
fn vnet_hdr_follows_the_hvparam() {
    let Some(env) = require("hv_vnet_hdr", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let br = Bridge::new("gkvmhvbr3");
    rt().block_on(async {
        for (i, (value, want)) in [("true", true), ("false", false)].into_iter().enumerate() {
            let name = format!("vh{i}");
            let mut spec = guestless_spec(&name);
            spec.nics.push(nic(&format!("52:54:00:00:30:0{i}"), &br.0));
            spec.hvparams
                .set_pair(&format!("vnet_hdr={value}"))
                .unwrap();
            let report = node
                .hv
                .start(&spec, hv_kvm::StartMode::Paused)
                .await
                .unwrap();
            let tap = &report.taps[0];
            let flags = std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).unwrap();
            let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
            assert_eq!(
                flags & gkvm_tap::IFF_VNET_HDR != 0,
                want,
                "vnet_hdr={value}: {flags:#x}"
            );
            node.hv.stop(&name, hv_kvm::StopMode::Force).await.unwrap();
        }
    });
}

#[test]
fn guest_agent_socket_lives_and_goes_with_the_instance() {
    let Some(env) = require("hv_guest_agent", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let mut spec = guestless_spec("qga1");
    spec.hvparams.set_pair("use_guest_agent=true").unwrap();
    rt().block_on(async {
        node.hv
            .start(&spec, hv_kvm::StartMode::Running)
            .await
            .unwrap();
        let paths = RunDir::new(node.run()).instance("qga1").unwrap();
        // QEMU serves the agent's port on the run dir's socket; no guest
        // runs an agent there, and info says so.
        std::os::unix::net::UnixStream::connect(&paths.guest_agent).unwrap();
        assert_eq!(node.hv.info("qga1").await.unwrap().guest_agent, Some(false));
        node.hv.stop("qga1", hv_kvm::StopMode::Force).await.unwrap();
        assert!(!paths.guest_agent.exists());
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn a_guest_agent_that_runs_answers_info() {
    let Some(env) = require("hv_guest_agent_guest", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let mut spec = guest_spec(&env, "qga2");
    spec.hvparams.set_pair("use_guest_agent=true").unwrap();
    rt().block_on(async {
        let hv = &node.hv;
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(node.run()).instance("qga2").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("qga2").await.unwrap();
        let seen = serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            seen.contains("gkvm-test-guest: agent on /dev/vport"),
            "{seen}"
        );
        // The agent answers within info's bound once it runs; on a busy
        // machine its first answers may come late: wait for it, not for a time.
        let deadline = Instant::now() + Duration::from_secs(60);
        while hv.info("qga2").await.unwrap().guest_agent != Some(true) {
            assert!(
                Instant::now() < deadline,
                "the guest agent never answered info"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        hv.stop("qga2", hv_kvm::StopMode::Force).await.unwrap();
        assert!(!alive(report.pid));
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn user_shutdown_keeps_qemu_until_the_next_start() {
    let Some(env) = require("hv_user_shutdown", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let mut spec = guest_spec(&env, "ush1");
    spec.hvparams.set_pair("user_shutdown=true").unwrap();
    rt().block_on(async {
        let hv = &node.hv;
        let first = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(node.run()).instance("ush1").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("ush1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        serial.send_line("poweroff -f").unwrap();
        // The guest is off, its QEMU waits: `shutdown` in info and list.
        let deadline = Instant::now() + Duration::from_secs(30);
        while hv.info("ush1").await.unwrap().state != hv_kvm::InstanceState::Shutdown {
            assert!(Instant::now() < deadline, "the guest never shut down");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(alive(first.pid));
        // QEMU's event log says how: the guest powered off.
        let info = hv.info("ush1").await.unwrap();
        assert_eq!(info.cause.as_deref(), Some("guest-shutdown"), "{info:?}");
        assert!(info.reason.unwrap().contains("powered off"));
        let listed = hv.overview().await.unwrap();
        assert_eq!(listed[0].state, hv_kvm::InstanceState::Shutdown);
        // Starting it again replaces that QEMU; with reboot_behavior=exit
        // a guest reboot ends it too, and is told apart from a poweroff
        // (Ganeti would call both a user shutdown).
        let mut exits = spec.clone();
        exits.hvparams.set_pair("reboot_behavior=exit").unwrap();
        let second = hv.start(&exits, hv_kvm::StartMode::Paused).await.unwrap();
        assert_ne!(second.pid, first.pid);
        assert!(!alive(first.pid));
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("ush1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        serial.send_line("reboot -f").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let info = loop {
            let info = hv.info("ush1").await.unwrap();
            if info.state == hv_kvm::InstanceState::Shutdown {
                break info;
            }
            assert!(Instant::now() < deadline, "the guest never rebooted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(info.cause.as_deref(), Some("guest-reset"), "{info:?}");
        assert!(info.reason.unwrap().contains("rebooted"));
        hv.stop("ush1", hv_kvm::StopMode::Force).await.unwrap();
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

/// Starts `spec` and waits until its guest is ready (the power button
/// listener included).
async fn boot(hv: &KvmHypervisor, node: &Node, spec: &kvm_cmdline::InstanceSpec) -> (i32, Serial) {
    let pid = hv.start(spec, hv_kvm::StartMode::Paused).await.unwrap().pid;
    let paths = RunDir::new(node.run()).instance(&spec.name).unwrap();
    let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
    hv.resume(&spec.name).await.unwrap();
    serial
        .wait_for(READY_LINE, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));
    (pid, serial)
}

/// Waits until `name`'s info shows `state`.
async fn wait_info(
    hv: &KvmHypervisor,
    name: &str,
    state: hv_kvm::InstanceState,
) -> hv_kvm::InstanceInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(info) = hv.info(name).await {
            if info.state == state {
                return info;
            }
        }
        assert!(Instant::now() < deadline, "{name} never got to {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ganeti 3.1 with `user_shutdown`: an administrator's stop (the power
/// button) ends QEMU once the guest is off, so it is not "user down"; a
/// QEMU whose guest already powered itself off is ended at once by any
/// stop; a QEMU ended by a signal is "user down" (as Ganeti's kvmd says).
#[test]
fn user_shutdown_tells_an_administrators_stop_from_the_users() {
    let Some(env) = require("hv_user_down", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let mut spec = guest_spec(&env, "udown1");
    spec.hvparams.set_pair("user_shutdown=true").unwrap();
    let long = hv_kvm::StopMode::Acpi {
        timeout: Duration::from_secs(120),
    };
    rt().block_on(async {
        let hv = &node.hv;
        // A graceful stop waits for the guest's poweroff, not its timeout.
        let (pid, _serial) = boot(hv, &node, &spec).await;
        let outcome = hv.stop("udown1", long).await.map_err(|e| e.report());
        assert_eq!(outcome, Ok(StopOutcome::PoweredOff));
        assert!(!alive(pid));

        // Ganeti's stop: press the button and poll. QEMU exits; the end
        // follows the power button, so it is not the user's.
        let (pid, _serial) = boot(hv, &node, &spec).await;
        let pressed = hv.stop(
            "udown1",
            hv_kvm::StopMode::Acpi {
                timeout: Duration::ZERO,
            },
        );
        assert_eq!(pressed.await.unwrap(), StopOutcome::PowerButtonPressed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "QEMU stayed after the guest powered off"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let info = wait_info(hv, "udown1", hv_kvm::InstanceState::Shutdown).await;
        assert_eq!((info.pid, info.user_down), (0, false), "{info:?}");
        hv.cleanup("udown1").await.unwrap();

        // The guest powers itself off: QEMU waits, "user down"; a stop
        // ends it at once.
        let (pid, mut serial) = boot(hv, &node, &spec).await;
        serial.send_line("poweroff -f").unwrap();
        let info = wait_info(hv, "udown1", hv_kvm::InstanceState::Shutdown).await;
        assert_eq!((info.pid, info.user_down), (pid, true), "{info:?}");
        let outcome = hv.stop("udown1", long).await.map_err(|e| e.report());
        assert_eq!(outcome, Ok(StopOutcome::PoweredOff));
        assert!(!alive(pid));

        // A signal on the host (Ganeti's QA: pkill): "user down", QEMU gone.
        let (pid, _serial) = boot(hv, &node, &spec).await;
        // SAFETY: a plain kill(2) of the QEMU this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let info = wait_info(hv, "udown1", hv_kvm::InstanceState::Shutdown).await;
        assert_eq!(info.cause.as_deref(), Some("host-signal"), "{info:?}");
        assert_eq!((info.pid, info.user_down), (0, true), "{info:?}");
        assert_eq!(
            hv.stop("udown1", long).await.unwrap(),
            StopOutcome::NotRunning
        );
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

#[test]
fn display_binds_resolve_interface_names_on_this_node() {
    let Some(env) = require("hv_display_binds", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    rt().block_on(async {
        for (name, pairs, want) in [
            ("vncif", &["vnc_bind_address=lo"][..], "127.0.0.1:"),
            ("vnc6", &["vnc_bind_address=::1"][..], "[::1]:"),
            (
                "spiceif6",
                &["spice_bind=lo", "spice_ip_version=6", "soundhw=ac97"][..],
                "addr=::1,",
            ),
        ] {
            let mut spec = guestless_spec(name);
            spec.network_port = Some(5900 + 40 + (std::process::id() % 50) as u16);
            for p in pairs {
                spec.hvparams.set_pair(p).unwrap();
            }
            let pid = node
                .hv
                .start(&spec, hv_kvm::StartMode::Paused)
                .await
                .unwrap_or_else(|e| panic!("{name}: {}", e.report()))
                .pid;
            let argv = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
            assert!(argv.contains(want), "{name}: {argv:?}");
            if name == "spiceif6" {
                assert!(argv.contains("spice,model=ac97"), "{argv:?}");
            }
            node.hv.stop(name, hv_kvm::StopMode::Force).await.unwrap();
        }
        // An interface with no address of the asked family, or none at all.
        let mut spec = guestless_spec("noif");
        spec.network_port = Some(5990);
        spec.hvparams
            .set_pair("vnc_bind_address=gkvmnoif0")
            .unwrap();
        let err = node
            .hv
            .start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_err()
            .report();
        assert!(
            err.contains("vnc_bind_address") && err.contains("gkvmnoif0"),
            "{err}"
        );
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

/// Waits until `name` shows `state` in `overview` (the `gkvm list` path).
async fn wait_listed(
    hv: &KvmHypervisor,
    name: &str,
    state: hv_kvm::InstanceState,
) -> hv_kvm::InstanceInfo {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = hv.overview().await.unwrap();
        if let Some(i) = listed
            .into_iter()
            .find(|i| i.name == name && i.state == state)
        {
            return i;
        }
        assert!(Instant::now() < deadline, "{name} never showed {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_guest_poweroff_and_a_killed_qemu_are_reported_until_cleanup() {
    let Some(env) = require("hv_shutdown_crash", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    rt().block_on(async {
        let hv = &node.hv;
        // The guest powers itself off; QEMU exits cleanly.
        let spec = guest_spec(&env, "off1");
        hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(node.run()).instance("off1").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("off1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        serial.send_line("poweroff -f").unwrap();
        let off = wait_listed(hv, "off1", hv_kvm::InstanceState::Shutdown).await;
        assert_eq!((off.pid, off.memory_mib), (0, 128));
        assert_eq!(off.cause.as_deref(), Some("guest-shutdown"), "{off:?}");
        let reason = off.reason.unwrap();
        assert!(
            reason.contains("exited cleanly") && reason.contains("powered off"),
            "{reason}"
        );
        let info = hv.info("off1").await.unwrap();
        assert_eq!(info.state, hv_kvm::InstanceState::Shutdown);
        assert_eq!(info.log.as_deref(), Some(hv.instance_log("off1").as_path()));
        assert!(
            hv.list().unwrap().is_empty(),
            "list names running ones only"
        );

        // QEMU is killed; its log's last words are the reason.
        let report = hv
            .start(&guestless_spec("dead1"), hv_kvm::StartMode::Paused)
            .await
            .unwrap();
        let log = hv.instance_log("dead1");
        let mode = std::fs::metadata(&log).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let dead_paths = RunDir::new(node.run()).instance("dead1").unwrap();
        let mut q = gkvm_qmp::blocking::Qmp::connect(&dead_paths.qmp, gkvm_qmp::Options::default())
            .unwrap();
        // A message QEMU prints after it daemonized lands in its log.
        q.execute_raw(
            "migrate",
            Some(serde_json::json!({"uri": "tcp:127.0.0.1:1"})),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("Failed to connect")
        {
            assert!(
                Instant::now() < deadline,
                "QEMU's message never reached its log"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(q);
        // SAFETY: killing the QEMU this test started.
        unsafe { libc::kill(report.pid, libc::SIGKILL) };
        let dead = wait_listed(hv, "dead1", hv_kvm::InstanceState::Crashed).await;
        let reason = dead.reason.unwrap();
        assert!(
            reason.contains("killed, or crashed") && reason.contains("Failed to connect"),
            "{reason}"
        );

        // cleanup clears either; a new start of one replaces the record.
        hv.cleanup("off1").await.unwrap();
        assert!(matches!(
            hv.info("off1").await,
            Err(Error::NotRunning { .. })
        ));
        hv.start(&guestless_spec("dead1"), hv_kvm::StartMode::Paused)
            .await
            .unwrap();
        assert_eq!(
            hv.info("dead1").await.unwrap().state,
            hv_kvm::InstanceState::Paused
        );
        hv.stop("dead1", hv_kvm::StopMode::Force).await.unwrap();
        assert!(hv.overview().await.unwrap().is_empty());
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
        // The previous run's log is kept beside the current one.
        assert!(log.with_extension("log.1").exists());
    });
}

#[test]
fn powercycle_writes_sysrq_else_runs_the_fallback() {
    let Some(env) = require("hv_powercycle", &[Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-fence");
    let trigger = dir.path().join("sysrq-trigger");
    std::fs::write(&trigger, "").unwrap();
    let node = Node::new(&env, |c| {
        c.sysrq_trigger = trigger.clone();
        c.reboot_command = vec!["false".into()];
    });
    // A dry run touches nothing and says what it would write where.
    let plan = node.hv.powercycle_node(true).unwrap();
    assert!(plan.dry_run && plan.steps[1].contains(trigger.to_str().unwrap()));
    assert_eq!(std::fs::read_to_string(&trigger).unwrap(), "");
    // For real, on a trigger that is a plain file: "b" is written.
    node.hv.powercycle_node(false).unwrap();
    assert_eq!(std::fs::read_to_string(&trigger).unwrap(), "b");
    // A trigger that cannot be written: Ganeti's fallback runs; when it
    // fails too, the error names both.
    let gone = Node::new(&env, |c| {
        c.sysrq_trigger = dir.path().join("no/such/trigger");
        c.reboot_command = vec!["false".into()];
    });
    let err = gone.hv.powercycle_node(false).unwrap_err().report();
    assert!(
        err.contains("no/such/trigger") && err.contains("false"),
        "{err}"
    );
    let fallback = Node::new(&env, |c| {
        c.sysrq_trigger = dir.path().join("no/such/trigger");
        c.reboot_command = vec!["true".into()];
    });
    assert!(!fallback.hv.powercycle_node(false).unwrap().dry_run);
}

/// The seccomp mode of a live process (`Seccomp:` in its status: 2 is a
/// filter).
fn seccomp_mode(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// QEMU runs in its seccomp sandbox by default (the kernel shows the
/// filter), also when it drops to another user after installing it
/// (`security_model=user`); `sandbox=off` runs it without one.
#[test]
fn qemu_runs_in_its_seccomp_sandbox_by_default() {
    let Some(env) = require("sandbox", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    rt().block_on(async {
        for (name, pairs, mode) in [
            ("sbx1", &[][..], "2"),
            (
                "sbx2",
                &["security_model=user", "security_domain=nobody"][..],
                "2",
            ),
            ("sbx3", &["sandbox=off"][..], "0"),
        ] {
            let mut spec = guestless_spec(name);
            for pair in pairs {
                spec.hvparams.set_pair(pair).unwrap();
            }
            let report = node
                .hv
                .start(&spec, hv_kvm::StartMode::Running)
                .await
                .unwrap_or_else(|e| panic!("{name}: {}", e.report()));
            assert_eq!(seccomp_mode(report.pid), mode, "{name} {pairs:?}");
            // It works under the filter: QMP, a balloon, a stop.
            node.hv.balloon(name, 48).await.unwrap();
            node.hv.stop(name, hv_kvm::StopMode::Force).await.unwrap();
        }
        assert_eq!(node.leftovers(), Vec::<PathBuf>::new());
    });
}

/// The share of one CPU the instance's cgroup used over `window`, by the
/// cgroup's own counter.
fn cgroup_cpu_share(paths: &hv_kvm::RunDir, name: &str, window: Duration) -> f64 {
    let cg = paths.instance(name).unwrap().cgroup;
    let (t0, u0) = (
        Instant::now(),
        cg.cpu_usage_ns().expect("a cgroup CPU counter"),
    );
    // A rate is measured over time: this is the window, not a wait.
    std::thread::sleep(window);
    let (t1, u1) = (Instant::now(), cg.cpu_usage_ns().unwrap());
    let used = Duration::from_nanos(u1 - u0).as_secs_f64();
    used / (t1 - t0).as_secs_f64()
}

/// cgroup limits (here v1, this machine's): a memory limit below what
/// the instance needs is refused before anything is made; a start that
/// fails after its cgroup was made removes it; a running guest's QEMU is
/// in its cgroup, a CPU quota set live holds a busy guest to it (by the
/// cgroup's own counter) and raising it lets the guest use more; the
/// cgroup goes with the stop.
#[test]
fn a_cpu_quota_set_live_holds_a_busy_guest_and_the_cgroup_goes_with_it() {
    let Some(env) = require("cgroup_limits", &[Need::Root, Need::Guest]) else {
        return;
    };
    let node = Node::new(&env, |_| {});
    let run = RunDir::new(node.run());
    rt().block_on(async {
        // Below the guest's memory and QEMU's own.
        let mut spec = guestless_spec("cg0");
        spec.hvparams.set_pair("cgroup_memory_max=64").unwrap();
        let err = node
            .hv
            .start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_err()
            .report();
        assert!(
            err.contains("cgroup_memory_max") && err.contains("MiB"),
            "{err}"
        );
        assert!(!run.instance("cg0").unwrap().cgroup.exists());
        // QEMU refuses its command line after the cgroup was made.
        let mut spec = guestless_spec("cg1");
        spec.hvparams.set_pair("cgroup_pids_max=200").unwrap();
        spec.hvparams.set_pair("kvm_extra=-no-such-option").unwrap();
        assert!(node
            .hv
            .start(&spec, hv_kvm::StartMode::Paused)
            .await
            .is_err());
        assert!(!run.instance("cg1").unwrap().cgroup.exists());

        let mut spec = guest_spec(&env, "cg2");
        spec.hvparams.set_pair("cgroup_pids_max=500").unwrap();
        let report = node
            .hv
            .start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let paths = run.instance("cg2").unwrap();
        assert!(paths.cgroup.exists());
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", report.pid)).unwrap();
        assert!(own.contains("/cg2"), "QEMU is not in its cgroup: {own}");
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        node.hv.resume("cg2").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        serial
            .run(
                "(while :; do :; done) & echo spinning",
                Duration::from_secs(30),
            )
            .unwrap();
        let set = |quota: &str| {
            std::collections::BTreeMap::from([(
                "cgroup_cpu_quota".to_owned(),
                serde_json::Value::String(quota.to_owned()),
            )])
        };
        node.hv
            .set_limits("cg2", &set("30"))
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let share = cgroup_cpu_share(&run, "cg2", Duration::from_secs(3));
        eprintln!("under a 30 % quota: {:.1} % of a CPU", share * 100.0);
        assert!((0.15..=0.33).contains(&share), "{share}");
        node.hv.set_limits("cg2", &set("80")).await.unwrap();
        let share = cgroup_cpu_share(&run, "cg2", Duration::from_secs(3));
        eprintln!("under an 80 % quota: {:.1} % of a CPU", share * 100.0);
        assert!((0.45..=0.88).contains(&share), "{share}");
        assert!(node
            .hv
            .migration_info("cg2")
            .unwrap()
            .contains("\"cgroup_cpu_quota\":80"));
        // Only limits change live.
        let err = node
            .hv
            .set_limits(
                "cg2",
                &std::collections::BTreeMap::from([(
                    "vnc_bind_address".to_owned(),
                    serde_json::Value::String("0.0.0.0".into()),
                )]),
            )
            .await
            .unwrap_err()
            .report();
        assert!(err.contains("vnc_bind_address"), "{err}");
        node.hv.stop("cg2", hv_kvm::StopMode::Force).await.unwrap();
        assert!(!paths.cgroup.exists(), "the cgroup outlived its instance");
    });
}
