//! An instance definition as cluster software or `gkvm start --file`
//! sends it: parsed, validated, and when valid turned into QEMU 10.0's
//! argv, before and after its devices are placed. None of it may panic, and a valid instance must build or fail
//! with an error.
#![no_main]

use std::sync::OnceLock;

use kvm_cmdline::{BuildEnv, Capabilities, InstanceSpec};
use libfuzzer_sys::fuzz_target;

fn caps() -> &'static Capabilities {
    static CAPS: OnceLock<Capabilities> = OnceLock::new();
    CAPS.get_or_init(|| {
        Capabilities::from_help(
            include_str!("../../crates/kvm-cmdline/tests/data/qemu-10.0/help.txt"),
            include_str!("../../crates/kvm-cmdline/tests/data/qemu-10.0/machine.txt"),
            include_str!("../../crates/kvm-cmdline/tests/data/qemu-10.0/device.txt"),
        )
        .expect("captured QEMU 10.0 help parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut spec) = serde_json::from_slice::<InstanceSpec>(data) else {
        return;
    };
    if spec.validate().is_err() || spec.hvparams.check_syntax().is_err() {
        return;
    }
    let _ = kvm_cmdline::build(&spec, caps(), &BuildEnv::default());
    // Placed as a start places it: given addresses are kept and checked,
    // missing ones allocated; the result is valid or an error.
    if spec.assign_addresses().is_ok() {
        assert!(spec.validate().is_ok(), "placement made an invalid spec");
        let _ = kvm_cmdline::build(&spec, caps(), &BuildEnv::default());
    }
});
