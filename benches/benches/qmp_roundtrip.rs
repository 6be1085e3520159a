//! One QMP round trip (`query-status`) on an open connection to a real,
//! guest-less QEMU: gkvm-qmp's blocking and async clients against a minimal
//! raw-socket exchange on a second monitor of the same QEMU, same run.
//! Goal: the clients add at most 10 % over raw.

use gkvm_benches::{print_table, Row, Stats};
use gkvm_qmp::{blocking, commands, Options, Qmp};
use gkvm_testkit::{qemu_binary, Env, Vm};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

const N: usize = 3000;

fn main() {
    let Some(qemu) = qemu_binary() else {
        println!("qmp_roundtrip: skipped, no QEMU (run scripts/install-deps)");
        return;
    };
    let env = Env { qemu, guest: None };
    let dir = std::env::temp_dir();
    let raw_path = dir.join(format!("gkvm-bench-raw-{}.sock", std::process::id()));
    let async_path = dir.join(format!("gkvm-bench-async-{}.sock", std::process::id()));
    let vm = Vm::spawn(&env, |cmd| {
        for p in [&raw_path, &async_path] {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", p.display()));
        }
    });
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
    let mut raw_round_trip = |with_id: bool| {
        let msg: &[u8] = if with_id {
            b"{\"execute\":\"query-status\",\"id\":1}\n"
        } else {
            b"{\"execute\":\"query-status\"}\n"
        };
        w.write_all(msg).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
    };

    let mut blocking = blocking::Qmp::connect(&vm.qmp, Options::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Interleaved, so drift on a busy machine hits all three alike.
    let (mut raw_t, mut raw_id_t, mut blocking_t, mut async_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        let q = Qmp::connect(&async_path, Options::default()).await.unwrap();
        for i in 0..N + 200 {
            let t = Instant::now();
            raw_round_trip(false);
            let r = t.elapsed();
            let t = Instant::now();
            raw_round_trip(true);
            let ri = t.elapsed();
            let t = Instant::now();
            blocking.run(&commands::QueryStatus).unwrap();
            let b = t.elapsed();
            let t = Instant::now();
            q.run(&commands::QueryStatus).await.unwrap();
            let a = t.elapsed();
            if i >= 200 {
                raw_t.push(r);
                raw_id_t.push(ri);
                blocking_t.push(b);
                async_t.push(a);
            }
        }
    });
    let _ = std::fs::remove_file(&raw_path);
    let _ = std::fs::remove_file(&async_path);
    let raw_stats = Stats::of(raw_t);
    let raw_id = Stats::of(raw_id_t);
    // QEMU answers a request that carries an id 30-45 us later than one
    // without; a client that matches replies by id must send one, so the
    // raw socket sending an id is the fair baseline.
    let base = Some(raw_id.median);
    print_table(
        "QMP query-status round trip on an open connection (same QEMU, interleaved; clients vs raw with id)",
        &[
            Row {
                name: "raw socket (write line, read line)".into(),
                stats: raw_stats,
                baseline: None,
                goal: None,
            },
            Row {
                name: "raw socket, request with an id".into(),
                stats: raw_id,
                baseline: Some(raw_stats.median),
                goal: None,
            },
            Row {
                name: "gkvm-qmp blocking client".into(),
                stats: Stats::of(blocking_t),
                baseline: base,
                goal: Some(1.10),
            },
            Row {
                name: "gkvm-qmp async client (current-thread)".into(),
                stats: Stats::of(async_t),
                baseline: base,
                goal: Some(1.10),
            },
        ],
    );
    drop(vm);
}
