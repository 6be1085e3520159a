//! A migration info file as `gkvm accept` reads it: sealed or not, an
//! instance definition or a runtime record, checked with and without a
//! node key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = hv_kvm::parse_migration_info(text, None);
    let _ = hv_kvm::parse_migration_info(text, Some(b"0123456789abcdef"));
});
