//! Real QEMU 7.2 and 10.0 start every golden argv of kvm-cmdline (with
//! real TAP descriptors and TLS certificates), as libvirt's tests start
//! theirs: a golden that compares equal but that QEMU refuses is a bug.

use kvm_cmdline::InstanceSpec;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PROFILES: [&str; 2] = ["qemu-7.2", "qemu-10.0"];
const FILES: &str = "/tmp/gkvm-golden/files";

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kvm-cmdline/tests/data")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[derive(Deserialize)]
struct Variant {
    name: String,
    spec: InstanceSpec,
    launch: LaunchSpec,
}

#[derive(Deserialize)]
struct LaunchSpec {
    paused: bool,
    nic_queues: Vec<usize>,
    incoming: Option<String>,
}

fn variants() -> Vec<Variant> {
    serde_json::from_str(&read(&data().join("variants.json"))).unwrap()
}

fn node_dir(profile: &str, variant: &str) -> PathBuf {
    Path::new("/tmp/gkvm-golden").join(profile).join(variant)
}

/// The descriptor number NIC `nic`'s queue `q` gets in the child.
fn nic_fd(nic: usize, q: usize) -> i32 {
    i32::try_from(100 + 4 * nic + q).unwrap()
}

/// The descriptor number of NIC `nic`'s queue `q`'s vhost-net device.
fn vhost_fd(nic: usize, q: usize) -> i32 {
    i32::try_from(200 + 4 * nic + q).unwrap()
}

/// Why this node cannot start a golden, if it cannot: vhost-net goldens
/// need `/dev/vhost-net` (this project's CI machine has none; there the
/// goldens check the descriptor plumbing and `hv_lifecycle` checks the
/// error path).
fn not_startable_here(v: &Variant) -> Option<&'static str> {
    if v.spec.hvparams.firmware == kvm_cmdline::hvparams::Firmware::UefiSecboot && !kvm_has_smm() {
        // Secure Boot locks the variable store behind SMM; this machine's
        // nested KVM has none ("System Management Mode not supported by
        // this hypervisor").
        return Some("this node's KVM has no SMM");
    }
    if v.spec.hvparams.tpm != kvm_cmdline::hvparams::Tpm::None
        && !Path::new("/usr/bin/swtpm").exists()
    {
        return Some("no swtpm (Debian's swtpm)");
    }
    if v.name == "userspace-uris" {
        // Their servers are TEST-NET addresses; the NBD and HTTP goldens
        // are started against servers this test runs.
        return Some("needs Ceph, Gluster, iSCSI and HTTPS servers");
    }
    (kvm_cmdline::uses_vhost(&v.spec.hvparams) && !Path::new("/dev/vhost-net").exists())
        .then_some("no /dev/vhost-net on this node")
}

/// Whether this node's KVM emulates System Management Mode
/// (`KVM_CHECK_EXTENSION` of `KVM_CAP_X86_SMM`).
fn kvm_has_smm() -> bool {
    const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;
    const KVM_CAP_X86_SMM: libc::c_ulong = 117;
    let Ok(kvm) = std::fs::File::open("/dev/kvm") else {
        return false;
    };
    // SAFETY: KVM_CHECK_EXTENSION takes an integer and returns one.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&kvm),
            KVM_CHECK_EXTENSION,
            KVM_CAP_X86_SMM,
        )
    };
    r > 0
}

/// The servers the userspace goldens name: an NBD export of
/// `nbd.img` at 127.0.0.1:10899 (`golden`) and HTTP at 127.0.0.1:18099.
struct Servers {
    nbd: std::process::Child,
    _http: gkvm_testkit::HttpServer,
}

impl Servers {
    fn start() -> Servers {
        let nbd = std::process::Command::new("qemu-nbd")
            .args(["--persistent", "--shared=8", "-f", "raw", "-x", "golden"])
            .args(["-b", "127.0.0.1", "-p", "10899"])
            .arg(Path::new(FILES).join("nbd.img"))
            // Quiet about the readiness probe below, which hangs up early.
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils)");
        let http = gkvm_testkit::HttpServer::serve(Path::new(FILES), 18099).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect("127.0.0.1:10899").is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Servers { nbd, _http: http }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.nbd.kill();
        let _ = self.nbd.wait();
    }
}

// ---- real QEMU accepts every golden of the installed versions ----

