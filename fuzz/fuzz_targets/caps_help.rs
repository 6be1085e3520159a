//! QEMU's `--help`, `-machine ?` and `-device ?` texts (NUL-separated):
//! what the capability probe reads from whatever binary it is pointed at.
#![no_main]

use kvm_cmdline::Capabilities;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let help = parts.next().unwrap_or("");
    let machines = parts.next().unwrap_or("");
    let devices = parts.next().unwrap_or("");
    let _ = Capabilities::from_help(help, machines, devices);
});
