//! Throughput of the QMP codec: decoding a stream of typical messages and
//! encoding commands.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gkvm_qmp::codec::{encode_command, Decoder};

fn stream() -> Vec<u8> {
    let mut s = Vec::new();
    for i in 0..100u64 {
        s.extend_from_slice(
            format!("{{\"return\": {{\"running\": true, \"singlestep\": false, \"status\": \"running\"}}, \"id\": {i}}}\r\n")
                .as_bytes(),
        );
        s.extend_from_slice(
            b"{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"BALLOON_CHANGE\", \"data\": {\"actual\": 134217728}}\r\n",
        );
    }
    s
}

fn codec(c: &mut Criterion) {
    let s = stream();
    let mut g = c.benchmark_group("qmp_codec");
    g.throughput(Throughput::Bytes(s.len() as u64));
    g.bench_function("decode_200_messages_4k_chunks", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            let mut n = 0;
            for chunk in s.chunks(4096) {
                d.feed(chunk);
                while let Some(m) = d.next_message() {
                    n += usize::from(m.is_ok());
                }
            }
            assert_eq!(n, 200);
        })
    });
    g.finish();
    let args = serde_json::json!({"value": 536870912u64});
    c.bench_function("qmp_codec/encode_balloon", |b| {
        b.iter(|| encode_command(42, "balloon", Some(&args)))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
