//! End-to-end figures of the facade against bare QEMU, measured in the
//! same run on guest-less instances (KVM when available): start to QMP
//! ready (bare) vs `start` (cold and warm capability cache), `info` vs the
//! same QMP queries on a raw socket, force stop, and `info_all`.
//! Goals: warm start ≤ 1.10× bare, cold ≤ 1.5×, info ≤ 1.5× raw, force
//! stop ≤ 5 ms. Nothing here asserts: it prints the table.

use gkvm_benches::{measure, print_table, raw_qmp, Row, Stats};
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir};
use std::path::Path;
use std::time::{Duration, Instant};

const N: usize = 12;

fn spec(name: &str) -> InstanceSpec {
    let mut s = InstanceSpec::new(name, 64);
    s.hvparams
        .set_pair(gkvm_testkit::guestless_kvm_flag())
        .unwrap();
    s
}

fn hv(run: &Path, caps: &Path, qemu: &Path) -> KvmHypervisor {
    let mut c = Config::new(RunDir::new(run));
    c.kvm_path = Some(qemu.to_owned());
    c.caps_cache_dir = Some(caps.to_owned());
    KvmHypervisor::new(c)
}

fn wait_gone(pid: i32) {
    while hv_kvm::process_alive(pid) {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() {
    let Some(qemu) = gkvm_testkit::qemu_binary() else {
        println!("lifecycle: skipped, no QEMU (run scripts/install-deps)");
        return;
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("lifecycle: skipped, needs root");
        return;
    }
    let tmp = gkvm_testkit::ScratchDir::new("gkvm-bench-life");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let caps_dir = tmp.path().join("caps");
    let run = tmp.path().join("run");

    // The exact argv gkvm runs, for the bare baseline (in its own run dir).
    let bare_run = tmp.path().join("bare");
    let plan = rt
        .block_on(hv(&bare_run, &caps_dir, &qemu).plan(&spec("bare1")))
        .unwrap();
    RunDir::new(&bare_run).ensure().unwrap();
    // QEMU's log (`-D`), whose directory gkvm makes at its starts.
    std::fs::create_dir_all(bare_run.join("log")).unwrap();
    let bare_paths = RunDir::new(&bare_run).instance("bare1").unwrap();
    let mut bare_kills = Vec::new();
    let bare = measure(N, 0, || {
        // The files gkvm prepares before a launch (its event log).
        bare_paths.prepare_event_log().unwrap();
        let st = std::process::Command::new(&plan.argv[0])
            .args(&plan.argv[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        raw_qmp(&bare_paths.qmp, &[]);
        // Running, like the instances gkvm stops below.
        raw_qmp(&bare_paths.qmp, &["cont"]);
        let pid: i32 = std::fs::read_to_string(&bare_paths.pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let t = Instant::now();
        // SAFETY: the QEMU just started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
        bare_kills.push(t.elapsed());
        let _ = std::fs::remove_file(&bare_paths.qmp);
        let _ = std::fs::remove_file(&bare_paths.serial);
        let _ = std::fs::remove_file(&bare_paths.pid);
    });

    let start_stop = |cold: bool| -> (Stats, Stats) {
        let mut starts = Vec::new();
        let mut stops = Vec::new();
        for i in 0..N + 2 {
            if cold {
                let _ = std::fs::remove_dir_all(&caps_dir);
            }
            // A new facade each time, as each `gkvm start` is a new process.
            let h = hv(&run, &caps_dir, &qemu);
            let s = spec("bench1");
            let t = Instant::now();
            rt.block_on(h.start(&s, hv_kvm::StartMode::Running))
                .unwrap();
            let started = t.elapsed();
            std::thread::sleep(Duration::from_millis(50));
            let t = Instant::now();
            rt.block_on(h.stop("bench1", hv_kvm::StopMode::Force))
                .unwrap();
            let stopped = t.elapsed();
            if i >= 2 {
                starts.push(started);
                stops.push(stopped);
            }
        }
        (Stats::of(starts), Stats::of(stops))
    };
    let (cold, _) = start_stop(true);
    let (warm, force_stop) = start_stop(false);

    // info vs the same three queries on a raw socket.
    let h = hv(&run, &caps_dir, &qemu);
    rt.block_on(h.start(&spec("info1"), hv_kvm::StartMode::Running))
        .unwrap();
    let paths = RunDir::new(&run).instance("info1").unwrap();
    let raw_info = measure(N * 10, 5, || {
        raw_qmp(
            &paths.qmp,
            &["query-status", "query-balloon", "query-cpus-fast"],
        )
    });
    let info = measure(N * 10, 5, || {
        rt.block_on(h.info("info1")).unwrap();
    });
    rt.block_on(h.stop("info1", hv_kvm::StopMode::Force))
        .unwrap();

    // info_all over 10 instances.
    let names: Vec<String> = (0..10).map(|i| format!("all{i}")).collect();
    for n in &names {
        rt.block_on(h.start(&spec(n), hv_kvm::StartMode::Running))
            .unwrap();
    }
    let all = measure(N, 2, || {
        assert_eq!(rt.block_on(h.info_all()).unwrap().len(), 10);
    });
    for n in &names {
        rt.block_on(h.stop(n, hv_kvm::StopMode::Force)).unwrap();
    }

    let kills = Stats::of(bare_kills);
    let row = |name: &str, stats: Stats, baseline: Option<Duration>, goal: Option<f64>| Row {
        name: name.into(),
        stats,
        baseline,
        goal,
    };
    print_table(
        &format!(
            "instance lifecycle, guest-less QEMU {} ({}), same run",
            plan.qemu_version,
            gkvm_testkit::guestless_accel()
        ),
        &[
            row("bare QEMU start to QMP ready (same argv)", bare, None, None),
            row(
                "gkvm start, warm capability cache",
                warm,
                Some(bare.median),
                Some(1.10),
            ),
            row(
                "gkvm start, cold (probe included)",
                cold,
                Some(bare.median),
                Some(1.5),
            ),
            row("raw QMP: connect + 3 queries", raw_info, None, None),
            row("gkvm info", info, Some(raw_info.median), Some(1.5)),
            row(
                "bare kill -9 of a running QEMU until exit",
                kills,
                None,
                None,
            ),
            row(
                "gkvm force stop (goal 5 ms)",
                force_stop,
                Some(kills.median),
                None,
            ),
            row("gkvm info_all over 10 instances", all, None, None),
        ],
    );
}
