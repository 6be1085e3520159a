//! Local live migration of the idle 128 MiB test guest (TCG here): time
//! from the migrate call to a running destination, QEMU's downtime, and
//! the pause the guest itself sees (the longest gap between two reads of
//! its clock, 10 ms resolution), for gkvm (accept, migrate, finalize both
//! sides) with and without TLS, beside a bare-QEMU migration driven by raw
//! QMP, same argv and limits, same run.
//! Goal: ≤ 400 ms total. Limits: bandwidth 10 GiB/s, downtime 30 ms.
//! The pause the guest sees is measured in separate hops: its clock watch
//! dirties memory as it runs and so lengthens the migrations it watches.

use gkvm_benches::{print_table, Row, Stats};
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const HOPS: usize = 6;

fn node(dir: &Path, qemu: &Path) -> KvmHypervisor {
    node_tls(dir, qemu, None)
}

fn node_tls(dir: &Path, qemu: &Path, tls: Option<&Path>) -> KvmHypervisor {
    let mut c = Config::new(RunDir::new(dir.join("run")));
    c.kvm_path = Some(qemu.to_owned());
    c.caps_cache_dir = Some(dir.join("caps"));
    c.migration_tls_dir = tls.map(Path::to_owned);
    // Both "nodes" are this machine.
    c.trust_unsealed_migration_info = true;
    KvmHypervisor::new(c)
}

/// Migration TLS credentials for 127.0.0.1 (one CA, server and client).
fn tls_dir(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("tls");
    std::fs::create_dir_all(&d).unwrap();
    let q = "2>/dev/null";
    let cmd = format!(
        "cd {} && openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ca \
           -keyout ca-key.pem -out ca-cert.pem {q} && \
         for r in server client; do openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
           -keyout $r-key.pem -out $r.csr {q} && printf 'subjectAltName=IP:127.0.0.1\\n' > $r.ext && \
           openssl x509 -req -in $r.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
           -days 2 -extfile $r.ext -out $r-cert.pem {q}; done",
        d.display()
    );
    let st = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .status()
        .unwrap();
    assert!(st.success(), "openssl");
    d
}

/// In the guest, for 4 s of its own clock: the longest gap between two
/// reads of its uptime, in ms, written to /tmp/gap.
const GAP_WATCH: &str = "rm -f /tmp/gap; awk 'BEGIN{s=0;p=0;m=0;while(1){getline u < \"/proc/uptime\"; close(\"/proc/uptime\"); split(u,a,\" \"); t=a[1]+0; if(s==0)s=t; if(p>0 && t-p>m)m=t-p; p=t; if(t-s>4)break}; printf \"%d\\n\", m*1000 > \"/tmp/gap\"}' & true";

/// Reads /tmp/gap from the guest's console once the watch is over.
fn read_gap(serial: &Path) -> Duration {
    let mut s = gkvm_testkit::Serial::connect(serial, Duration::from_secs(5)).unwrap();
    let out = s
        .run("sleep 4; echo gap=$(cat /tmp/gap)", Duration::from_secs(30))
        .unwrap();
    let ms = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("gap="))
        .find_map(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no gap figure: {out}"));
    Duration::from_millis(ms)
}

/// `hops` gkvm migrations of the running `bm1` between `a` and `b`:
/// (totals, QEMU downtimes, guest-visible pauses).
fn gkvm_hops(
    rt: &tokio::runtime::Runtime,
    (a, da): (&KvmHypervisor, &Path),
    (b, db): (&KvmHypervisor, &Path),
    first_port: u16,
    watch: bool,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (mut totals, mut downtimes, mut pauses) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..HOPS {
        let ((src, ds), (dst, dd)) = if i % 2 == 0 {
            ((a, da), (b, db))
        } else {
            ((b, db), (a, da))
        };
        let port = first_port + u16::try_from(i).expect("few rounds");
        let serial = |d: &Path| RunDir::new(d.join("run")).instance("bm1").unwrap().serial;
        if watch {
            // (Typed and confirmed before hanging up: the guest's UART takes

            // a line a few bytes at a time, and what it has not taken is lost.)

            let mut console =
                gkvm_testkit::Serial::connect(&serial(ds), Duration::from_secs(5)).unwrap();

            console.run(GAP_WATCH, Duration::from_secs(20)).unwrap();

            drop(console);

            std::thread::sleep(Duration::from_millis(500));
        }
        let info = src.migration_info("bm1").unwrap();
        rt.block_on(dst.accept_instance(&info, "127.0.0.1", port))
            .unwrap();
        let t = Instant::now();
        let status = rt
            .block_on(src.migrate(
                "bm1",
                "127.0.0.1",
                port,
                hv_kvm::MigrationMode::Live,
                |_| {},
            ))
            .unwrap();
        rt.block_on(dst.wait_incoming("bm1", Duration::from_secs(30)))
            .unwrap();
        rt.block_on(dst.finalize_migration_dst("bm1", hv_kvm::MigrationOutcome::Completed))
            .unwrap();
        totals.push(t.elapsed());
        rt.block_on(src.finalize_migration_source("bm1", hv_kvm::MigrationOutcome::Completed))
            .unwrap();
        downtimes.push(Duration::from_millis(status.downtime_ms.unwrap_or(0)));
        if watch {
            pauses.push(read_gap(&serial(dd)));
        }
    }
    (totals, downtimes, pauses)
}

