//! Where users feel speed: the `gkvm` CLI as a process and the facade
//! in-process against bare QEMU, all measured in this one run. Guest-less
//! 128 MiB instances on KVM when usable; list and info run against paused
//! instances (running guest-less QEMUs spin the host's 2 CPUs and would
//! measure contention); the boot and ACPI rows boot the test guest under
//! TCG (this host's nested KVM cannot run Linux). Prints one table; asserts
//! nothing. Needs `target/release/gkvm` (`scripts/bench-speed` builds it).

use gkvm_benches::{measure, print_table, raw_qmp, Row, Stats};
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir, StartMode, StopMode};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const N: usize = 10;
const READY: &str = "gkvm-test-guest: ready";

fn accel() -> &'static str {
    if gkvm_testkit::guestless_accel() == "kvm" {
        "enabled"
    } else {
        "disabled"
    }
}

/// Waits until every thread of `pid` has exited, as gkvm does (its pidfd
/// turns readable then; `/proc` shows the leader a zombie earlier, while
/// the other threads still tear the VM down and hold its descriptors).
fn wait_gone(pid: i32) {
    // SAFETY: pidfd_open(2); the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return;
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd on this stack; then close our fd.
    unsafe {
        libc::poll(&mut pfd, 1, 10_000);
        libc::close(fd);
    }
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

struct Bench {
    gkvm: PathBuf,
    qemu: PathBuf,
    dir: PathBuf,
}

impl Bench {
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn gkvm(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(&self.gkvm)
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--kvm-path")
            .arg(&self.qemu)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gkvm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn start(&self, name: &str, paused: bool) {
        let accel = format!("kvm_flag={}", accel());
        let mut args = vec!["start", name, "--memory", "128", "-H", &accel];
        if paused {
            args.push("--paused");
        }
        self.gkvm(&args);
    }

    fn facade(&self) -> KvmHypervisor {
        let mut c = Config::new(RunDir::new(self.run_dir()));
        c.kvm_path = Some(self.qemu.clone());
        KvmHypervisor::new(c)
    }

    /// Starts `argv` (it daemonizes with `-S`), waits for QMP and `cont`.
    fn bare_start(&self, argv: &[String], qmp: &Path) {
        let st = Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{argv:?}");
        raw_qmp(qmp, &["cont"]);
    }
}

/// The argv gkvm would run for `name`, pointed at `dir` for its files.
fn gkvm_argv(rt: &tokio::runtime::Runtime, b: &Bench, name: &str) -> Vec<String> {
    let mut spec = InstanceSpec::new(name, 128);
    spec.hvparams
        .set_pair(&format!("kvm_flag={}", accel()))
        .unwrap();
    let bare = Bench {
        gkvm: b.gkvm.clone(),
        qemu: b.qemu.clone(),
        dir: b.dir.join("bare"),
    };
    RunDir::new(bare.run_dir()).ensure().unwrap();
    // QEMU's log (`-D`), whose directory gkvm makes at its starts.
    std::fs::create_dir_all(bare.run_dir().join("log")).unwrap();
    rt.block_on(bare.facade().plan(&spec)).unwrap().argv
}

/// A minimal argv of the same machine, as a person would type it.
fn minimal_argv(qemu: &Path, dir: &Path) -> Vec<String> {
    let accel = if accel() == "enabled" { "kvm" } else { "tcg" };
    [
        qemu.to_str().unwrap(),
        "-nodefaults",
        "-machine",
        &format!("pc,accel={accel}"),
        "-m",
        "128",
        "-display",
        "none",
        "-daemonize",
        "-pidfile",
        dir.join("pid").to_str().unwrap(),
        "-qmp",
        &format!("unix:{},server=on,wait=off", dir.join("qmp").display()),
        "-S",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn main() {
    let (Some(qemu), true) = (gkvm_testkit::qemu_binary(), gkvm_testkit::is_root()) else {
        println!("speed: skipped (needs root and QEMU: scripts/install-deps)");
        return;
    };
    let gkvm = gkvm_testkit::target_dir().join("release/gkvm");
    if !gkvm.exists() {
        println!(
            "speed: skipped, no {} (scripts/bench-speed builds it)",
            gkvm.display()
        );
        return;
    }
    let tmp = gkvm_testkit::ScratchDir::new("gkvm-bench-speed");
    let _guard = gkvm_testkit::KillRunDir(tmp.path().join("run"));
    let b = Bench {
        gkvm,
        qemu,
        dir: tmp.path().to_owned(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    start_rows(&b, &rt, &mut rows);
    query_rows(&b, &rt, &mut rows);
    stop_rows(&b, &mut rows);
    guest_rows(&b, &rt, &mut rows);
    print_table(
        &format!(
            "gkvm where users feel it: QEMU at {}, guest-less on {} (boot and ACPI rows: the test guest under TCG)",
            b.qemu.display(),
            gkvm_testkit::guestless_accel()
        ),
        &rows,
    );
}

fn row(name: &str, stats: Stats, baseline: Option<Stats>, goal: Option<f64>) -> Row {
    Row {
        name: name.into(),
        stats,
        baseline: baseline.map(|s| s.median),
        goal,
    }
}

/// Start, warm and cold, against bare QEMU with the same and a minimal argv.
fn start_rows(b: &Bench, rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    let bare_dir = b.dir.join("bare");
    let argv = gkvm_argv(rt, b, "bare1");
    let bare_paths = RunDir::new(bare_dir.join("run")).instance("bare1").unwrap();
    let mini_dir = b.dir.join("mini");
    std::fs::create_dir_all(&mini_dir).unwrap();
    let mini_argv = minimal_argv(&b.qemu, &mini_dir);
    let caps = b.run_dir().join("caps");
    let kill = |pid_file: &Path| {
        let pid = read_pid(pid_file);
        // SAFETY: the QEMU this loop started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
    };
    // Interleaved, so that the host's drift over the run hits every row
    // alike: bare (gkvm's argv), bare (minimal), gkvm warm, gkvm cold.
    let mut samples: [Vec<Duration>; 4] = Default::default();
    // Twice the samples of other rows: QEMU's own start varies by ±10 %
    // from run to run on this host.
    for i in 0..2 * N + 2 {
        // The files gkvm prepares before a launch (its event log).
        bare_paths.prepare_event_log().unwrap();
        let t = Instant::now();
        b.bare_start(&argv, &bare_paths.qmp);
        let bare_t = t.elapsed();
        kill(&bare_paths.pid);
        let t = Instant::now();
        b.bare_start(&mini_argv, &mini_dir.join("qmp"));
        let mini_t = t.elapsed();
        kill(&mini_dir.join("pid"));
        let t = Instant::now();
        b.start("s1", false);
        let warm_t = t.elapsed();
        b.gkvm(&["stop", "s1", "--force"]);
        let _ = std::fs::remove_dir_all(&caps);
        let t = Instant::now();
        b.start("s1", false);
        let cold_t = t.elapsed();
        b.gkvm(&["stop", "s1", "--force"]);
        if i >= 2 {
            for (v, d) in samples.iter_mut().zip([bare_t, mini_t, warm_t, cold_t]) {
                v.push(d);
            }
        }
    }
    let [bare, minimal, warm, cold] = samples.map(Stats::of);
    rows.push(row("bare QEMU, gkvm's argv, to QMP cont", bare, None, None));
    rows.push(row(
        "bare QEMU, minimal -nodefaults argv",
        minimal,
        None,
        None,
    ));
    rows.push(row(
        "gkvm start (process), warm cache",
        warm,
        Some(bare),
        Some(1.05),
    ));
    rows.push(row(
        "  the same ÷ bare minimal argv",
        warm,
        Some(minimal),
        Some(1.10),
    ));
    rows.push(row(
        "gkvm start (process), empty cache",
        cold,
        Some(bare),
        Some(1.3),
    ));
}

/// info and list, as processes and in-process, over paused instances.
fn query_rows(b: &Bench, rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    let truth = measure(N * 3, 3, || {
        Command::new("/bin/true").status().unwrap();
    });
    let version = measure(N * 3, 3, || {
        Command::new(&b.gkvm).arg("--version").output().unwrap();
    });
    let names: Vec<String> = (0..30).map(|i| format!("q{i:02}")).collect();
    for n in &names[..10] {
        b.start(n, true);
    }
    let q0 = RunDir::new(b.run_dir()).instance("q00").unwrap();
    let raw_info = measure(N * 3, 3, || {
        raw_qmp(
            &q0.qmp,
            &["query-status", "query-balloon", "query-cpus-fast"],
        );
    });
    let info = measure(N * 3, 3, || {
        b.gkvm(&["--json", "info", "q00"]);
    });
    let list10 = measure(N * 3, 3, || {
        b.gkvm(&["--json", "list"]);
    });
    let hv = b.facade();
    let overview10 = measure(N * 3, 3, || {
        assert_eq!(rt.block_on(hv.overview()).unwrap().len(), 10);
    });
    let raw_all10 = measure(N, 2, || {
        for n in &names[..10] {
            let p = RunDir::new(b.run_dir()).instance(n).unwrap();
            raw_qmp(&p.qmp, &["query-status"]);
        }
    });
    let info_all10 = measure(N, 2, || {
        b.gkvm(&["--json", "info"]);
    });
    for n in &names[10..] {
        b.start(n, true);
    }
    let list30 = measure(N * 3, 3, || {
        b.gkvm(&["--json", "list"]);
    });
    let info_all30 = measure(N, 2, || {
        b.gkvm(&["--json", "info"]);
    });
    for n in &names {
        b.gkvm(&["stop", n, "--force"]);
    }
    rows.push(row("/bin/true as a process", truth, None, None));
    rows.push(row("gkvm --version as a process", version, None, None));
    rows.push(row("raw QMP: connect + 3 queries", raw_info, None, None));
    rows.push(row(
        "gkvm --json info NAME (process)",
        info,
        Some(raw_info),
        None,
    ));
    rows.push(row(
        "gkvm --json list, 10 (process; goal 4 ms)",
        list10,
        None,
        None,
    ));
    rows.push(row("gkvm --json list, 30 (process)", list30, None, None));
    rows.push(row(
        "facade overview, 10 (goal 0.5 ms)",
        overview10,
        None,
        None,
    ));
    rows.push(row(
        "raw QMP connect + query, 10 in a row",
        raw_all10,
        None,
        None,
    ));
    rows.push(row(
        "gkvm --json info (all 10, process)",
        info_all10,
        Some(raw_all10),
        Some(1.0),
    ));
    rows.push(row(
        "gkvm --json info (all 30, process)",
        info_all30,
        None,
        None,
    ));
}

/// Force stop against a bare SIGKILL until reaped, both 50 ms after a start.
fn stop_rows(b: &Bench, rows: &mut Vec<Row>) {
    let mini_dir = b.dir.join("mini");
    let mini_argv = minimal_argv(&b.qemu, &mini_dir);
    let mut bare = Vec::new();
    for _ in 0..N {
        b.bare_start(&mini_argv, &mini_dir.join("qmp"));
        std::thread::sleep(Duration::from_millis(50));
        let pid = read_pid(&mini_dir.join("pid"));
        let t = Instant::now();
        // SAFETY: the QEMU this loop started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
        bare.push(t.elapsed());
    }
    let mut gkvm = Vec::new();
    for _ in 0..N {
        b.start("k1", false);
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        b.gkvm(&["stop", "k1", "--force"]);
        gkvm.push(t.elapsed());
    }
    let bare = Stats::of(bare);
    rows.push(row(
        "bare SIGKILL until exited (pidfd), 50 ms up",
        bare,
        None,
        None,
    ));
    rows.push(row(
        "gkvm stop --force (process)",
        Stats::of(gkvm),
        Some(bare),
        Some(1.1),
    ));
}

fn serial_wait(path: &Path, needle: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    let mut s = gkvm_testkit::connect_retry(path, timeout).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) && t.elapsed() < timeout {
        if let Ok(n) = s.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(
        seen.contains(needle),
        "{needle:?} not seen on {}: {seen}",
        path.display()
    );
    t.elapsed()
}

/// Boot to the ready line and ACPI stop, gkvm against a minimal argv.
fn guest_rows(b: &Bench, rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    let Some(guest) = gkvm_testkit::test_guest() else {
        println!("speed: boot rows skipped (no test guest: scripts/build-test-guest)");
        return;
    };
    let hv = b.facade();
    let mut spec = InstanceSpec::new("g1", 128);
    for (k, v) in guest.hvparams() {
        spec.hvparams.set(k, serde_json::Value::String(v)).unwrap();
    }
    spec.hvparams.set_pair("kvm_flag=disabled").unwrap();
    let dir = b.dir.join("guest");
    std::fs::create_dir_all(&dir).unwrap();
    let serial = dir.join("serial");
    let mut boots = Vec::new();
    let mut acpi = Vec::new();
    let mut bare_boots = Vec::new();
    let mut bare_acpi = Vec::new();
    // Interleaved: gkvm, then bare QEMU, five times.
    for _ in 0..5 {
        let t = Instant::now();
        rt.block_on(hv.start(&spec, StartMode::Running)).unwrap();
        let paths = RunDir::new(b.run_dir()).instance("g1").unwrap();
        serial_wait(&paths.serial, READY, Duration::from_secs(60));
        boots.push(t.elapsed());
        // The guest's power-button reader starts in the background just
        // before the ready line: give it time, here and for bare QEMU.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let mode = StopMode::Acpi {
            timeout: Duration::from_secs(30),
        };
        rt.block_on(hv.stop("g1", mode)).unwrap();
        acpi.push(t.elapsed());

        let _ = std::fs::remove_file(&serial);
        let mut argv = minimal_argv(&b.qemu, &dir);
        argv.retain(|a| a != "-S");
        let i = argv
            .iter()
            .position(|a| a.starts_with("pc,accel="))
            .unwrap();
        argv[i] = "pc,accel=tcg".into();
        argv.extend([
            "-kernel".into(),
            guest.kernel.display().to_string(),
            "-initrd".into(),
            guest.initrd.display().to_string(),
            "-append".into(),
            guest.cmdline.clone(),
            "-serial".into(),
            format!("unix:{},server=on,wait=off", serial.display()),
        ]);
        let t = Instant::now();
        let st = Command::new(&argv[0]).args(&argv[1..]).status().unwrap();
        assert!(st.success());
        serial_wait(&serial, READY, Duration::from_secs(60));
        bare_boots.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        let pid = read_pid(&dir.join("pid"));
        let t = Instant::now();
        raw_qmp(&dir.join("qmp"), &["system_powerdown"]);
        wait_gone(pid);
        bare_acpi.push(t.elapsed());
    }
    let (bare_boot, bare_acpi) = (Stats::of(bare_boots), Stats::of(bare_acpi));
    rows.push(row(
        "boot to ready, minimal argv (TCG)",
        bare_boot,
        None,
        None,
    ));
    rows.push(row(
        "gkvm start to ready (TCG)",
        Stats::of(boots),
        Some(bare_boot),
        Some(1.05),
    ));
    rows.push(row(
        "bare system_powerdown until exited (pidfd)",
        bare_acpi,
        None,
        None,
    ));
    rows.push(row(
        "gkvm ACPI stop (facade)",
        Stats::of(acpi),
        Some(bare_acpi),
        Some(1.05),
    ));
}
