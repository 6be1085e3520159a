//! Save and restore of a booted 128 MiB test guest (TCG), against the
//! same QMP sequence by hand on a bare QEMU of the same argv, interleaved
//! in one run: save = pause, `getfd`, `migrate fd:` into a file until
//! completed, QEMU ended; restore = QEMU started with `-incoming defer`,
//! `getfd`, `migrate-incoming fd:` until landed, `cont`. Goal: ≤ 1.1× for
//! each. Nothing asserts: it prints the table.

use gkvm_benches::{print_table, Row, Stats};
use gkvm_qmp::blocking::Qmp;
use gkvm_qmp::commands;
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Save and restore cycles per side.
const N: usize = 8;

fn hv(dir: &Path, qemu: &Path) -> KvmHypervisor {
    let mut c = Config::new(RunDir::new(dir.join("run")));
    c.kvm_path = Some(qemu.to_owned());
    c.caps_cache_dir = Some(dir.join("caps"));
    KvmHypervisor::new(c)
}

fn qmp(path: &Path) -> Qmp {
    Qmp::connect(path, gkvm_qmp::Options::default()).unwrap()
}

/// Waits until `pid` is gone (or a zombie).
fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kvm_runtime::is_zombie_or_gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The bare side: a QEMU of gkvm's argv, saved and restored by hand.
struct Bare {
    argv: Vec<String>,
    paths: kvm_runtime::InstancePaths,
}

impl Bare {
    fn launch(&self, incoming: bool) {
        for p in [&self.paths.qmp, &self.paths.qmp_watch, &self.paths.serial] {
            let _ = std::fs::remove_file(p);
        }
        self.paths.prepare_event_log().unwrap();
        let mut cmd = std::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let st = cmd.stderr(std::process::Stdio::null()).status().unwrap();
        assert!(st.success());
    }

    fn pid(&self) -> i32 {
        std::fs::read_to_string(&self.paths.pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn save(&self, file: &Path) {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .unwrap();
        let mut q = qmp(&self.paths.qmp);
        q.run(&commands::Stop).unwrap();
        q.run(&commands::MigrateSetParameters {
            max_bandwidth: Some(1 << 40),
            ..Default::default()
        })
        .unwrap();
        q.run_with_fds(&commands::GetFd { fdname: "f".into() }, &[out.as_fd()])
            .unwrap();
        q.run(&commands::Migrate { uri: "fd:f".into() }).unwrap();
        loop {
            let s = q.run(&commands::QueryMigrate).unwrap().status;
            match s.as_deref() {
                Some("completed") => break,
                Some("failed" | "cancelled") => panic!("bare save {s:?}"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        out.sync_all().unwrap();
        let pid = self.pid();
        let _ = q.run(&commands::Quit);
        wait_gone(pid);
    }

    fn restore(&self, file: &Path) {
        self.launch(true);
        let f = std::fs::File::open(file).unwrap();
        let mut q = qmp(&self.paths.qmp);
        q.run_with_fds(&commands::GetFd { fdname: "f".into() }, &[f.as_fd()])
            .unwrap();
        q.run(&commands::MigrateIncoming { uri: "fd:f".into() })
            .unwrap();
        loop {
            let s = q.run(&commands::QueryStatus).unwrap().status;
            if s != commands::RunState::Inmigrate {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        q.run(&commands::Cont).unwrap();
    }
}

fn main() {
    let (Some(qemu), true) = (gkvm_testkit::qemu_binary(), gkvm_testkit::is_root()) else {
        println!("save: skipped (needs root and QEMU: scripts/install-deps)");
        return;
    };
    let Some(guest) = gkvm_testkit::test_guest() else {
        println!("save: skipped (no test guest: scripts/build-test-guest)");
        return;
    };
    let tmp = gkvm_testkit::ScratchDir::new("gkvm-bench-save");
    let run = tmp.path().join("run");
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let bare_run = tmp.path().join("bare");
    let _kill_bare = gkvm_testkit::KillRunDir(bare_run.clone());
    let hv = hv(tmp.path(), &qemu);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spec = |name: &str| {
        let mut s = InstanceSpec::new(name, 128);
        for (k, v) in guest.hvparams() {
            s.hvparams.set(k, serde_json::Value::String(v)).unwrap();
        }
        s
    };
    let boot = |serial: &Path| {
        let mut s = gkvm_testkit::Serial::connect(serial, Duration::from_secs(5)).unwrap();
        s.wait_for(gkvm_testkit::READY_LINE, Duration::from_secs(120))
            .unwrap();
    };

    // Bare: the argv gkvm would run, in a run dir of its own.
    let bare_hv = self::hv(&tmp.path().join("b"), &qemu);
    let mut argv = rt.block_on(bare_hv.plan(&spec("sb1"))).unwrap().argv;
    let from = tmp.path().join("b").join("run").display().to_string();
    let to = bare_run.display().to_string();
    for a in &mut argv {
        *a = a.replace(&from, &to);
    }
    RunDir::new(&bare_run).ensure().unwrap();
    std::fs::create_dir_all(bare_run.join("log")).unwrap();
    let bare = Bare {
        argv,
        paths: RunDir::new(&bare_run).instance("sb1").unwrap(),
    };
    bare.launch(false);
    qmp(&bare.paths.qmp).run(&commands::Cont).unwrap();
    boot(&bare.paths.serial);

    rt.block_on(hv.start(&spec("sg1"), hv_kvm::StartMode::Paused))
        .unwrap();
    let paths = RunDir::new(&run).instance("sg1").unwrap();
    let serial = paths.serial.clone();
    rt.block_on(hv.resume("sg1")).unwrap();
    boot(&serial);

    let file = |side: &str, i: usize| -> PathBuf { tmp.path().join(format!("{side}{i}.save")) };
    let (mut bs, mut br, mut gs, mut gr) = (vec![], vec![], vec![], vec![]);
    let mut sizes = (0, 0);
    for i in 0..N {
        let t = Instant::now();
        bare.save(&file("b", i));
        bs.push(t.elapsed());
        let t = Instant::now();
        bare.restore(&file("b", i));
        br.push(t.elapsed());
        sizes.0 = std::fs::metadata(file("b", i)).unwrap().len();

        let t = Instant::now();
        let report = rt.block_on(hv.save("sg1", &file("g", i), |_| {})).unwrap();
        gs.push(t.elapsed());
        sizes.1 = report.bytes;
        let t = Instant::now();
        rt.block_on(hv.restore(&file("g", i))).unwrap();
        gr.push(t.elapsed());
        for side in ["b", "g"] {
            let _ = std::fs::remove_file(file(side, i));
        }
    }
    let (bs, br, gs, gr) = (Stats::of(bs), Stats::of(br), Stats::of(gs), Stats::of(gr));
    print_table(
        &format!(
            "save and restore of a booted 128 MiB guest ({}, QEMU at {}); files {} / {} bytes",
            gkvm_testkit::guest_accel(),
            qemu.display(),
            sizes.0,
            sizes.1
        ),
        &[
            Row {
                name: "bare QEMU: stop + migrate fd: to a file + quit".into(),
                stats: bs,
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm save".into(),
                stats: gs,
                baseline: Some(bs.median),
                goal: Some(1.1),
            },
            Row {
                name: "bare QEMU: start -incoming defer + migrate-incoming + cont".into(),
                stats: br,
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm restore".into(),
                stats: gr,
                baseline: Some(br.median),
                goal: Some(1.1),
            },
        ],
    );
    let _ = rt.block_on(hv.stop("sg1", hv_kvm::StopMode::Force));
}
