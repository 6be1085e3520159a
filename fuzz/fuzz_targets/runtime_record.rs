//! A runtime file from the run directory: gkvm's versioned record or
//! Ganeti's `[argv, nics, hvparams(, disks)]` list.
#![no_main]

use kvm_runtime::RuntimeRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = RuntimeRecord::from_json(data, std::path::Path::new("fuzz")) else {
        return;
    };
    // What was read must read back the same after gkvm writes it.
    let again = RuntimeRecord::from_json(&record.to_json(), std::path::Path::new("fuzz"))
        .expect("a record gkvm wrote reads back");
    assert_eq!(again.argv, record.argv);
    let _ = record.to_ganeti_json();
});
