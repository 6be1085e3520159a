//! Helpers shared by the facade's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use gkvm_testkit::Env;
use hv_kvm::InstanceSpec;

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
    let accel = if gkvm_testkit::guestless_accel() == "kvm" {
        "enabled"
    } else {
        "disabled"
    };
    spec.hvparams
        .set_pair(&format!("kvm_flag={accel}"))
        .unwrap();
    spec
}