/// A minimal QMP client on a raw socket.
struct Raw {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = gkvm_testkit::connect_retry(path, Duration::from_secs(10)).unwrap();
        let mut raw = Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        raw.line();
        raw.cmd(r#"{"execute":"qmp_capabilities"}"#);
        raw
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }
    fn cmd(&mut self, c: &str) -> String {
        self.w.write_all(format!("{c}\n").as_bytes()).unwrap();
        loop {
            let l = self.line();
            if !l.contains("\"event\"") {
                return l;
            }
        }
    }
    fn wait_event(&mut self, needle: &str) {
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "QMP closed");
            if l.contains(needle) {
                return;
            }
        }
    }
}

fn main() {
    let Some(qemu) = gkvm_testkit::qemu_binary() else {
        println!("migration: skipped, no QEMU");
        return;
    };
    let Some(guest) = gkvm_testkit::test_guest() else {
        println!("migration: skipped, no test guest (scripts/build-test-guest)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (da, db) = (
        gkvm_testkit::ScratchDir::new("gkvm-bm-a"),
        gkvm_testkit::ScratchDir::new("gkvm-bm-b"),
    );
    let (a, b) = (node(da.path(), &qemu), node(db.path(), &qemu));
    let mut spec = InstanceSpec::new("bm1", 128);
    let mut params = guest.hvparams();
    params.push(("migration_bandwidth", "10240".into()));
    params.push(("migration_downtime", "30".into()));
    for (k, v) in params {
        spec.hvparams.set(k, serde_json::Value::String(v)).unwrap();
    }

    // gkvm: boot once, then hop back and forth.
    rt.block_on(a.start(&spec, hv_kvm::StartMode::Paused))
        .unwrap();
    let pa = RunDir::new(da.path().join("run")).instance("bm1").unwrap();
    let mut serial = gkvm_testkit::Serial::connect(&pa.serial, Duration::from_secs(5)).unwrap();
    rt.block_on(a.resume("bm1")).unwrap();
    serial
        .wait_for(gkvm_testkit::READY_LINE, Duration::from_secs(90))
        .unwrap();
    // QEMU's console socket serves one client at a time.
    drop(serial);
    std::thread::sleep(Duration::from_secs(1));
    // The guest's clock-read gaps without a migration: the noise floor.
    let mut console = gkvm_testkit::Serial::connect(&pa.serial, Duration::from_secs(5)).unwrap();
    console.run(GAP_WATCH, Duration::from_secs(20)).unwrap();
    drop(console);
    let idle_gap = read_gap(&pa.serial);
    let (totals, downtimes, _) = gkvm_hops(&rt, (&a, da.path()), (&b, db.path()), 21000, false);
    let (_, _, pauses) = gkvm_hops(&rt, (&a, da.path()), (&b, db.path()), 21100, true);
    // Two rounds of HOPS hops: the guest is back where it started.
    let last = &a;
    let plan_argv = {
        let mut s = spec.clone();
        s.name = "bare1".into();
        rt.block_on(a.plan(&s)).unwrap().argv
    };
    rt.block_on(last.stop("bm1", hv_kvm::StopMode::Force))
        .unwrap();

    // Bare QEMU: the same argv, two processes, raw QMP.
    let bare_dir = gkvm_testkit::ScratchDir::new("gkvm-bm-bare");
    let rewrite = |argv: &[String], tag: &str, incoming: Option<u16>| -> Vec<String> {
        let mut out: Vec<String> = argv
            .iter()
            .map(|x| {
                x.replace(
                    &da.path().join("run").display().to_string(),
                    &bare_dir.path().join(tag).display().to_string(),
                )
            })
            .collect();
        if let Some(p) = incoming {
            out.push("-incoming".into());
            out.push(format!("tcp:127.0.0.1:{p}"));
        }
        out
    };
    for tag in ["s", "d"] {
        for sub in ["pid", "ctrl", "log"] {
            std::fs::create_dir_all(bare_dir.path().join(tag).join(sub)).unwrap();
        }
        // The files gkvm prepares before a launch (its event log).
        hv_kvm::RunDir::new(bare_dir.path().join(tag))
            .instance("bare1")
            .unwrap()
            .prepare_event_log()
            .unwrap();
    }
    let start = |argv: &[String]| {
        let st = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    };
    let src_argv = rewrite(&plan_argv, "s", None);
    start(&src_argv);
    let sock = |tag: &str| bare_dir.path().join(tag).join("ctrl/bare1.qmp");
    let serial_path = bare_dir.path().join("s").join("ctrl/bare1.serial");
    let mut bare_serial =
        gkvm_testkit::Serial::connect(&serial_path, Duration::from_secs(5)).unwrap();
    Raw::connect(&sock("s")).cmd(r#"{"execute":"cont"}"#);
    bare_serial
        .wait_for(gkvm_testkit::READY_LINE, Duration::from_secs(90))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (mut bare_totals, mut bare_downtimes) = (Vec::new(), Vec::new());
    let mut from = "s";
    for i in 0..HOPS {
        let to = if from == "s" { "d" } else { "s" };
        let port = 22000 + u16::try_from(i).expect("few hops");
        for f in [
            "ctrl/bare1.qmp",
            "ctrl/bare1.qmp-watch",
            "ctrl/bare1.serial",
            "pid/bare1",
        ] {
            let _ = std::fs::remove_file(bare_dir.path().join(to).join(f));
        }
        start(
            &rewrite(&rewrite(&plan_argv, to, None), to, Some(port))
                .iter()
                .map(|x| x.replace("/s/", &format!("/{to}/")))
                .collect::<Vec<_>>(),
        );
        let mut src = Raw::connect(&sock(from));
        let mut dst = Raw::connect(&sock(to));
        src.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}"#);
        src.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":30,"max-bandwidth":10737418240}}"#);
        let t = Instant::now();
        src.cmd(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
        ));
        src.wait_event(r#""status": "completed""#);
        dst.cmd(r#"{"execute":"cont"}"#);
        bare_totals.push(t.elapsed());
        let info = src.cmd(r#"{"execute":"query-migrate"}"#);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        bare_downtimes.push(Duration::from_millis(
            v["return"]["downtime"].as_u64().unwrap_or(0),
        ));
        src.cmd(r#"{"execute":"quit"}"#);
        from = to;
    }
    let _ = Raw::connect(&sock(from)).cmd(r#"{"execute":"quit"}"#);

    // gkvm over TLS: both nodes with certificates, same guest and limits.
    let tls = tls_dir(da.path());
    let (ta, tb) = (
        gkvm_testkit::ScratchDir::new("gkvm-bm-ta"),
        gkvm_testkit::ScratchDir::new("gkvm-bm-tb"),
    );
    let (a2, b2) = (
        node_tls(ta.path(), &qemu, Some(&tls)),
        node_tls(tb.path(), &qemu, Some(&tls)),
    );
    rt.block_on(a2.start(&spec, hv_kvm::StartMode::Paused))
        .unwrap();
    let pa2 = RunDir::new(ta.path().join("run")).instance("bm1").unwrap();
    let mut serial2 = gkvm_testkit::Serial::connect(&pa2.serial, Duration::from_secs(5)).unwrap();
    rt.block_on(a2.resume("bm1")).unwrap();
    serial2
        .wait_for(gkvm_testkit::READY_LINE, Duration::from_secs(90))
        .unwrap();
    drop(serial2);
    std::thread::sleep(Duration::from_secs(1));
    let (tls_totals, tls_downtimes, _) =
        gkvm_hops(&rt, (&a2, ta.path()), (&b2, tb.path()), 23000, false);
    let (_, _, tls_pauses) = gkvm_hops(&rt, (&a2, ta.path()), (&b2, tb.path()), 23100, true);
    let last2 = &a2;
    rt.block_on(last2.stop("bm1", hv_kvm::StopMode::Force))
        .unwrap();

    let st = Stats::of;
    let (gt, bt) = (st(totals), st(bare_totals));
    print_table(
        "live migration of the idle 128 MiB test guest over 127.0.0.1 (TCG), same run",
        &[
            Row {
                name: "bare QEMU, raw QMP: migrate -> dst cont".into(),
                stats: bt,
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm: migrate -> finalized destination".into(),
                stats: gt,
                baseline: Some(bt.median),
                goal: None,
            },
            Row {
                name: "bare QEMU downtime (QEMU's figure)".into(),
                stats: st(bare_downtimes),
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm downtime (QEMU's figure)".into(),
                stats: st(downtimes),
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm pause the guest saw (clock gap, 10 ms steps)".into(),
                stats: st(pauses),
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm over TLS: migrate -> finalized destination (ratio: to gkvm)".into(),
                stats: st(tls_totals.clone()),
                baseline: Some(gt.median),
                goal: None,
            },
            Row {
                name: "gkvm over TLS downtime (QEMU's figure)".into(),
                stats: st(tls_downtimes),
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm over TLS pause the guest saw".into(),
                stats: st(tls_pauses),
                baseline: None,
                goal: None,
            },
        ],
    );
    println!(
        "the guest's own clock-read gap with no migration (noise floor): {}",
        gkvm_benches::fmt(idle_gap)
    );
    println!(
        "goal: gkvm total <= 400 ms; median {}",
        gkvm_benches::fmt(gt.median)
    );
}
