//! kvm-cmdline: parsing a full `--help` (plus machine and device lists)
//! into capabilities (goal ≤ 200 µs), and building an argv (goal ≤ 20 µs).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, Criterion};
use kvm_cmdline::{build, BuildEnv, Capabilities, DiskSpec, InstanceSpec, NicSpec};
use std::path::Path;

fn read(profile: &str, f: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/kvm-cmdline/tests/data")
        .join(profile)
        .join(f);
    std::fs::read_to_string(p).expect("golden data")
}

fn benches(c: &mut Criterion) {
    let help = read("qemu-10.0", "help.txt");
    let machines = read("qemu-10.0", "machine.txt");
    let devices = read("qemu-10.0", "device.txt");
    c.bench_function("cmdline/caps_parse_help_only_10.0", |b| {
        b.iter(|| Capabilities::from_help(&help, "", "").unwrap())
    });
    c.bench_function("cmdline/caps_parse_help_machines_devices_10.0", |b| {
        b.iter(|| Capabilities::from_help(&help, &machines, &devices).unwrap())
    });
    let caps = Capabilities::from_help(&help, &machines, &devices).unwrap();
    let mut spec = InstanceSpec::new("web1.example.com", 2048);
    spec.vcpus = 4;
    spec.uuid = Some("4dcfe81e-3b4e-4c94-8f37-0bb4b9e2b0a2".parse().unwrap());
    spec.disks = ["/dev/xenvg/web1-disk0", "/dev/xenvg/web1-disk1"]
        .into_iter()
        .map(|p| {
            let mut d = DiskSpec::new(p);
            d.template = Some("drbd".into());
            d
        })
        .collect();
    spec.nics = vec![NicSpec::new("aa:00:00:11:22:33".parse().unwrap(), "br0")];
    spec.hvparams.set_pair("vnc_bind_address=0.0.0.0").unwrap();
    spec.network_port = Some(11000);
    let env = BuildEnv::default();
    c.bench_function("cmdline/argv_build", |b| {
        b.iter(|| build(&spec, &caps, &env).unwrap())
    });
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
