//! `gkvm stats` at the scale of a node: 10, 100 and 500 paused guest-less
//! instances (KVM, 32 MiB), through the facade (in process) and as a
//! process (`target/release/gkvm stats --json`), against the same QMP
//! round trips by hand (connect, greeting, capabilities, the three
//! queries stats asks each QEMU), all instances at once in both. Also the
//! CPU time one scrape costs, as a share of a core at one scrape a second
//! (goal for 100: under 1 %). Sizes: `GKVM_BENCH_STATS_SIZES` (default
//! `10,100,500`). Nothing asserts: it prints the table.

use gkvm_benches::{fmt, measure, print_table, Row, Stats};
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Timed calls per row.
const N: usize = 10;

fn hv(dir: &Path, qemu: &Path) -> KvmHypervisor {
    let mut c = Config::new(RunDir::new(dir.join("run")));
    c.kvm_path = Some(qemu.to_owned());
    c.caps_cache_dir = Some(dir.join("caps"));
    KvmHypervisor::new(c)
}

/// CPU time (user and system) of `who`: `RUSAGE_SELF` (this process,
/// all threads) or `RUSAGE_CHILDREN` (finished children: the `gkvm`
/// processes).
fn cpu_of(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(who, &mut u) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The queries `stats` sends each QEMU (its vCPU threads come from
/// `/proc`), as QMP lines.
const QUERIES: [&str; 3] = [
    r#"{"execute":"query-blockstats"}"#,
    r#"{"execute":"query-balloon"}"#,
    r#"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}}"#,
];

/// A QMP connection by hand, past its negotiation.
struct RawQmp {
    r: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl RawQmp {
    async fn connect(qmp: &Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let s = tokio::net::UnixStream::connect(qmp).await.unwrap();
        let (r, w) = s.into_split();
        let mut raw = Self {
            r: tokio::io::BufReader::new(r),
            w,
        };
        let mut line = String::new();
        raw.r.read_line(&mut line).await.unwrap();
        raw.ask(&[r#"{"execute":"qmp_capabilities"}"#]).await;
        raw
    }

    /// Sends `lines` at once and reads their answers.
    async fn ask(&mut self, lines: &[&str]) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut out = String::new();
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        self.w.write_all(out.as_bytes()).await.unwrap();
        let mut answered = 0;
        let mut line = String::new();
        while answered < lines.len() {
            line.clear();
            self.r.read_line(&mut line).await.unwrap();
            if !line.contains("\"event\"") {
                answered += 1;
            }
        }
    }
}

/// The QMP round trips `stats` makes with one QEMU, by hand: connect,
/// greeting, capabilities, the queries.
async fn raw_one(qmp: PathBuf) {
    RawQmp::connect(&qmp).await.ask(&QUERIES).await;
}

/// `ask` on every connection at once; the connections come back.
async fn ask_all(open: Vec<RawQmp>) -> Vec<RawQmp> {
    let mut set = tokio::task::JoinSet::new();
    for mut c in open {
        set.spawn(async move {
            c.ask(&QUERIES).await;
            c
        });
    }
    let mut back = Vec::new();
    while let Some(c) = set.join_next().await {
        back.push(c.unwrap());
    }
    back
}

fn main() {
    let (Some(qemu), true) = (gkvm_testkit::qemu_binary(), gkvm_testkit::is_root()) else {
        println!("stats: skipped (needs root and QEMU: scripts/install-deps)");
        return;
    };
    let gkvm = gkvm_testkit::target_dir().join("release/gkvm");
    let sizes: Vec<usize> = std::env::var("GKVM_BENCH_STATS_SIZES")
        .unwrap_or_else(|_| "10,100,500".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let most = sizes.iter().copied().max().unwrap_or(0);
    let tmp = gkvm_testkit::ScratchDir::new("gkvm-bench-stats");
    let run = tmp.path().join("run");
    let _guard = gkvm_testkit::KillRunDir(run.clone());
    let hv = hv(tmp.path(), &qemu);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let names: Vec<String> = (0..most).map(|i| format!("st{i:03}")).collect();
    for name in &names {
        let mut spec = InstanceSpec::new(name, 32);
        spec.hvparams
            .set_pair(gkvm_testkit::guestless_kvm_flag())
            .unwrap();
        rt.block_on(hv.start(&spec, hv_kvm::StartMode::Paused))
            .unwrap_or_else(|e| panic!("{name}: {}", e.report()));
    }
    let runs = RunDir::new(&run);
    let mut rows = Vec::new();
    let mut shares = Vec::new();
    for &n in &sizes {
        let some = &names[..n];
        let qmps: Vec<PathBuf> = some
            .iter()
            .map(|name| runs.instance(name).unwrap().qmp)
            .collect();
        let raw_cpu0 = cpu_of(libc::RUSAGE_SELF);
        let bare = measure(N, 1, || {
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for q in &qmps {
                    set.spawn(raw_one(q.clone()));
                }
                while set.join_next().await.is_some() {}
            });
        });
        let raw_cpu = (cpu_of(libc::RUSAGE_SELF) - raw_cpu0) / u32::try_from(N + 1).unwrap();
        // The floor of any QMP-based stats on this machine: connections
        // already open, only the queries.
        let mut open = Vec::new();
        for q in &qmps {
            open.push(rt.block_on(RawQmp::connect(q)));
        }
        let kept = measure(N, 1, || {
            open = rt.block_on(ask_all(std::mem::take(&mut open)));
        });
        drop(open);
        let cpu0 = cpu_of(libc::RUSAGE_SELF);
        let facade = measure(N, 1, || {
            let got = rt.block_on(hv.stats(some)).unwrap();
            assert_eq!(got.len(), n);
        });
        let facade_cpu = (cpu_of(libc::RUSAGE_SELF) - cpu0) / u32::try_from(N + 1).unwrap();
        rows.push(Row {
            name: format!("raw QMP, {n} instances at once"),
            stats: bare,
            baseline: None,
            goal: None,
        });
        rows.push(Row {
            name: format!("raw QMP, connections kept open (the floor), {n}"),
            stats: kept,
            baseline: Some(bare.median),
            goal: None,
        });
        rows.push(Row {
            name: format!("stats through the facade, {n}"),
            stats: facade,
            baseline: Some(bare.median),
            goal: None,
        });
        if gkvm.exists() {
            let c0 = cpu_of(libc::RUSAGE_CHILDREN);
            let process: Stats = measure(N, 1, || {
                let out = std::process::Command::new(&gkvm)
                    .arg("--run-dir")
                    .arg(&run)
                    .args(["stats", "--json"])
                    .args(some)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            });
            let process_cpu = (cpu_of(libc::RUSAGE_CHILDREN) - c0) / u32::try_from(N + 1).unwrap();
            rows.push(Row {
                name: format!("gkvm stats as a process, {n}"),
                stats: process,
                baseline: Some(bare.median),
                goal: None,
            });
            shares.push((n, raw_cpu, facade_cpu, Some(process_cpu)));
        } else {
            shares.push((n, raw_cpu, facade_cpu, None));
        }
    }
    print_table(
        &format!(
            "gkvm stats of paused guest-less instances (QEMU at {}, {}); goals: 100 <= 20 ms, 500 <= 100 ms",
            qemu.display(),
            gkvm_testkit::guestless_accel()
        ),
        &rows,
    );
    println!("\nCPU time of one scrape (gkvm's side; QEMU's answers not counted), as a share of a core at one scrape a second (goal for 100: < 1 %):");
    for (n, raw, facade, process) in shares {
        let pct = |d: Duration| d.as_secs_f64() * 100.0;
        println!(
            "  {n:>4} instances: raw QMP client {} ({:.2} %), facade {} ({:.2} %){}",
            fmt(raw),
            pct(raw),
            fmt(facade),
            pct(facade),
            process
                .map(|p| format!(", process {} ({:.2} %)", fmt(p), pct(p)))
                .unwrap_or_default()
        );
    }
    for name in &names {
        let _ = rt.block_on(hv.stop(name, hv_kvm::StopMode::Force));
    }
}
