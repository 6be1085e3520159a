//! A modern VM's start against bare QEMU, same run: a guest-less UEFI
//! instance with a vTPM (OVMF from its own variable store, a swtpm of its
//! own), from the start call until the guest runs (QMP `cont`), against
//! the same argv started by hand after a swtpm started by hand. Goal:
//! ≤ 1.10× bare. Nothing here asserts: it prints the table.

use gkvm_benches::{measure, print_table, raw_qmp, Row, Stats};
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir};
use std::path::Path;
use std::time::{Duration, Instant};

const N: usize = 10;

fn spec(name: &str) -> InstanceSpec {
    let mut s = InstanceSpec::new(name, 128);
    for pair in [
        gkvm_testkit::guestless_kvm_flag(),
        "firmware=uefi",
        "tpm=tpm2",
    ] {
        s.hvparams.set_pair(pair).unwrap();
    }
    s
}

fn hv(dir: &Path, run: &Path, qemu: &Path) -> KvmHypervisor {
    let mut c = Config::new(RunDir::new(run));
    c.kvm_path = Some(qemu.to_owned());
    c.caps_cache_dir = Some(dir.join("caps"));
    c.state_dir = dir.join("state");
    KvmHypervisor::new(c)
}

fn wait_gone(pid: i32) {
    while hv_kvm::process_alive(pid) {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() {
    let Some(qemu) = gkvm_testkit::qemu_binary() else {
        println!("modern: skipped, no QEMU (run scripts/install-deps)");
        return;
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("modern: skipped, needs root");
        return;
    }
    for needed in ["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/bin/swtpm"] {
        if !Path::new(needed).exists() {
            println!("modern: skipped, no {needed} (run scripts/install-deps)");
            return;
        }
    }
    let tmp = gkvm_testkit::ScratchDir::new("gkvm-bench-modern");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Bare: the argv gkvm would run, its variable store and TPM state made
    // once beforehand (as gkvm's first start makes them), a swtpm started
    // by hand with the same options.
    let bare_run = tmp.path().join("bare");
    let bare_hv = hv(tmp.path(), &bare_run, &qemu);
    let plan = rt.block_on(bare_hv.plan(&spec("bare1"))).unwrap();
    RunDir::new(&bare_run).ensure().unwrap();
    std::fs::create_dir_all(bare_run.join("log")).unwrap();
    let paths = RunDir::new(&bare_run).instance("bare1").unwrap();
    let state = bare_hv.state_dir_of("bare1");
    std::fs::create_dir_all(state.join("tpm")).unwrap();
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", state.join("nvram.fd")).unwrap();
    let bare = measure(N, 1, || {
        paths.prepare_event_log().unwrap();
        let st = std::process::Command::new("swtpm")
            .args(["socket", "--tpm2", "--terminate", "--daemon", "--tpmstate"])
            .arg(format!("dir={},mode=0600", state.join("tpm").display()))
            .arg("--ctrl")
            .arg(format!(
                "type=unixio,path={},mode=0600",
                paths.tpm.display()
            ))
            .arg("--pid")
            .arg(format!("file={}", paths.tpm_pid.display()))
            .status()
            .unwrap();
        assert!(st.success());
        while !paths.tpm.exists() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let st = std::process::Command::new(&plan.argv[0])
            .args(&plan.argv[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        raw_qmp(&paths.qmp, &["cont"]);
        let pid: i32 = std::fs::read_to_string(&paths.pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: the QEMU just started; its swtpm ends with it.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
        paths.stop_helpers().unwrap();
        for f in [&paths.qmp, &paths.serial, &paths.pid, &paths.qmp_watch] {
            let _ = std::fs::remove_file(f);
        }
    });

    // gkvm: a new facade each time (each `gkvm start` is a process), the
    // capability cache warm, the instance's state made by the first start.
    let run = tmp.path().join("run");
    let mut starts = Vec::new();
    for i in 0..N + 2 {
        let h = hv(tmp.path(), &run, &qemu);
        let t = Instant::now();
        rt.block_on(h.start(&spec("m1"), hv_kvm::StartMode::Running))
            .unwrap();
        let took = t.elapsed();
        rt.block_on(h.stop("m1", hv_kvm::StopMode::Force)).unwrap();
        if i >= 2 {
            starts.push(took);
        }
    }
    let row = |name: &str, stats: Stats, baseline: Option<Duration>, goal: Option<f64>| Row {
        name: name.into(),
        stats,
        baseline,
        goal,
    };
    print_table(
        &format!(
            "UEFI + vTPM start to the guest running, guest-less QEMU {} ({}), same run",
            plan.qemu_version,
            gkvm_testkit::guestless_accel()
        ),
        &[
            row("bare swtpm + QEMU (same argv) + cont", bare, None, None),
            row(
                "gkvm start (UEFI, vTPM), warm",
                Stats::of(starts),
                Some(bare.median),
                Some(1.10),
            ),
        ],
    );
}
