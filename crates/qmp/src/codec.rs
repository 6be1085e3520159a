//! The sans-I/O protocol core: framing and decoding of what QEMU sends,
//! encoding of what the client sends. Both transports drive this; it never
//! touches a socket, so it is tested (and fuzzed) on bare bytes.

use crate::error::Error;
use crate::event::Event;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Default bound on one message (QEMU's largest common replies, such as
/// `query-qmp-schema`, are a few hundred KiB).
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

/// QEMU's version as the greeting and `query-version` give it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// QEMU's version information.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct VersionInfo {
    /// The numeric version.
    pub qemu: VersionTriple,
    /// The distribution's package string, e.g. `Debian 1:7.2+dfsg-7`.
    #[serde(default)]
    pub package: String,
}

/// The server's greeting, sent once on connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Capabilities the server offers (e.g. `oob`).
    pub capabilities: Vec<String>,
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting.
    Greeting(Greeting),
    /// A successful reply.
    Return {
        /// The request id echoed back.
        id: Option<u64>,
        /// The command's result.
        value: Value,
    },
    /// An error reply.
    Error {
        /// The request id echoed back (absent when QEMU could not parse the request).
        id: Option<u64>,
        /// QMP error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

impl Message {
    /// Classifies one complete JSON line.
    pub fn parse(line: &[u8]) -> Result<Message, Error> {
        let value: Value = serde_json::from_slice(line)
            .map_err(|e| Error::protocol(format!("invalid JSON: {e}"), line))?;
        let Value::Object(mut obj) = value else {
            return Err(Error::protocol("message is not a JSON object", line));
        };
        if let Some(greeting) = obj.remove("QMP") {
            return parse_greeting(greeting, line).map(Message::Greeting);
        }
        let id = match obj.get("id") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| Error::protocol("reply id is not one of ours", line))?,
            ),
        };
        if let Some(value) = obj.remove("return") {
            return Ok(Message::Return { id, value });
        }
        if let Some(err) = obj.remove("error") {
            let field = |name: &str| err.get(name).and_then(Value::as_str).map(str::to_owned);
            let (Some(class), Some(desc)) = (field("class"), field("desc")) else {
                return Err(Error::protocol("error reply without class and desc", line));
            };
            return Ok(Message::Error { id, class, desc });
        }
        if let Some(Value::String(name)) = obj.remove("event") {
            let data = obj.remove("data").unwrap_or(Value::Object(Map::new()));
            let timestamp = obj
                .remove("timestamp")
                .and_then(|t| serde_json::from_value(t).ok())
                .unwrap_or_default();
            return Ok(Message::Event(Event {
                name,
                data,
                timestamp,
            }));
        }
        Err(Error::protocol(
            "message is neither greeting, return, error nor event",
            line,
        ))
    }
}

fn parse_greeting(greeting: Value, line: &[u8]) -> Result<Greeting, Error> {
    let version = greeting
        .get("version")
        .cloned()
        .ok_or_else(|| Error::protocol("greeting without version", line))?;
    let version: VersionInfo = serde_json::from_value(version)
        .map_err(|e| Error::protocol(format!("greeting version malformed: {e}"), line))?;
    let capabilities = match greeting.get("capabilities") {
        Some(Value::Array(caps)) => caps
            .iter()
            .map(|c| {
                c.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::protocol("greeting capability is not a string", line))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(Error::protocol("greeting without capabilities list", line)),
    };
    Ok(Greeting {
        version,
        capabilities,
    })
}

/// Splits a byte stream into QMP messages. Feed it whatever the socket
/// returned (any chunking; LF or CRLF line ends), then take messages until
/// it has no complete one.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the not yet consumed bytes in `buf`.
    start: usize,
    max_message: usize,
    /// Discarding the rest of an over-long line.
    skipping: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_MESSAGE)
    }
}

