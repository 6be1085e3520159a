//! One QMP round trip (`query-status`) on an open connection to a real,
//! guest-less QEMU: gkvm-qmp's blocking and async clients against a minimal
//! raw-socket exchange on a second monitor of the same QEMU, same run.
//! Goal: the clients add at most 10 % over raw.

use gkvm_benches::{measure, print_table, Row};
use gkvm_qmp::{blocking, commands, Options, Qmp};
use gkvm_testkit::{qemu_binary, Env, Vm};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

const N: usize = 3000;

fn main() {
    let Some(qemu) = qemu_binary() else {
        println!("qmp_roundtrip: skipped, no QEMU (run scripts/install-deps)");
        return;
    };
    let env = Env { qemu, guest: None };
    let mut raw_path = None;
    let vm = Vm::spawn(&env, |cmd| {
        let dir = std::env::temp_dir().join(format!("gkvm-bench-raw-{}.sock", std::process::id()));
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dir.display()));
        raw_path = Some(dir);
    });
    let raw_path = raw_path.unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));

    // Raw: greeting, capabilities, then bare request/reply lines.
    let raw = UnixStream::connect(&raw_path).expect("raw QMP socket");
    let mut reader = BufReader::new(raw.try_clone().unwrap());
    let mut w = raw;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    let raw_stats = measure(N, 200, || {
        w.write_all(b"{\"execute\":\"query-status\"}\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
    });
    drop(w);
    drop(reader);
    let _ = std::fs::remove_file(&raw_path);

    let mut q = blocking::Qmp::connect(&vm.qmp, Options::default()).unwrap();
    let blocking_stats = measure(N, 200, || {
        q.run(&commands::QueryStatus).unwrap();
    });
    q.close();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let async_stats = rt.block_on(async {
        let q = Qmp::connect(&vm.qmp, Options::default()).await.unwrap();
        for _ in 0..200 {
            q.run(&commands::QueryStatus).await.unwrap();
        }
        let mut times = Vec::with_capacity(N);
        for _ in 0..N {
            let t = std::time::Instant::now();
            q.run(&commands::QueryStatus).await.unwrap();
            times.push(t.elapsed());
        }
        times.sort_unstable();
        gkvm_benches::Stats {
            median: times[N / 2],
            p10: times[N / 10],
            p90: times[N * 9 / 10],
        }
    });

    let base = Some(raw_stats.median);
    print_table(
        "QMP query-status round trip on an open connection (same QEMU, same run)",
        &[
            Row {
                name: "raw socket (write line, read line)".into(),
                stats: raw_stats,
                baseline: None,
                goal: None,
            },
            Row {
                name: "gkvm-qmp blocking client".into(),
                stats: blocking_stats,
                baseline: base,
                goal: Some(1.10),
            },
            Row {
                name: "gkvm-qmp async client (current-thread)".into(),
                stats: async_stats,
                baseline: base,
                goal: Some(1.10),
            },
        ],
    );
    drop(vm);
}
