//! The QMP probe's answers (query-version, query-machines, qom-list-types,
//! query-command-line-options) as a JSON array of four values.
#![no_main]

use kvm_cmdline::Capabilities;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(v)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let get = |i: usize| v.get(i).cloned().unwrap_or(Value::Null);
    let _ = Capabilities::from_qmp(&get(0), &get(1), &get(2), &get(3), None);
});
