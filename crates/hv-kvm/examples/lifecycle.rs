//! The facade from a program: start an instance, look at it, balloon it,
//! stop it — what cluster software does through `hv-kvm`.
//!
//! ```sh
//! sudo cargo run -p hv-kvm --example lifecycle [-- /usr/bin/qemu-system-x86_64]
//! ```
//!
//! It starts a 128 MiB instance without a disk or a guest OS (paused, on
//! KVM when `/dev/kvm` is usable, else TCG) in a run directory of its own
//! under the system's temporary directory, and removes everything it made.

use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir, StartMode, StopMode};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let qemu = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
    let dir = std::env::temp_dir().join(format!("hv-kvm-example-{}", std::process::id()));
    let mut config = Config::new(RunDir::new(dir.join("run")));
    config.kvm_path = Some(qemu.into());
    config.state_dir = dir.join("state");
    let hv = KvmHypervisor::new(config);

    // An instance definition: what `gkvm start --file` reads as JSON.
    let mut spec = InstanceSpec::new("example1", 128);
    let accel = if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        "enabled"
    } else {
        "disabled"
    };
    spec.hvparams.set_pair(&format!("kvm_flag={accel}"))?;

    let result = async {
        let report = hv.start(&spec, StartMode::Paused).await?;
        println!(
            "started {} (pid {}, machine {})",
            report.name, report.pid, report.machine
        );
        let info = hv.info("example1").await?;
        println!(
            "{}: {} with {} MiB and {} vCPU",
            info.name, info.state, info.memory_mib, info.vcpus
        );
        hv.balloon("example1", 96).await?;
        println!("balloon target set to 96 MiB");
        let outcome = hv.stop("example1", StopMode::Force).await?;
        println!("stopped: {outcome:?}");
        Ok::<(), hv_kvm::Error>(())
    }
    .await;
    if let Err(e) = &result {
        eprintln!("example failed: {}", e.report());
        // Whatever failed, nothing stays running.
        let _ = hv.stop("example1", StopMode::Force).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(Into::into)
}
