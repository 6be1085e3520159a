//! Property tests of the sans-I/O decoder: arbitrary bytes never panic, and
//! any chunking of a valid stream yields the same messages.

use gkvm_qmp::codec::{encode_command, Decoder, Message};
use proptest::prelude::*;

fn drain(d: &mut Decoder, out: &mut Vec<Result<Message, String>>) {
    while let Some(m) = d.next_message() {
        out.push(m.map_err(|e| e.to_string()));
    }
}

fn decode_chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Result<Message, String>> {
    let mut d = Decoder::new(4096);
    let mut out = Vec::new();
    let mut last = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    for c in cuts.into_iter().chain([bytes.len()]) {
        d.feed(&bytes[last..c.max(last)]);
        last = c.max(last);
        drain(&mut d, &mut out);
    }
    out
}

fn message() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..1000, "[a-z ]{0,20}").prop_map(|(id, s)| format!(
            "{{\"return\": {{\"s\": {}}}, \"id\": {id}}}",
            serde_json::to_string(&s).unwrap()
        )),
        (0u64..1000, "[A-Za-z]{1,10}", ".{0,30}").prop_map(|(id, c, d)| format!(
            "{{\"error\": {{\"class\": \"{c}\", \"desc\": {}}}, \"id\": {id}}}",
            serde_json::to_string(&d).unwrap()
        )),
        ("[A-Z_]{1,16}", 0i64..1 << 40).prop_map(|(n, t)| format!(
            "{{\"event\": \"{n}\", \"data\": {{}}, \"timestamp\": {{\"seconds\": {t}, \"microseconds\": 1}}}}"
        )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                                   cuts in proptest::collection::vec(any::<usize>(), 0..16)) {
        let whole = decode_chunked(&bytes, &[]);
        let chunked = decode_chunked(&bytes, &cuts);
        // Framing is independent of how the bytes arrive.
        prop_assert_eq!(whole.len(), chunked.len());
    }

    #[test]
    fn valid_streams_decode_the_same_under_any_chunking(
        msgs in proptest::collection::vec(message(), 1..8),
        crlf in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..32),
    ) {
        let sep = if crlf { "\r\n" } else { "\n" };
        let stream: String = msgs.iter().map(|m| format!("{m}{sep}")).collect();
        let whole = decode_chunked(stream.as_bytes(), &[]);
        prop_assert_eq!(whole.len(), msgs.len());
        prop_assert!(whole.iter().all(|m| m.is_ok()));
        let chunked = decode_chunked(stream.as_bytes(), &cuts);
        prop_assert_eq!(whole, chunked);
    }

    #[test]
    fn encoded_commands_are_one_json_line(name in "[a-z_-]{1,30}", id in any::<u64>(), s in ".*") {
        let args = serde_json::json!({"s": s});
        let line = encode_command(id, &name, Some(&args));
        prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        prop_assert_eq!(v["id"].as_u64(), Some(id));
        prop_assert_eq!(v["execute"].as_str(), Some(name.as_str()));
        prop_assert_eq!(v["arguments"]["s"].as_str(), Some(s.as_str()));
    }
}
