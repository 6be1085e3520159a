//! Hot-adding a NIC to a running guest-less instance (KVM): the facade's
//! `nic_add` (lock, definition, TAP, bridge, getfd, netdev_add,
//! device_add, record) against the same work by hand in the same run — a
//! TAP on the bridge and the same QMP commands on a fresh connection to a
//! bare QEMU of the same argv. Goal: ≤ 1.3×.

use gkvm_benches::{print_table, Row, Stats};
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, NicSpec, RunDir};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// NICs per instance (the limit is 8): then the instance is restarted.
const PER_INSTANCE: usize = 7;
const ROUNDS: usize = 3;

fn main() {
    if !gkvm_testkit::is_root() {
        println!("hotplug: skipped, needs root (TAPs, bridges)");
        return;
    }
    let Some(qemu) = gkvm_testkit::qemu_binary() else {
        println!("hotplug: skipped, no QEMU");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = gkvm_testkit::ScratchDir::new("gkvm-bh");
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

    let (mut facade, mut by_hand) = (Vec::new(), Vec::new());
    let mut mac = 0u8;
    let mut next_mac = || {
        mac += 1;
        format!("52:54:00:00:7a:{mac:02x}").parse().unwrap()
    };
    for _ in 0..ROUNDS {
        rt.block_on(hv.start(&spec, hv_kvm::StartMode::Running))
            .unwrap();
        for _ in 0..PER_INSTANCE {
            let nic = NicSpec::new(next_mac(), &br.0);
            let t = Instant::now();
            rt.block_on(hv.nic_add("bh1", nic)).unwrap();
            facade.push(t.elapsed());
        }
        rt.block_on(hv.stop("bh1", hv_kvm::StopMode::Force))
            .unwrap();

        // By hand: a bare QEMU of the same argv, the same steps.
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
        let st = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let sock = bare.join("ctrl/bh1.qmp");
        gkvm_qmp::blocking::Qmp::connect(&sock, gkvm_qmp::Options::default())
            .unwrap()
            .execute_raw("cont", None)
            .unwrap();
        for i in 0..PER_INSTANCE {
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
    print_table(
        "hot-add of a virtio NIC on a bridge, guest-less instance, same run",
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
        ],
    );
}