fn installed(profile: &str) -> Option<PathBuf> {
    let candidate = match profile {
        "qemu-7.2" => gkvm_testkit::qemu_binary()?,
        _ => gkvm_testkit::target_dir().join("qemu-10.0/qemu-system-x86_64"),
    };
    let out = std::process::Command::new(&candidate)
        .arg("--version")
        .output()
        .ok()?;
    let want = format!("version {}.", profile.trim_start_matches("qemu-"));
    String::from_utf8_lossy(&out.stdout)
        .contains(&want)
        .then_some(candidate)
}

fn sh(cmd: &str) {
    let st = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

fn prepare_files(guest: &gkvm_testkit::Guest) {
    let f = Path::new(FILES);
    std::fs::create_dir_all(f.join("hugepages")).unwrap();
    std::fs::create_dir_all(f.join("vnc")).unwrap();
    for (name, size) in [
        ("disk0.img", 1 << 20),
        ("disk1.img", 1 << 20),
        ("disk,odd.img", 1 << 20),
        ("cd.iso", 1 << 20),
        ("cd2.iso", 1 << 20),
        ("cd,odd.iso", 1 << 20),
        ("floppy.img", 1_474_560),
        ("nbd.img", 1 << 20),
    ] {
        let file = std::fs::File::create(f.join(name)).unwrap();
        file.set_len(size).unwrap();
    }
    std::fs::copy(&guest.kernel, f.join("vmlinuz")).unwrap();
    std::fs::copy(&guest.initrd, f.join("initrd")).unwrap();
    std::fs::write(f.join("vnc.pass"), "secret\n").unwrap();
    std::fs::write(f.join("spice.pass"), "secret\n").unwrap();
    if !f.join("x509/server-key.pem").exists() {
        std::fs::create_dir_all(f.join("x509")).unwrap();
        sh(&format!(
            "cd {FILES}/x509 && openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=gkvm-test-ca \
             -keyout ca-key.pem -out ca-cert.pem 2>/dev/null && \
             openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server-key.pem -out server.csr 2>/dev/null && \
             openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 -out server-cert.pem 2>/dev/null && \
             cp ca-cert.pem ../spice-ca.pem && cat server-cert.pem server-key.pem > ../spice.pem"
        ));
    }
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let dead = match state {
            None => true,
            Some(s) => s
                .rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next())
                .is_some_and(|st| st == "Z"),
        };
        if dead {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts one golden argv (daemonized, -S), checks QMP answers, quits.
fn accept(profile: &str, qemu: &Path, v: &Variant) -> Result<(), String> {
    let argv_text = read(
        &data()
            .join(profile)
            .join("argv")
            .join(format!("{}.argv", v.name)),
    );
    let argv: Vec<&str> = argv_text.lines().collect();
    let dir = node_dir(profile, &v.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("chroot")).unwrap();
    std::fs::write(dir.join("keymap"), "include en-us\ninclude de\n").unwrap();
    std::fs::write(
        dir.join("events.in"),
        "{\"execute\":\"qmp_capabilities\"}\n",
    )
    .unwrap();
    std::fs::write(dir.join("events.out"), "").unwrap();
    if v.spec.hvparams.firmware != kvm_cmdline::hvparams::Firmware::Bios {
        // The instance's variable store, as hv-kvm makes it at a first start.
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.ms.fd", dir.join("nvram.fd"))
            .map_err(|e| format!("OVMF's variable store template: {e}"))?;
    }

    // The TPM's emulator, listening where the golden's QEMU connects
    // (ended by --terminate when QEMU goes, or below).
    let swtpm_pid = dir.join("swtpm.pid");
    if v.spec.hvparams.tpm != kvm_cmdline::hvparams::Tpm::None {
        std::fs::create_dir_all(dir.join("tpmstate")).unwrap();
        let st = std::process::Command::new("swtpm")
            .args(["socket", "--tpm2", "--terminate", "--daemon", "--tpmstate"])
            .arg(format!("dir={}", dir.join("tpmstate").display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", dir.join("tpm").display()))
            .arg("--pid")
            .arg(format!("file={}", swtpm_pid.display()))
            .status()
            .map_err(|e| format!("swtpm: {e}"))?;
        if !st.success() {
            return Err(format!("swtpm: {st}"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("tpm").exists() {
            if Instant::now() > deadline {
                return Err("swtpm did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // TAPs onto the descriptor numbers the golden names.
    let taps: Vec<gkvm_tap::Tap> = v
        .launch
        .nic_queues
        .iter()
        .map(|&q| {
            gkvm_tap::TapBuilder::new()
                .name_template("gkg%d")
                .queues(u16::try_from(q).unwrap())
                .open()
                .unwrap()
        })
        .collect();
    let mut moves: Vec<(i32, i32)> = Vec::new();
    let mut vhost = Vec::new();
    for (i, tap) in taps.iter().enumerate() {
        for (q, fd) in tap.fds().iter().enumerate() {
            moves.push((std::os::fd::AsRawFd::as_raw_fd(fd), nic_fd(i, q)));
            if kvm_cmdline::uses_vhost(&v.spec.hvparams) {
                let dev = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/vhost-net")
                    .map_err(|e| format!("/dev/vhost-net: {e}"))?;
                moves.push((std::os::fd::AsRawFd::as_raw_fd(&dev), vhost_fd(i, q)));
                vhost.push(dev);
            }
        }
    }
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    gkvm_testkit::pass_fds_at(&mut cmd, moves);
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("QEMU did not finish initializing within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let errors = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("QEMU refused it ({status}): {errors}"));
    }
    let pid: i32 = read(&dir.join("pid"))
        .trim()
        .parse()
        .map_err(|e| format!("pid file: {e}"))?;
    let result = (|| {
        let mut q = gkvm_qmp::blocking::Qmp::connect(dir.join("qmp"), gkvm_qmp::Options::default())
            .map_err(|e| e.to_string())?;
        let st = q
            .run(&gkvm_qmp::commands::QueryStatus)
            .map_err(|e| e.to_string())?;
        let want = if v.launch.incoming.is_some() {
            gkvm_qmp::commands::RunState::Inmigrate
        } else if v.launch.paused {
            gkvm_qmp::commands::RunState::Prelaunch
        } else {
            gkvm_qmp::commands::RunState::Running
        };
        if st.status != want {
            return Err(format!("state {:?}, expected {want:?}", st.status));
        }
        let cpus = q
            .run(&gkvm_qmp::commands::QueryCpusFast)
            .map_err(|e| e.to_string())?;
        if cpus.len() != v.spec.vcpus as usize {
            return Err(format!("{} vCPUs, expected {}", cpus.len(), v.spec.vcpus));
        }
        let _ = q.run(&gkvm_qmp::commands::Quit);
        Ok(())
    })();
    if !wait_gone(pid, Duration::from_secs(10)) {
        // SAFETY: killing the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid, Duration::from_secs(5));
    }
    if let Some(pid) = std::fs::read_to_string(&swtpm_pid)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    {
        if !wait_gone(pid, Duration::from_secs(5)) {
            // SAFETY: killing the swtpm this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_gone(pid, Duration::from_secs(5));
        }
    }
    drop(taps);
    drop(vhost);
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| format!("{e} (QEMU said: {})", errors.trim()))
}

#[test]
fn installed_qemu_accepts_every_golden() {
    let Some(env) = gkvm_testkit::require(
        "installed_qemu_accepts_every_golden",
        &[gkvm_testkit::Need::Root, gkvm_testkit::Need::Guest],
    ) else {
        return;
    };
    prepare_files(env.guest.as_ref().unwrap());
    let _servers = Servers::start();
    let mut ran = 0;
    let mut failures = Vec::new();
    for profile in PROFILES {
        let Some(qemu) = installed(profile) else {
            gkvm_testkit::skip(
                "installed_qemu_accepts_every_golden",
                &format!("{profile} is not installed (scripts/install-qemu10)"),
            );
            continue;
        };
        let start = Instant::now();
        let mut started = 0;
        for v in variants() {
            if let Some(why) = not_startable_here(&v) {
                eprintln!("{profile}/{}: not started: {why}", v.name);
                continue;
            }
            if let Err(e) = accept(profile, &qemu, &v) {
                failures.push(format!("{profile}/{}: {e}", v.name));
            }
            ran += 1;
            started += 1;
        }
        eprintln!(
            "{profile}: {started} of {} goldens started by real QEMU in {:?}",
            variants().len(),
            start.elapsed()
        );
    }
    if ran == 0 {
        gkvm_testkit::skip(
            "installed_qemu_accepts_every_golden",
            "neither QEMU 7.2 nor 10.0 is installed",
        );
    }
    assert!(
        failures.is_empty(),
        "QEMU rejected goldens:\n{}",
        failures.join("\n")
    );
}
