//! NIC modes configured natively (no NIC script on the node), seen from
//! the booted test guest (TCG): a routed NIC reaches the host over the
//! host route gkvm made, and a routed NIC in its own table gets its rule,
//! which goes with it on stop.

mod common;
use common::{guest_spec, rt};
use gkvm_testkit::{require, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::{Config, KvmHypervisor, RunDir};
use kvm_cmdline::{NicMode, NicSpec};
use std::time::Duration;

fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A host address on `lo` for the guest to reach, removed when dropped.
struct HostAddress(&'static str);

impl HostAddress {
    fn add(addr: &'static str) -> HostAddress {
        sh(&format!("ip addr add {addr}/32 dev lo 2>/dev/null"));
        HostAddress(addr)
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        sh(&format!("ip addr del {}/32 dev lo 2>/dev/null", self.0));
    }
}

fn routed(mac: &str, ip: &str, table: &str) -> NicSpec {
    let mut nic = NicSpec::new(mac.parse().unwrap(), table);
    nic.mode = NicMode::Routed;
    nic.ip = Some(ip.into());
    nic
}

#[test]
fn routed_nics_reach_the_host_over_their_routes() {
    let Some(env) = require("guest_routed", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-routed");
    let mut config = Config::new(RunDir::new(dir.path().join("run")));
    config.kvm_path = Some(env.qemu.clone());
    config.caps_cache_dir = Some(dir.path().join("caps"));
    let hv = KvmHypervisor::new(config);
    let _host = HostAddress::add("10.98.0.1");
    let table = 100 + std::process::id() % 100;
    let mut spec = guest_spec(&env, "routed1");
    spec.nics.push(routed("52:54:00:00:50:01", "10.99.0.2", ""));
    spec.nics
        .push(routed("52:54:00:00:50:02", "10.99.1.2", &table.to_string()));
    rt().block_on(async {
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let (t0, t1) = (&report.taps[0], &report.taps[1]);
        // The host's side, as Ganeti's net-routed-up leaves it.
        let main = sh("ip route show proto static");
        assert!(main.contains(&format!("10.99.0.2 dev {t0}")), "{main}");
        let in_table = sh(&format!("ip route show table {table}"));
        assert!(
            in_table.contains(&format!("10.99.1.2 dev {t1}")),
            "{in_table}"
        );
        let rules = sh("ip rule show");
        assert!(
            rules.contains(&format!("iif {t1} lookup {table}")),
            "{rules}"
        );
        for tap in [t0, t1] {
            let proxy = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{tap}/proxy_arp"))
                .unwrap();
            assert_eq!(proxy.trim(), "1", "{tap}");
        }

        let paths = RunDir::new(dir.path().join("run"))
            .instance("routed1")
            .unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("routed1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = serial
            .run(
                "ip addr add 10.99.0.2/32 dev eth0 && ip route add 10.98.0.1/32 dev eth0 \
                 && ping -c 2 -W 5 10.98.0.1",
                Duration::from_secs(40),
            )
            .unwrap();
        assert!(
            out.contains("2 packets received") || out.contains("1 packets received"),
            "the guest did not reach the host over its route:\n{out}"
        );

        hv.stop("routed1", hv_kvm::StopMode::Force).await.unwrap();
        let rules = sh("ip rule show");
        assert!(
            !rules.contains(&format!("iif {t1} ")),
            "the table rule outlived the NIC: {rules}"
        );
        assert!(!sh("ip route show proto static").contains("10.99.0.2"));
    });
}

#[test]
fn an_openvswitch_nic_without_open_vswitch_is_a_clear_error() {
    let Some(env) = require("guest_ovs_missing", &[Need::Root, Need::Qemu]) else {
        return;
    };
    if !sh("command -v ovs-vsctl").trim().is_empty() {
        // Open vSwitch is installed here: the error path does not apply.
        return;
    }
    let dir = ScratchDir::new("gkvm-ovs");
    let mut config = Config::new(RunDir::new(dir.path().join("run")));
    config.kvm_path = Some(env.qemu.clone());
    config.caps_cache_dir = Some(dir.path().join("caps"));
    let hv = KvmHypervisor::new(config);
    let mut spec = common::guestless_spec("ovs1");
    let mut nic = NicSpec::new("52:54:00:00:50:09".parse().unwrap(), "br-int");
    nic.mode = NicMode::Openvswitch;
    nic.vlan = Some(".10".into());
    spec.nics.push(nic);
    let err = rt()
        .block_on(hv.start(&spec, hv_kvm::StartMode::Paused))
        .unwrap_err()
        .report();
    assert!(
        err.contains("ovs1") && err.contains("openvswitch") && err.contains("ovs-vsctl"),
        "{err}"
    );
    assert!(hv.state_files().is_empty(), "{:?}", hv.state_files());
}
