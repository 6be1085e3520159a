//! Helpers shared by the facade's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use gkvm_testkit::Env;
use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir};
use std::path::Path;
use std::time::Duration;

/// A two-thread runtime, as `gkvm` uses.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An instance running the test guest (TCG unless GKVM_GUEST_ACCEL=kvm).
pub fn guest_spec(env: &Env, name: &str) -> InstanceSpec {
    let mut spec = InstanceSpec::new(name, 128);
    for (k, v) in env.guest.as_ref().expect("test guest").hvparams() {
        spec.hvparams.set(k, serde_json::Value::String(v)).unwrap();
    }
    spec
}

/// A guest-less instance (SeaBIOS only), on KVM when it is usable.
pub fn guestless_spec(name: &str) -> InstanceSpec {
    let mut spec = InstanceSpec::new(name, 64);
    spec.hvparams
        .set_pair(gkvm_testkit::guestless_kvm_flag())
        .unwrap();
    spec
}

/// A node's configuration: run dir `dir/run`, capability cache
/// `dir/caps`, QEMU `qemu`.
pub fn node_config(dir: &Path, qemu: &Path) -> Config {
    let mut c = Config::new(RunDir::new(dir.join("run")));
    c.kvm_path = Some(qemu.to_owned());
    c.caps_cache_dir = Some(dir.join("caps"));
    // Both "nodes" of a test are this machine.
    c.trust_unsealed_migration_info = true;
    c
}

/// The hypervisor of a node at `dir` (see [`node_config`]).
pub fn node(dir: &Path, qemu: &Path) -> KvmHypervisor {
    KvmHypervisor::new(node_config(dir, qemu))
}

/// Runs a shell command; its stdout (failures are the caller's to see).
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One hop: accept on `dst`, migrate from `src`, finalize both.
pub async fn hop(
    src: &KvmHypervisor,
    dst: &KvmHypervisor,
    name: &str,
    port: u16,
) -> hv_kvm::MigrationStatus {
    hop_seen(src, dst, name, port).await.0
}

/// [`hop`], with every status the migration went through.
pub async fn hop_seen(
    src: &KvmHypervisor,
    dst: &KvmHypervisor,
    name: &str,
    port: u16,
) -> (hv_kvm::MigrationStatus, Vec<hv_kvm::MigrationState>) {
    // As `gkvm migration-info` gives it: with what the source QEMU says
    // (its accelerator, its guest's CPU).
    let info = src.migration_info_live(name).await.unwrap();
    dst.accept_instance(&info, "127.0.0.1", port).await.unwrap();
    let mut seen = Vec::new();
    let status = src
        .migrate(name, "127.0.0.1", port, hv_kvm::MigrationMode::Live, |s| {
            seen.push(s.status)
        })
        .await
        .unwrap();
    eprintln!("{name}: {seen:?}, downtime {:?} ms", status.downtime_ms);
    assert_eq!(status.status, hv_kvm::MigrationState::Completed);
    assert_eq!(
        seen.last(),
        Some(&hv_kvm::MigrationState::Completed),
        "{seen:?}"
    );
    dst.wait_incoming(name, Duration::from_secs(30))
        .await
        .unwrap();
    src.finalize_migration_source(name, hv_kvm::MigrationOutcome::Completed)
        .await
        .unwrap();
    dst.finalize_migration_dst(name, hv_kvm::MigrationOutcome::Completed)
        .await
        .unwrap();
    (status, seen)
}
