//! Hot-adding a NIC and a disk to a running guest-less instance (KVM): the
//! facade's `nic_add` (lock, definition, TAP, bridge, getfd, netdev_add,
//! device_add, record) and `disk_add` (lock, definition, blockdev-add,
//! device_add, record) against the same work by hand in the same run — a
//! TAP on the bridge and the same QMP commands on a fresh connection to a
//! bare QEMU of the same argv. Goal: ≤ 1.3×.

use gkvm_benches::{print_table, Row, Stats};
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, NicSpec, RunDir};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// NICs, and disks, per instance (the limit is 8 NICs): then the instance
/// is restarted.
const PER_INSTANCE: usize = 7;
const ROUNDS: usize = 6;

fn main() {
    if !gkvm_testkit::is_root() {
        println!("hotplug: skipped, needs root (TAPs, bridges)");
        return;
    }
    let Some(qemu) = gkvm_testkit::qemu_binary() else {
        println!("hotplug: skipped, no QEMU");
        return;
    };
    // The runtime the gkvm CLI runs its operations on.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Run directories on tmpfs, as a node's /run is (this machine's is on
    // disk); the images stay on disk.
    let dir = gkvm_testkit::ScratchDir::on_tmpfs("gkvm-bh");
    let _kill = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let mut config = Config::new(RunDir::new(dir.path().join("run")));
    config.kvm_path = Some(qemu.clone());
    config.caps_cache_dir = Some(dir.path().join("caps"));
    let hv = KvmHypervisor::new(config);
    let br = gkvm_testkit::Bridge::new("gkvmbhbr0");
    let mut spec = InstanceSpec::new("bh1", 64);
    spec.hvparams
        .set_pair(gkvm_testkit::guestless_kvm_flag())
        .unwrap();

    // Two sets of images (on disk): both QEMUs run at once and lock what
    // they open.
    let image_dir = gkvm_testkit::ScratchDir::new("gkvm-bh-img");
    let images = |set: &str| -> Vec<std::path::PathBuf> {
        (0..PER_INSTANCE)
            .map(|i| {
                let p = image_dir.path().join(format!("{set}{i}.img"));
                std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
                p
            })
            .collect()
    };
    let (gkvm_images, bare_images) = (images("gkvm"), images("bare"));
    let caps = rt.block_on(hv.capabilities(&qemu)).unwrap();
    // The bare disks' QMP arguments are those gkvm sends (the pure builder).
    let mut with_disks = spec.clone();
    with_disks.hvparams.kvm_path = qemu.clone();
    for image in &bare_images {
        with_disks.disks.push(hv_kvm::DiskSpec::new(image));
    }
    with_disks.assign_addresses().unwrap();

    let (mut facade, mut by_hand) = (Vec::new(), Vec::new());
    let (mut disk_facade, mut disk_by_hand) = (Vec::new(), Vec::new());
    let mut mac = 0u8;
    let mut next_mac = || {
        mac += 1;
        format!("52:54:00:00:7a:{mac:02x}").parse().unwrap()
    };
    for _ in 0..ROUNDS {
        // A bare QEMU of the same argv beside gkvm's instance; the two
        // are measured in turns.
        let argv = rt.block_on(hv.plan(&spec)).unwrap().argv;
        let bare = dir.path().join("bare");
        let argv: Vec<String> = argv
            .iter()
            .map(|a| {
                a.replace(
                    &dir.path().join("run").display().to_string(),
                    &bare.display().to_string(),
                )
            })
            .collect();
        for sub in ["pid", "ctrl", "log"] {
            std::fs::create_dir_all(bare.join(sub)).unwrap();
        }
        // The files gkvm prepares before a launch (its event log).
        RunDir::new(&bare)
            .instance("bh1")
            .unwrap()
            .prepare_event_log()
            .unwrap();
        let st = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let sock = bare.join("ctrl/bh1.qmp");
        // Both stay paused (vCPUs of two guest-less machines would only
        // compete with the measurement on two cores).
        rt.block_on(hv.start(&spec, hv_kvm::StartMode::Paused))
            .unwrap();

        for i in 0..PER_INSTANCE {
            let nic = NicSpec::new(next_mac(), &br.0);
            let t = Instant::now();
            rt.block_on(hv.nic_add("bh1", nic)).unwrap();
            facade.push(t.elapsed());

            let id = format!("nic-bare{i}");
            let t = Instant::now();
            // One connection per operation, as each facade call makes.
            let mut q =
                gkvm_qmp::blocking::Qmp::connect(&sock, gkvm_qmp::Options::default()).unwrap();
            let tap = gkvm_tap::TapBuilder::new()
                .name_template("gkbh%d")
                .vnet_hdr(gkvm_tap::VnetHdr::Auto)
                .open()
                .unwrap();
            gkvm_tap::set_link_up(tap.name()).unwrap();
            gkvm_tap::bridge_add_interface(&br.0, tap.name()).unwrap();
            let fd = tap.fds()[0].as_fd();
            q.run_with_fds(&gkvm_qmp::commands::GetFd { fdname: id.clone() }, &[fd])
                .unwrap();
            q.execute_raw(
                "netdev_add",
                Some(serde_json::json!({"type": "tap", "id": id, "fd": id})),
            )
            .unwrap();
            q.execute_raw(
                "device_add",
                Some(serde_json::json!({
                    "driver": "virtio-net-pci", "id": id, "netdev": id,
                    "mac": format!("52:54:00:00:7b:{i:02x}"),
                    "addr": format!("{:#04x}", 12 + i),
                })),
            )
            .unwrap();
            by_hand.push(t.elapsed());
        }
        for (i, image) in gkvm_images.iter().enumerate() {
            let t = Instant::now();
            rt.block_on(hv.disk_add("bh1", hv_kvm::DiskSpec::new(image)))
                .unwrap();
            disk_facade.push(t.elapsed());

            let (node, device) = kvm_cmdline::hotplug_disk(&with_disks, &caps, i).unwrap();
            let (node, mut device) = (node.qmp_arguments(), device.qmp_arguments());
            // Slots after the NICs added by hand.
            device["addr"] = format!("{:#04x}", 12 + PER_INSTANCE + i).into();
            let t = Instant::now();
            let q = gkvm_qmp::blocking::Qmp::connect(&sock, gkvm_qmp::Options::default());
            let mut q = q.unwrap();
            q.execute_raw("blockdev-add", Some(node)).unwrap();
            q.execute_raw("device_add", Some(device)).unwrap();
            disk_by_hand.push(t.elapsed());
        }
        rt.block_on(hv.stop("bh1", hv_kvm::StopMode::Force))
            .unwrap();
        gkvm_qmp::blocking::Qmp::connect(&sock, gkvm_qmp::Options::default())
            .unwrap()
            .execute_raw("quit", None)
            .ok();
        let pid_gone = Instant::now() + Duration::from_secs(5);
        while bare.join("pid/bh1").exists() && Instant::now() < pid_gone {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&bare);
    }
    let (f, b) = (Stats::of(facade), Stats::of(by_hand));
    let (df, db) = (Stats::of(disk_facade), Stats::of(disk_by_hand));
    print_table(
        "hot-add of a virtio NIC on a bridge, and of a 1 MiB raw virtio disk, guest-less instance, same run",
        &[
            Row {
                name: "by hand: TAP, bridge, getfd, netdev_add, device_add".into(),
                stats: b,
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm nic_add (facade, to QEMU's confirmation)".into(),
                stats: f,
                baseline: Some(b.median),
                goal: Some(1.3),
            },
            Row {
                name: "by hand: blockdev-add, device_add".into(),
                stats: db,
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm disk_add (facade, to QEMU's confirmation)".into(),
                stats: df,
                baseline: Some(db.median),
                goal: Some(1.3),
            },
        ],
    );
}
