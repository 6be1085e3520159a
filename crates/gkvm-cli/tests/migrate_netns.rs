//! Two "nodes" on this machine: two network namespaces joined by a veth
//! pair, each with its own run directory, driven by the real `gkvm`
//! binary. A running guest migrates there and back across the link and
//! answers on its serial console after each hop.

use gkvm_testkit::{require, Env, Need, ScratchDir, Serial, READY_LINE};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Netns(Vec<String>);

impl Netns {
    fn pair(a: &str, b: &str, addr_a: &str, addr_b: &str) -> Netns {
        let sh = |cmd: &str| {
            let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
            assert!(st.success(), "{cmd}");
        };
        for n in [a, b] {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        let ns = Netns(vec![a.into(), b.into()]);
        sh(&format!("ip link add gkva type veth peer name gkvb && ip link set gkva netns {a} && ip link set gkvb netns {b}"));
        sh(&format!("ip -n {a} addr add {addr_a}/24 dev gkva && ip -n {a} link set gkva up && ip -n {a} link set lo up"));
        sh(&format!("ip -n {b} addr add {addr_b}/24 dev gkvb && ip -n {b} link set gkvb up && ip -n {b} link set lo up"));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

struct Node {
    ns: String,
    run: PathBuf,
    qemu: PathBuf,
}

impl Node {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns,
            env!("CARGO_BIN_EXE_gkvm"),
            "--run-dir",
        ])
        .arg(&self.run)
        .arg("--kvm-path")
        .arg(&self.qemu)
        .args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "gkvm {args:?} in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
    fn serial(&self, name: &str) -> PathBuf {
        self.run.join("ctrl").join(format!("{name}.serial"))
    }
    fn files(&self) -> Vec<PathBuf> {
        hv_kvm::KvmHypervisor::new(hv_kvm::Config::new(hv_kvm::RunDir::new(&self.run)))
            .state_files()
    }
}

fn instance_json(env: &Env, dir: &Path) -> PathBuf {
    let mut hvparams: serde_json::Map<String, serde_json::Value> = env
        .guest
        .as_ref()
        .unwrap()
        .hvparams()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    hvparams.insert("migration_bandwidth".into(), 1024.into());
    // The port a hop without one uses (Ganeti's migration_port).
    hvparams.insert("migration_port".into(), 8111.into());
    let spec = serde_json::json!({"name": "roamer", "memory": 128, "hvparams": hvparams});
    let p = dir.join("roamer.json");
    std::fs::write(&p, spec.to_string()).unwrap();
    p
}

/// Migrates `roamer` from `src` to `dst` listening on `addr:port`, or on
/// `addr` alone (the instance's migration_port).
fn hop(src: &Node, dst: &Node, addr: &str, port: Option<u16>, dir: &Path) {
    let info = src.run(&["migration-info", "roamer"]).stdout;
    let info_file = dir.join(format!("roamer-{}.mig", port.unwrap_or(0)));
    std::fs::write(&info_file, info).unwrap();
    let listen = match port {
        Some(p) => format!("{addr}:{p}"),
        None => addr.to_owned(),
    };
    let mut accept = dst.spawn(&[
        "accept",
        info_file.to_str().unwrap(),
        "--listen",
        &listen,
        "--timeout",
        "120",
    ]);
    // Wait until the destination QEMU is up and listening.
    let qmp = dst.run.join("ctrl/roamer.qmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qmp.exists() {
        assert!(Instant::now() < deadline, "accept did not start QEMU");
        if let Ok(Some(st)) = accept.try_wait() {
            panic!("accept exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    if port.is_none() {
        // Listening on the instance's migration_port.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &dst.ns, "ss", "-Hltn", "sport", "= :8111"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("8111") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on migration_port 8111"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let out = src.run(&["migrate", "roamer", "--to", &listen, "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON progress line"))
        .collect();
    assert_eq!(lines.last().unwrap()["status"], "completed", "{lines:?}");
    let accepted = accept.wait_with_output().unwrap();
    assert!(
        accepted.status.success(),
        "accept: {}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    // The source node holds nothing any more.
    assert_eq!(src.files(), Vec::<PathBuf>::new(), "left on {}", src.ns);
    let list: serde_json::Value =
        serde_json::from_slice(&src.run(&["list", "--json"]).stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);
}

#[test]
fn migrate_across_network_namespaces_and_back() {
    let Some(env) = require("migrate_across_netns", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-netns");
    let _ns = Netns::pair("gkvm-node-a", "gkvm-node-b", "10.231.77.1", "10.231.77.2");
    let a = Node {
        ns: "gkvm-node-a".into(),
        run: dir.path().join("a"),
        qemu: env.qemu.clone(),
    };
    let b = Node {
        ns: "gkvm-node-b".into(),
        run: dir.path().join("b"),
        qemu: env.qemu.clone(),
    };
    let spec = instance_json(&env, dir.path());
    a.run(&["start", "--file", spec.to_str().unwrap(), "--paused"]);
    let mut console = Serial::connect(&a.serial("roamer"), Duration::from_secs(5)).unwrap();
    a.run(&["resume", "roamer"]);
    console
        .wait_for(READY_LINE, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));

    hop(&a, &b, "10.231.77.2", None, dir.path());
    let mut console = Serial::connect(&b.serial("roamer"), Duration::from_secs(5)).unwrap();
    let out = console
        .run("echo on-b-$((3*3))", Duration::from_secs(30))
        .unwrap();
    assert!(out.contains("on-b-9"), "{out}");

    hop(&b, &a, "10.231.77.1", Some(8103), dir.path());
    let mut console = Serial::connect(&a.serial("roamer"), Duration::from_secs(5)).unwrap();
    let out = console
        .run("echo on-a-$((4*4))", Duration::from_secs(30))
        .unwrap();
    assert!(out.contains("on-a-16"), "{out}");

    a.run(&["stop", "roamer", "--force"]);
    assert_eq!(a.files(), Vec::<PathBuf>::new());
}