impl Decoder {
    /// A decoder refusing messages longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            max_message: max_message.max(64),
            skipping: false,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 4096 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a complete message.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `None` when more bytes are needed. An
    /// invalid line yields an error and is skipped; decoding goes on after it.
    pub fn next_message(&mut self) -> Option<Result<Message, Error>> {
        loop {
            let rest = &self.buf[self.start..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                if rest.len() > self.max_message && !self.skipping {
                    let err = Error::protocol(
                        format!("message longer than {} bytes", self.max_message),
                        rest,
                    );
                    self.skipping = true;
                    self.start = self.buf.len();
                    return Some(Err(err));
                }
                if self.skipping {
                    self.start = self.buf.len();
                }
                return None;
            };
            let line_start = self.start;
            self.start += nl + 1;
            if self.skipping {
                self.skipping = false;
                continue;
            }
            let mut line = &self.buf[line_start..line_start + nl];
            if line.len() > self.max_message {
                return Some(Err(Error::protocol(
                    format!("message longer than {} bytes", self.max_message),
                    line,
                )));
            }
            while let [rest @ .., b'\r' | b' ' | b'\t'] = line {
                line = rest;
            }
            while let [b' ' | b'\t' | b'\r', rest @ ..] = line {
                line = rest;
            }
            if line.is_empty() {
                continue;
            }
            return Some(Message::parse(line));
        }
    }
}

/// Encodes one command line (with its trailing newline) for request `id`.
/// `arguments` that are `null` or an empty object are left out.
pub fn encode_command(id: u64, name: &str, arguments: Option<&Value>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Request<'a> {
        execute: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        arguments: Option<&'a Value>,
        id: u64,
    }
    let arguments = arguments.filter(|a| match a {
        Value::Null => false,
        Value::Object(m) => !m.is_empty(),
        _ => true,
    });
    let mut out = Vec::with_capacity(64);
    // Serializing a str, a Value and an integer into a Vec cannot fail.
    let _ = serde_json::to_writer(
        &mut out,
        &Request {
            execute: name,
            arguments,
            id,
        },
    );
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

    #[test]
    fn greeting_parses() {
        let Message::Greeting(g) = Message::parse(GREETING).unwrap() else {
            panic!()
        };
        assert_eq!(g.version.qemu.major, 7);
        assert_eq!(g.capabilities, vec!["oob"]);
    }

    #[test]
    fn split_and_joined_messages() {
        let stream = b"{\"return\": {}, \"id\": 1}\r\n{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}, \"id\": 2}\r\n";
        for chunk in 1..stream.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                d.feed(c);
                while let Some(m) = d.next_message() {
                    got.push(m.unwrap());
                }
            }
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert!(matches!(got[0], Message::Return { id: Some(1), .. }));
            assert!(
                matches!(&got[1], Message::Event(e) if e.name == "STOP" && e.timestamp.seconds == 1)
            );
            assert!(
                matches!(&got[2], Message::Error { id: Some(2), class, .. } if class == "GenericError")
            );
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn over_long_line_is_an_error_then_decoding_resumes() {
        let mut d = Decoder::new(100);
        d.feed(&[b'x'; 150]);
        assert!(matches!(
            d.next_message(),
            Some(Err(Error::Protocol { .. }))
        ));
        d.feed(&[b'y'; 50]);
        assert!(d.next_message().is_none());
        d.feed(b"\n{\"return\": 5, \"id\": 9}\n");
        assert!(matches!(
            d.next_message(),
            Some(Ok(Message::Return { id: Some(9), .. }))
        ));
    }

    #[test]
    fn garbage_is_a_protocol_error_with_excerpt() {
        let mut d = Decoder::default();
        d.feed(b"\x00\xffgarbage\n[1,2]\n{\"foo\": 1}\n{\"QMP\": {}}\n");
        for _ in 0..4 {
            match d.next_message() {
                Some(Err(Error::Protocol { excerpt, .. })) => assert!(!excerpt.is_empty()),
                other => panic!("{other:?}"),
            }
        }
        assert!(d.next_message().is_none());
    }

    #[test]
    fn encode_leaves_out_empty_arguments() {
        assert_eq!(
            encode_command(3, "quit", None),
            b"{\"execute\":\"quit\",\"id\":3}\n"
        );
        assert_eq!(
            encode_command(4, "stop", Some(&Value::Object(Map::new()))),
            b"{\"execute\":\"stop\",\"id\":4}\n"
        );
        let args = serde_json::json!({"value": 1});
        assert_eq!(
            encode_command(5, "balloon", Some(&args)),
            b"{\"execute\":\"balloon\",\"arguments\":{\"value\":1},\"id\":5}\n"
        );
    }
}
