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
        Netns::pair_via(a, b, addr_a, addr_b, ("gkva", "gkvb"))
    }

    fn pair_via(a: &str, b: &str, addr_a: &str, addr_b: &str, veth: (&str, &str)) -> Netns {
        let (va, vb) = veth;
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
        sh(&format!("ip link add {va} type veth peer name {vb} && ip link set {va} netns {a} && ip link set {vb} netns {b}"));
        sh(&format!("ip -n {a} addr add {addr_a}/24 dev {va} && ip -n {a} link set {va} up && ip -n {a} link set lo up"));
        sh(&format!("ip -n {b} addr add {addr_b}/24 dev {vb} && ip -n {b} link set {vb} up && ip -n {b} link set lo up"));
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
    /// A node configuration file (`--node-config`), if any.
    config: Option<PathBuf>,
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
        .arg(&self.qemu);
        if let Some(config) = &self.config {
            c.arg("--node-config").arg(config);
        }
        c.args(args);
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

/// Waits until `accept` on `dst` has started the destination QEMU (its
/// QMP socket is there); panics if accept exits first or takes 30 s.
fn wait_for_incoming_qemu(dst: &Node, accept: &mut Child) {
    let qmp = dst.run.join("ctrl/roamer.qmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qmp.exists() {
        assert!(Instant::now() < deadline, "accept did not start QEMU");
        if let Ok(Some(st)) = accept.try_wait() {
            panic!("accept exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
        "--trust-unsealed",
    ]);
    wait_for_incoming_qemu(dst, &mut accept);
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
    // A failing assertion kills every QEMU this test started.
    let _guards = ["a", "b"].map(|r| gkvm_testkit::KillRunDir(dir.path().join(r)));
    let _ns = Netns::pair("gkvm-node-a", "gkvm-node-b", "10.231.77.1", "10.231.77.2");
    let a = Node {
        ns: "gkvm-node-a".into(),
        run: dir.path().join("a"),
        qemu: env.qemu.clone(),
        config: None,
    };
    let b = Node {
        ns: "gkvm-node-b".into(),
        run: dir.path().join("b"),
        qemu: env.qemu.clone(),
        config: None,
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

/// Migration TLS credentials for a node at `ip`, signed by the CA in
/// `ca` (made if missing), in `dir` as QEMU's tls-creds-x509 wants them;
/// and a node configuration naming them.
fn tls_node_config(ca: &Path, dir: &Path, ip: &str) -> PathBuf {
    let sh = |cmd: String| {
        let st = Command::new("sh").args(["-c", &cmd]).status().unwrap();
        assert!(st.success(), "{cmd}");
    };
    let quiet = "2>/dev/null";
    std::fs::create_dir_all(ca).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (ca, d) = (ca.display(), dir.display());
    sh(format!(
        "cd {ca} && [ -f ca-cert.pem ] || openssl req -x509 -newkey rsa:2048 -nodes -days 2 \
           -subj /CN=gkvm-test-ca -keyout ca-key.pem -out ca-cert.pem {quiet}"
    ));
    for role in ["server", "client"] {
        sh(format!(
            "cd {d} && openssl req -newkey rsa:2048 -nodes -subj /CN={ip} -keyout {role}-key.pem \
               -out {role}.csr {quiet} && printf 'subjectAltName=IP:{ip}\\n' > {role}.ext && \
             openssl x509 -req -in {role}.csr -CA {ca}/ca-cert.pem -CAkey {ca}/ca-key.pem \
               -CAcreateserial -days 2 -extfile {role}.ext -out {role}-cert.pem {quiet}"
        ));
    }
    sh(format!(
        "cp {ca}/ca-cert.pem {d}/ca-cert.pem && chmod 600 {d}/*-key.pem"
    ));
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!("migration_tls_dir = {:?}\n", dir.to_str().unwrap()),
    )
    .unwrap();
    config
}

#[test]
fn migrate_over_tls_and_refuse_a_wrong_certificate() {
    let Some(env) = require("migrate_over_tls", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-tls");
    let _guards = ["a", "b", "b-plain"].map(|r| gkvm_testkit::KillRunDir(dir.path().join(r)));
    let _ns = Netns::pair_via(
        "gkvm-tls-a",
        "gkvm-tls-b",
        "10.232.77.1",
        "10.232.77.2",
        ("gkta", "gktb"),
    );
    let (ca, other_ca) = (dir.path().join("ca"), dir.path().join("other-ca"));
    let node = |ns: &str, run: &str, config: Option<PathBuf>| Node {
        ns: ns.into(),
        run: dir.path().join(run),
        qemu: env.qemu.clone(),
        config,
    };
    let a = node(
        "gkvm-tls-a",
        "a",
        Some(tls_node_config(
            &ca,
            &dir.path().join("tls-a"),
            "10.232.77.1",
        )),
    );
    let b = node(
        "gkvm-tls-b",
        "b",
        Some(tls_node_config(
            &ca,
            &dir.path().join("tls-b"),
            "10.232.77.2",
        )),
    );
    let spec = instance_json(&env, dir.path());
    a.run(&["start", "--file", spec.to_str().unwrap(), "--paused"]);
    let mut console = Serial::connect(&a.serial("roamer"), Duration::from_secs(5)).unwrap();
    a.run(&["resume", "roamer"]);
    console
        .wait_for(READY_LINE, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));
    let info = dir.path().join("roamer.mig");
    std::fs::write(&info, a.run(&["migration-info", "roamer"]).stdout).unwrap();

    // A destination without certificates refuses at once.
    let plain = node("gkvm-tls-b", "b-plain", None);
    let out = plain
        .cmd(&[
            "accept",
            info.to_str().unwrap(),
            "--listen",
            "10.232.77.2:8120",
            "--trust-unsealed",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("over TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A destination whose certificate another CA signed: the source's QEMU
    // refuses it, and the source keeps running.
    let wrong = node(
        "gkvm-tls-b",
        "b-wrong",
        Some(tls_node_config(
            &other_ca,
            &dir.path().join("tls-wrong"),
            "10.232.77.2",
        )),
    );
    let mut accept = wrong.spawn(&[
        "accept",
        info.to_str().unwrap(),
        "--listen",
        "10.232.77.2:8121",
        "--timeout",
        "60",
        "--trust-unsealed",
    ]);
    wait_for_incoming_qemu(&wrong, &mut accept);
    std::thread::sleep(Duration::from_millis(300));
    let out = a
        .cmd(&["migrate", "roamer", "--to", "10.232.77.2:8121"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a migration to a wrong certificate succeeded"
    );
    // The destination waits on (its listener survives a failed handshake)
    // until the cluster gives up on it: SIGTERM rolls it back.
    // SAFETY: signalling the accept this test spawned.
    unsafe { libc::kill(i32::try_from(accept.id()).unwrap(), libc::SIGTERM) };
    let status = accept.wait().unwrap();
    assert!(!status.success());
    assert_eq!(wrong.files(), Vec::<PathBuf>::new());
    let list: serde_json::Value =
        serde_json::from_slice(&a.run(&["list", "--json"]).stdout).unwrap();
    assert_eq!(list[0]["state"], "running", "{list}");
    let out = console
        .run("echo still-on-a", Duration::from_secs(30))
        .unwrap();
    assert!(out.contains("still-on-a"), "{out}");

    // The right certificates: over TLS, there and answering.
    hop(&a, &b, "10.232.77.2", Some(8122), dir.path());
    let pid: i32 = std::fs::read_to_string(b.run.join("pid/roamer"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let argv = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        argv.contains("migration.tls-creds=gkvm-migtls-in"),
        "{argv}"
    );
    let mut console = Serial::connect(&b.serial("roamer"), Duration::from_secs(5)).unwrap();
    let out = console
        .run("echo on-b-over-tls", Duration::from_secs(30))
        .unwrap();
    assert!(out.contains("on-b-over-tls"), "{out}");
    b.run(&["stop", "roamer", "--force"]);
}
