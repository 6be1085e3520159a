//! NICs plugged into and out of a running TCG guest: the guest sees the
//! NIC with its MAC and reaches the host over the bridge; after removal it
//! is gone from the guest and the host. Failures leave the instance
//! running and nothing behind.

mod common;
use common::{guest_spec, rt, sh};
use gkvm_testkit::{require, Bridge, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::{Error, KvmHypervisor, RunDir};
use kvm_cmdline::NicSpec;
use std::time::{Duration, Instant};

#[test]
fn a_hot_added_nic_works_in_the_guest_and_goes_away() {
    let Some(env) = require("hotplug_nic", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hp");
    // TAPs of its own name, so the test looks only at what it made.
    let hv = KvmHypervisor::new({
        let mut c = common::node_config(dir.path(), &env.qemu);
        c.tap_template = "gkvmhpt%d".into();
        c
    });
    let own_taps = || -> Vec<String> {
        let mut t: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("gkvmhpt"))
            .collect();
        t.sort();
        t
    };
    let br = Bridge::new("gkvmhpbr0");
    sh("ip addr add 10.96.0.1/24 dev gkvmhpbr0");
    let mut spec = guest_spec(&env, "hp1");
    spec.hvparams.set_pair("reboot_behavior=exit").unwrap();
    let dir_b = ScratchDir::new("gkvm-hp-b");
    let hv_b = common::node(dir_b.path(), &env.qemu);
    // A failing assertion kills every QEMU this test started (both nodes).
    let _guards = [
        gkvm_testkit::KillRunDir(dir.path().join("run")),
        gkvm_testkit::KillRunDir(dir_b.path().join("run")),
    ];
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(dir.path().join("run")).instance("hp1").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("hp1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));

        // A bridge that does not exist: refused at the NIC's configuration,
        // the instance runs on, no TAP and no record change left.
        let taps_before = own_taps();
        let err = hv
            .nic_add("hp1", NicSpec::new("52:54:00:00:70:09".parse().unwrap(), "gkvmnosuchbr"))
            .await
            .unwrap_err();
        assert!(err.report().contains("gkvmnosuchbr"), "{}", err.report());
        assert_eq!(own_taps(), taps_before);
        assert!(paths.read_nics().unwrap().is_empty());

        let t = Instant::now();
        let placed = hv
            .nic_add("hp1", NicSpec::new("52:54:00:00:70:01".parse().unwrap(), &br.0))
            .await
            .unwrap();
        eprintln!("nic_add took {:?}", t.elapsed());
        let addr = placed.address.clone().unwrap();
        assert!(addr.pci_slot.is_some(), "{addr:?}");
        let tap = paths.read_nics().unwrap()[0].clone();
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
        assert_eq!(master.file_name().unwrap().to_str(), Some(br.0.as_str()));
        let saved = hv.migration_info("hp1").unwrap();
        assert!(saved.contains(&addr.id), "the record lacks the NIC");

        // The guest sees it with its MAC and reaches the host.
        let out = serial
            .run(
                "for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth0 ] && break; sleep 1; done; \
                 cat /sys/class/net/eth0/address && ip link set eth0 up && \
                 ip addr add 10.96.0.2/24 dev eth0 && ping -c 2 -W 5 10.96.0.1",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(out.contains("52:54:00:00:70:01"), "{out}");
        assert!(
            out.contains("2 packets received") || out.contains("1 packets received"),
            "{out}"
        );

        // It survives a restart (reboot_behavior=exit): the new QEMU has it
        // at the same place, and the guest brings it up as it boots.
        let first_pid = hv.info("hp1").await.unwrap().pid;
        drop(serial);
        hv.reboot("hp1").await.unwrap();
        assert_ne!(hv.info("hp1").await.unwrap().pid, first_pid);
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        let seen = serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(seen.contains("eth0 up 52:54:00:00:70:01"), "{seen}");

        // And a live migration: the destination starts with the NIC at
        // the same address, and it still works there.
        drop(serial);
        let port = 24000 + (std::process::id() % 1000) as u16;
        let info = hv.migration_info("hp1").unwrap();
        hv_b.accept_instance(&info, "127.0.0.1", port).await.unwrap();
        hv.migrate_to("hp1", "127.0.0.1", port, hv_kvm::MigrationMode::Live, |_| {})
            .await
            .unwrap();
        hv_b.wait_incoming("hp1", Duration::from_secs(30)).await.unwrap();
        hv_b.finalize_migration_dst("hp1", hv_kvm::MigrationOutcome::Completed)
            .await
            .unwrap();
        let hv = &hv_b;
        let paths = RunDir::new(dir_b.path().join("run")).instance("hp1").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        let out = serial
            .run(
                "ip addr add 10.96.0.2/24 dev eth0; ping -c 2 -W 5 10.96.0.1",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(
            out.contains("2 packets received") || out.contains("1 packets received"),
            "the hot-added NIC does not work after the migration: {out}"
        );
        let tap = paths.read_nics().unwrap()[0].clone();

        // Removed: gone from the guest and from the host.
        hv.nic_remove("hp1", &addr.id).await.unwrap();
        let out = serial
            .run(
                "sleep 1; ls /sys/class/net; echo nics-listed",
                Duration::from_secs(30),
            )
            .unwrap();
        assert!(!out.contains("eth0"), "{out}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while gkvm_tap::interface_exists(&tap) {
            assert!(Instant::now() < deadline, "{tap} outlived its NIC");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(paths.read_nics().unwrap().is_empty());
        assert!(matches!(
            hv.nic_remove("hp1", &addr.id).await,
            Err(Error::Hotplug { .. })
        ));
        assert_eq!(
            hv.info("hp1").await.unwrap().state,
            hv_kvm::InstanceState::Running
        );
        hv.stop("hp1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

#[test]
fn a_guest_that_never_releases_a_nic_keeps_it_and_runs_on() {
    let Some(env) = require("hotplug_timeout", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hpt");
    // A failing assertion kills every QEMU this test started.
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let mut config = common::node_config(dir.path(), &env.qemu);
    config.unplug_timeout = Duration::from_secs(2);
    let hv = KvmHypervisor::new(config);
    let br = Bridge::new("gkvmhpbr1");
    // No guest OS (SeaBIOS only): nothing answers the ACPI eject.
    let spec = common::guestless_spec("hp2");
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Running).await.unwrap();
        let placed = hv
            .nic_add(
                "hp2",
                NicSpec::new("52:54:00:00:71:01".parse().unwrap(), &br.0),
            )
            .await
            .unwrap();
        let id = placed.address.unwrap().id;
        let err = hv.nic_remove("hp2", &id).await.unwrap_err();
        assert!(
            matches!(&err, Error::Hotplug { step, .. } if *step == "wait for DEVICE_DELETED"),
            "{}",
            err.report()
        );
        // Still plugged, still recorded, still running.
        let paths = RunDir::new(dir.path().join("run")).instance("hp2").unwrap();
        let tap = paths.read_nics().unwrap()[0].clone();
        assert!(gkvm_tap::interface_exists(&tap));
        assert!(hv.migration_info("hp2").unwrap().contains(&id));
        assert_eq!(
            hv.info("hp2").await.unwrap().state,
            hv_kvm::InstanceState::Running
        );
        // A full PCI bus: slots up to 31 taken, the next NIC is refused
        // and leaves nothing.
        let mut added = 0;
        let err = loop {
            let mac = format!("52:54:00:00:72:{added:02x}");
            match hv
                .nic_add("hp2", NicSpec::new(mac.parse().unwrap(), &br.0))
                .await
            {
                Ok(_) => added += 1,
                Err(e) => break e,
            }
            assert!(added < 40, "the bus never filled");
        };
        assert!(
            err.report().contains("slot") || err.report().contains("NICs"),
            "{}",
            err.report()
        );
        hv.stop("hp2", hv_kvm::StopMode::Force).await.unwrap();
        assert!(!gkvm_tap::interface_exists(&tap));
    });
}

#[test]
fn a_hot_added_disk_shows_its_content_grows_and_goes_away() {
    let Some(env) = require("hotplug_disk", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hpd");
    // A failing assertion kills every QEMU this test started.
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let image = dir.path().join("data.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&image).unwrap();
        f.write_all(b"gkvm-hot-disk").unwrap();
        f.set_len(4 << 20).unwrap();
    }
    let spec = guest_spec(&env, "hpd1");
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(dir.path().join("run"))
            .instance("hpd1")
            .unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("hpd1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));

        // A path that does not exist: refused at blockdev-add, nothing
        // plugged, the record unchanged.
        let err = hv
            .disk_add(
                "hpd1",
                kvm_cmdline::DiskSpec::new(dir.path().join("missing.img")),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Hotplug { step, .. } if *step == "blockdev-add"),
            "{}",
            err.report()
        );
        assert!(!hv.migration_info("hpd1").unwrap().contains("missing.img"));

        let placed = hv
            .disk_add("hpd1", kvm_cmdline::DiskSpec::new(&image))
            .await
            .unwrap();
        let id = placed.address.unwrap().id;
        let out = serial
            .run(
                "for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/block/vda ] && break; sleep 1; done; \
                 cat /sys/block/vda/size; dd if=/dev/vda bs=13 count=1 2>/dev/null; echo",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(
            out.contains("8192") && out.contains("gkvm-hot-disk"),
            "{out}"
        );

        // Grown to 8 MiB: the guest sees the new size, the image grew.
        hv.disk_grow("hpd1", &id, 8 << 20).await.unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);
        let out = serial
            .run("sleep 1; cat /sys/block/vda/size", Duration::from_secs(30))
            .unwrap();
        assert!(out.contains("16384"), "{out}");
        assert!(hv.disk_grow("hpd1", &id, 1 << 20).await.is_err(), "shrunk");
        let err = hv
            .disk_grow("hpd1", &id, u64::MAX)
            .await
            .unwrap_err()
            .report();
        assert!(err.contains("beyond what QEMU can address"), "{err}");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);

        // Removed: gone from the guest and from the record.
        hv.disk_remove("hpd1", &id).await.unwrap();
        let out = serial
            .run(
                "sleep 1; ls /sys/block; echo listed",
                Duration::from_secs(30),
            )
            .unwrap();
        assert!(!out.contains("vda"), "{out}");
        assert!(!hv.migration_info("hpd1").unwrap().contains(&id));
        hv.stop("hpd1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

#[test]
fn a_nic_moves_to_another_bridge_without_an_unplug() {
    let Some(env) = require("hotplug_modify", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hpm");
    // A failing assertion kills every QEMU this test started.
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let (br1, br2) = (Bridge::new("gkvmhpbr3"), Bridge::new("gkvmhpbr4"));
    let master = |tap: &str| {
        std::fs::read_link(format!("/sys/class/net/{tap}/master"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    rt().block_on(async {
        hv.start(&common::guestless_spec("hpm1"), hv_kvm::StartMode::Running)
            .await
            .unwrap();
        hv.hotplug_supported("hpm1").await.unwrap();
        let nic = hv
            .nic_add(
                "hpm1",
                NicSpec::new("52:54:00:00:74:01".parse().unwrap(), &br1.0),
            )
            .await
            .unwrap();
        let id = nic.address.unwrap().id;
        let paths = RunDir::new(dir.path().join("run"))
            .instance("hpm1")
            .unwrap();
        let tap = paths.read_nics().unwrap()[0].clone();
        assert_eq!(master(&tap).as_deref(), Some(br1.0.as_str()));
        hv.nic_modify(
            "hpm1",
            &id,
            NicSpec::new("52:54:00:00:74:01".parse().unwrap(), &br2.0),
        )
        .await
        .unwrap();
        assert_eq!(master(&tap).as_deref(), Some(br2.0.as_str()));
        assert!(hv.migration_info("hpm1").unwrap().contains(&br2.0));
        // A bridge that does not exist: refused, the NIC stays on br2.
        assert!(hv
            .nic_modify(
                "hpm1",
                &id,
                NicSpec::new("52:54:00:00:74:01".parse().unwrap(), "gkvmnobr9")
            )
            .await
            .is_err());
        assert_eq!(master(&tap).as_deref(), Some(br2.0.as_str()));
        hv.stop("hpm1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

#[test]
fn a_disk_only_root_may_open_is_hot_added_to_a_qemu_that_dropped_root() {
    let Some(env) = require("hotplug_disk_fdset", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hpf");
    // A failing assertion kills every QEMU this test started.
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let image = dir.path().join("private.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    std::fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut spec = common::guestless_spec("hpf1");
    spec.hvparams.set_pair("security_model=user").unwrap();
    spec.hvparams.set_pair("security_domain=nobody").unwrap();
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let pid = hv.info("hpf1").await.unwrap().pid;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nobody = sh("id -u nobody");
        assert!(
            status.lines().any(
                |l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(nobody.trim())
            ),
            "QEMU does not run as nobody: {status}"
        );
        // QEMU (as nobody) cannot open the image; gkvm passes it in a
        // descriptor set.
        let placed = hv
            .disk_add("hpf1", kvm_cmdline::DiskSpec::new(&image))
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let id = placed.address.unwrap().id;
        let paths = RunDir::new(dir.path().join("run"))
            .instance("hpf1")
            .unwrap();
        let mut q =
            gkvm_qmp::blocking::Qmp::connect(&paths.qmp, gkvm_qmp::Options::default()).unwrap();
        let nodes = q
            .execute_raw(
                "query-named-block-nodes",
                Some(serde_json::json!({"flat": true})),
            )
            .unwrap()
            .to_string();
        assert!(
            nodes.contains(&id) && nodes.contains("/dev/fdset/"),
            "{nodes}"
        );
        let sets = q.execute_raw("query-fdsets", None).unwrap().to_string();
        assert!(sets.contains(&id), "{sets}");
        drop(q);
        // It grows through the descriptor.
        hv.disk_grow("hpf1", &id, 8 << 20).await.unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);
        hv.stop("hpf1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

#[test]
fn a_scsi_disk_is_hot_added_to_an_instance_started_without_disks() {
    let Some(env) = require("hotplug_scsi", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hps");
    // A failing assertion kills every QEMU this test started.
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let image = dir.path().join("scsi.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut spec = common::guestless_spec("hps1");
    spec.hvparams.set_pair("disk_type=scsi").unwrap();
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let placed = hv
            .disk_add("hps1", kvm_cmdline::DiskSpec::new(&image))
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let id = placed.address.unwrap().id;
        let paths = RunDir::new(dir.path().join("run"))
            .instance("hps1")
            .unwrap();
        let mut q = gkvm_qmp::blocking::Qmp::connect(&paths.qmp, gkvm_qmp::Options::default())
            .unwrap();
        let dev = q
            .execute_raw(
                "qom-get",
                Some(serde_json::json!({"path": format!("/machine/peripheral/{id}"), "property": "type"})),
            )
            .unwrap();
        assert_eq!(dev, "scsi-hd");
        drop(q);
        hv.stop("hps1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

/// Ganeti 3.1's SCSI disk types start and hot-plug on the SCSI controller,
/// under every `scsi_controller_type`; a CD-ROM of `cdrom_disk_type=scsi-cd`
/// is a SCSI CD-ROM. `scsi-block` and `scsi-generic` pass a host SCSI
/// device through: QEMU takes their arguments and refuses a plain file
/// (no SG_IO), which gkvm reports, leaving nothing behind.
#[test]
fn ganetis_scsi_disk_types_start_and_hot_plug() {
    let Some(env) = require("hotplug_scsi_types", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hpst");
    // A failing assertion kills every QEMU this test started.
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let image = |name: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        p
    };
    let cdrom = image("cd.iso");
    let qom_type = |name: &str, id: &str| {
        let paths = RunDir::new(dir.path().join("run")).instance(name).unwrap();
        let mut q =
            gkvm_qmp::blocking::Qmp::connect(&paths.qmp, gkvm_qmp::Options::default()).unwrap();
        q.execute_raw(
            "qom-get",
            Some(serde_json::json!({"path": format!("/machine/peripheral/{id}"), "property": "type"})),
        )
        .unwrap()
    };
    rt().block_on(async {
        for (n, (disk_type, controller, device)) in [
            ("scsi-hd", "lsi", "scsi-hd"),
            ("scsi-cd", "megasas", "scsi-cd"),
            ("scsi-hd", "virtio-scsi-pci", "scsi-hd"),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("hpst{n}");
            let mut spec = common::guestless_spec(&name);
            for pair in [
                format!("disk_type={disk_type}"),
                format!("scsi_controller_type={controller}"),
                "cdrom_disk_type=scsi-cd".into(),
                format!("cdrom2_image_path={}", cdrom.display()),
            ] {
                spec.hvparams.set_pair(&pair).unwrap();
            }
            let mut disk = kvm_cmdline::DiskSpec::new(image(&format!("{name}-0.img")));
            if disk_type == "scsi-cd" {
                disk.mode = kvm_cmdline::DiskMode::ReadOnly;
            }
            spec.disks.push(disk);
            hv.start(&spec, hv_kvm::StartMode::Paused)
                .await
                .unwrap_or_else(|e| panic!("{disk_type} on {controller}: {}", e.report()));
            assert_eq!(
                qom_type(&name, "disk0"),
                device,
                "{disk_type} on {controller}"
            );
            // The CD-ROM's device has no id: found by its block node.
            let paths = RunDir::new(dir.path().join("run")).instance(&name).unwrap();
            let mut q =
                gkvm_qmp::blocking::Qmp::connect(&paths.qmp, gkvm_qmp::Options::default()).unwrap();
            let blocks = q.execute_raw("query-block", None).unwrap();
            let qdev = blocks
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["inserted"]["node-name"] == "cdrom1")
                .map(|b| b["qdev"].as_str().unwrap().to_owned())
                .unwrap_or_else(|| panic!("no cdrom1 in {blocks}"));
            let cd = q
                .execute_raw(
                    "qom-get",
                    Some(serde_json::json!({"path": qdev, "property": "type"})),
                )
                .unwrap();
            assert_eq!(cd, "scsi-cd");
            drop(q);
            let mut hot = kvm_cmdline::DiskSpec::new(image(&format!("{name}-1.img")));
            if disk_type == "scsi-cd" {
                hot.mode = kvm_cmdline::DiskMode::ReadOnly;
            }
            let placed = hv
                .disk_add(&name, hot)
                .await
                .unwrap_or_else(|e| panic!("{disk_type} on {controller}: {}", e.report()));
            assert_eq!(qom_type(&name, &placed.address.unwrap().id), device);
            hv.stop(&name, hv_kvm::StopMode::Force).await.unwrap();
        }
        for disk_type in ["scsi-block", "scsi-generic"] {
            let mut spec = common::guestless_spec("hpstpt");
            spec.hvparams
                .set_pair(&format!("disk_type={disk_type}"))
                .unwrap();
            spec.disks
                .push(kvm_cmdline::DiskSpec::new(image("passthrough.img")));
            let err = hv
                .start(&spec, hv_kvm::StartMode::Paused)
                .await
                .unwrap_err()
                .report();
            assert!(err.contains(disk_type) && err.contains("SG_IO"), "{err}");
        }
        assert_eq!(hv.state_files(), Vec::<std::path::PathBuf>::new());
    });
}

/// A q35 machine started without root ports (as earlier releases started
/// it) has no hot-pluggable PCI slot: hotplug-supported says no and a NIC
/// is refused before anything is made, naming the machine; a SCSI disk
/// (on the controller's own bus) still hot-plugs.
#[test]
fn a_q35_machine_without_root_ports_refuses_pci_hot_plug_by_name() {
    let Some(env) = require("hotplug_q35", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hpq");
    // A failing assertion kills every QEMU this test started.
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let br = Bridge::new("gkvmhpbrq");
    let image = dir.path().join("q35.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut spec = common::guestless_spec("hpq1");
    spec.hvparams.set_pair("machine_version=q35").unwrap();
    spec.pcie_slots = Some(kvm_cmdline::PcieSlots::RootBus);
    spec.hvparams.set_pair("disk_type=scsi-hd").unwrap();
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let err = hv.hotplug_supported("hpq1").await.unwrap_err().report();
        assert!(err.contains("q35") && err.contains("hpq1"), "{err}");
        let paths = RunDir::new(dir.path().join("run"))
            .instance("hpq1")
            .unwrap();
        let err = hv
            .nic_add(
                "hpq1",
                NicSpec::new("52:54:00:00:75:01".parse().unwrap(), &br.0),
            )
            .await
            .unwrap_err()
            .report();
        assert!(err.contains("q35"), "{err}");
        assert!(paths.read_nics().unwrap().is_empty());
        assert!(std::fs::read_dir(format!("/sys/class/net/{}/brif", br.0))
            .unwrap()
            .next()
            .is_none());
        hv.disk_add("hpq1", kvm_cmdline::DiskSpec::new(&image))
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        hv.stop("hpq1", hv_kvm::StopMode::Force).await.unwrap();
        assert_eq!(hv.state_files(), Vec::<std::path::PathBuf>::new());
    });
}

/// A q35 instance gkvm starts has a root port at every free slot: a NIC
/// and a disk hot plug into the running guest, which sees them; they are
/// still there and working after a live migration (the destination makes
/// the same ports from the definition), and unplug from there.
#[test]
fn a_q35_guest_hot_plugs_a_nic_and_a_disk_and_keeps_them_across_a_migration() {
    let Some(env) = require("hotplug_q35_guest", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-hpq2");
    let dir_b = ScratchDir::new("gkvm-hpq2-b");
    let _guards = [
        gkvm_testkit::KillRunDir(dir.path().join("run")),
        gkvm_testkit::KillRunDir(dir_b.path().join("run")),
    ];
    let hv = KvmHypervisor::new({
        let mut c = common::node_config(dir.path(), &env.qemu);
        c.tap_template = "gkvmqpt%d".into();
        c
    });
    let hv_b = KvmHypervisor::new({
        let mut c = common::node_config(dir_b.path(), &env.qemu);
        c.tap_template = "gkvmqpu%d".into();
        c
    });
    let br = Bridge::new("gkvmqpbr0");
    sh("ip addr add 10.97.0.1/24 dev gkvmqpbr0");
    let image = dir.path().join("q35data.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&image).unwrap();
        f.write_all(b"gkvm-q35-disk").unwrap();
        f.set_len(4 << 20).unwrap();
    }
    let mut spec = guest_spec(&env, "hpq2");
    spec.hvparams.set_pair("machine_version=q35").unwrap();
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        hv.hotplug_supported("hpq2")
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let paths = RunDir::new(dir.path().join("run")).instance("hpq2").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("hpq2").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));

        let nic = hv
            .nic_add("hpq2", NicSpec::new("52:54:00:00:76:01".parse().unwrap(), &br.0))
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let nic_id = nic.address.unwrap().id;
        let disk = hv
            .disk_add("hpq2", kvm_cmdline::DiskSpec::new(&image))
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let disk_id = disk.address.unwrap().id;
        let out = serial
            .run(
                "for i in $(seq 30); do [ -e /sys/class/net/eth0 ] && [ -e /sys/block/vda ] && break; sleep 1; done; \
                 cat /sys/class/net/eth0/address; dd if=/dev/vda bs=13 count=1 2>/dev/null; echo; \
                 ip link set eth0 up && ip addr add 10.97.0.2/24 dev eth0 && ping -c 2 -W 5 10.97.0.1",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(out.contains("52:54:00:00:76:01"), "{out}");
        assert!(out.contains("gkvm-q35-disk"), "{out}");
        assert!(
            out.contains("2 packets received") || out.contains("1 packets received"),
            "{out}"
        );

        // Live migration: the destination's machine takes the guest's
        // state for the ports and the devices behind them.
        drop(serial);
        let port = 25000 + (std::process::id() % 1000) as u16;
        let info = hv.migration_info_live("hpq2").await.unwrap();
        hv_b.accept_instance(&info, "127.0.0.1", port)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        hv.migrate_to("hpq2", "127.0.0.1", port, hv_kvm::MigrationMode::Live, |_| {})
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        hv_b.wait_incoming("hpq2", Duration::from_secs(30)).await.unwrap();
        hv_b.finalize_migration_dst("hpq2", hv_kvm::MigrationOutcome::Completed)
            .await
            .unwrap();
        let paths_b = RunDir::new(dir_b.path().join("run")).instance("hpq2").unwrap();
        let mut serial = Serial::connect(&paths_b.serial, Duration::from_secs(5)).unwrap();
        let out = serial
            .run(
                "ping -c 2 -W 5 10.97.0.1; dd if=/dev/vda bs=13 count=1 2>/dev/null; echo",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(
            out.contains("2 packets received") || out.contains("1 packets received"),
            "the hot-added NIC does not work after the migration: {out}"
        );
        assert!(out.contains("gkvm-q35-disk"), "{out}");

        // Unplugged there: gone from the guest.
        hv_b.nic_remove("hpq2", &nic_id)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        hv_b.disk_remove("hpq2", &disk_id)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let out = serial
            .run(
                "for i in $(seq 30); do [ -e /sys/class/net/eth0 ] || [ -e /sys/block/vda ] || break; sleep 1; done; \
                 ls /sys/class/net /sys/block; echo listed",
                Duration::from_secs(60),
            )
            .unwrap();
        let listed = out.rsplit("/sys/block:").next().unwrap_or_default();
        assert!(
            !listed.contains("eth0") && !listed.contains("vda"),
            "{out}"
        );
        hv_b.stop("hpq2", hv_kvm::StopMode::Force).await.unwrap();
        assert!(paths_b.read_nics().unwrap_or_default().is_empty());
    });
}
