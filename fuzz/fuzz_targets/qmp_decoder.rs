//! Feeds arbitrary bytes, in arbitrary chunks, to the QMP decoder.
#![no_main]

use gkvm_qmp::codec::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut d = Decoder::new(1024);
    for piece in stream.chunks(usize::from(chunk).max(1)) {
        d.feed(piece);
        while d.next_message().is_some() {}
    }
});
