//! `--nic` and `--disk` option values.
#![no_main]

use kvm_cmdline::{DiskSpec, MacAddr, NicSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<DiskSpec>();
    if let Ok(nic) = NicSpec::parse_option(text, "fuzz1", 0) {
        // The MAC written back parses to itself.
        assert_eq!(nic.mac.to_string().parse::<MacAddr>().ok(), Some(nic.mac));
    }
});
