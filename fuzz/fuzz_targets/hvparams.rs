//! Hvparams as `-H key=value` pairs (one per line) and as a JSON map
//! (Ganeti's strings or native types).
#![no_main]

use kvm_cmdline::HvParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut hv = HvParams::default();
    for line in text.lines() {
        let _ = hv.set_pair(line);
    }
    let _ = hv.check_syntax();
    let _ = hv.to_map();
    if let Ok(map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
        if let Ok(hv) = HvParams::from_map(&map) {
            // What was accepted must survive its own serialization.
            let again = HvParams::from_map(&hv.to_map()).expect("round trip");
            assert_eq!(again, hv);
        }
    }
});
