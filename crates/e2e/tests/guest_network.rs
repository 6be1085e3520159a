//! NIC modes configured natively (no NIC script on the node), seen from
//! the booted test guest (TCG): a routed NIC reaches the host over the
//! host route gkvm made, a routed NIC in its own table gets its rule, an
//! Open vSwitch NIC reaches the host over its access VLAN; what the kernel
//! would keep (the rule, the switch ports) goes with them on stop.

mod common;
use common::{guest_spec, rt, sh};
use gkvm_testkit::{require, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::RunDir;
use kvm_cmdline::{NicMode, NicSpec};
use std::time::Duration;

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
    let hv = common::node(dir.path(), &env.qemu);
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

/// An Open vSwitch for the test: its own database, `ovsdb-server` and
/// `ovs-vswitchd` on the default socket (gkvm runs plain `ovs-vsctl`),
/// and a bridge on the userspace datapath (this machine's kernel has no
/// openvswitch module; the datapath does not change what gkvm does).
struct Ovs {
    dir: ScratchDir,
    bridge: String,
}

impl Ovs {
    fn start(bridge: &str) -> Ovs {
        let dir = ScratchDir::new("gkvm-ovs");
        let d = dir.path().display();
        let run = |cmd: &str| {
            let st = std::process::Command::new("sh")
                .args(["-c", cmd])
                .status()
                .unwrap();
            assert!(st.success(), "{cmd}");
        };
        run(&format!(
            "mkdir -p /var/run/openvswitch && \
             ovsdb-tool create {d}/conf.db /usr/share/openvswitch/vswitch.ovsschema && \
             ovsdb-server --remote=punix:/var/run/openvswitch/db.sock --pidfile={d}/db.pid \
               --detach --log-file={d}/db.log {d}/conf.db 2>/dev/null && \
             ovs-vsctl --no-wait init && \
             ovs-vswitchd --pidfile={d}/vswitchd.pid --detach --log-file={d}/vswitchd.log 2>/dev/null && \
             ovs-vsctl --timeout=10 add-br {bridge} -- set bridge {bridge} datapath_type=netdev"
        ));
        Ovs {
            dir,
            bridge: bridge.to_owned(),
        }
    }

    fn vsctl(&self, args: &str) -> String {
        sh(&format!("ovs-vsctl --timeout=10 {args}"))
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        let d = self.dir.path().display();
        sh(&format!(
            "ovs-vsctl --timeout=5 --if-exists del-br {b}; \
             kill $(cat {d}/vswitchd.pid) $(cat {d}/db.pid) 2>/dev/null; \
             ip link del {b} 2>/dev/null; true",
            b = self.bridge
        ));
    }
}

#[test]
fn openvswitch_nics_join_the_switch_with_their_vlan() {
    let Some(env) = require("guest_ovs", &[Need::Root, Need::Guest]) else {
        return;
    };
    let ovs = Ovs::start("gkovs0");
    // The host's side of VLAN 10: the bridge's own port, tagged.
    sh("ip addr add 10.97.0.1/24 dev gkovs0 && ip link set gkovs0 up");
    ovs.vsctl("set port gkovs0 tag=10");
    let dir = ScratchDir::new("gkvm-ovsg");
    let hv = common::node(dir.path(), &env.qemu);
    let mut spec = guest_spec(&env, "ovs1");
    let mut access = NicSpec::new("52:54:00:00:60:01".parse().unwrap(), "gkovs0");
    access.mode = NicMode::Openvswitch;
    access.vlan = Some(".10".into());
    let mut trunk = NicSpec::new("52:54:00:00:60:02".parse().unwrap(), "gkovs0");
    trunk.mode = NicMode::Openvswitch;
    trunk.vlan = Some(":20:30".into());
    spec.nics.extend([access, trunk]);
    rt().block_on(async {
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let (t0, t1) = (&report.taps[0], &report.taps[1]);
        let ports = ovs.vsctl("list-ports gkovs0");
        assert!(
            ports.contains(t0.as_str()) && ports.contains(t1.as_str()),
            "{ports}"
        );
        assert_eq!(ovs.vsctl(&format!("get port {t0} tag")).trim(), "10");
        assert_eq!(
            ovs.vsctl(&format!("get port {t1} trunks")).trim(),
            "[20, 30]"
        );

        let paths = RunDir::new(dir.path().join("run"))
            .instance("ovs1")
            .unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("ovs1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = serial
            .run(
                "ip addr add 10.97.0.2/24 dev eth0 && ping -c 2 -W 5 10.97.0.1",
                Duration::from_secs(40),
            )
            .unwrap();
        assert!(
            out.contains("2 packets received") || out.contains("1 packets received"),
            "the guest did not reach the host over VLAN 10:\n{out}"
        );
        hv.stop("ovs1", hv_kvm::StopMode::Force).await.unwrap();
        let ports = ovs.vsctl("list-ports gkovs0");
        assert!(
            !ports.contains(t0.as_str()) && !ports.contains(t1.as_str()),
            "ports outlived their TAPs: {ports}"
        );
    });
}
