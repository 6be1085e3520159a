//! Typed values of an instance definition: MAC addresses and UUIDs,
//! parsed once at the edge and written back in one canonical form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// A MAC address, written `aa:bb:cc:dd:ee:ff` (lowercase).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// From its six bytes.
    pub const fn new(bytes: [u8; 6]) -> MacAddr {
        MacAddr(bytes)
    }

    /// Its six bytes.
    pub const fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether it is a group (multicast or broadcast) address.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Whether it is `00:00:00:00:00:00`.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    /// Six pairs of hex digits separated by colons.
    fn from_str(s: &str) -> Result<MacAddr, Error> {
        let bad = || Error::InvalidValue {
            key: "mac".into(),
            value: s.into(),
            reason: format!("{s:?} is not a MAC address like aa:00:00:12:34:56"),
        };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// A UUID, written in its canonical lowercase 8-4-4-4-12 form.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(String);

impl Uuid {
    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Uuid {
    type Err = Error;

    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex digits (any case).
    fn from_str(s: &str) -> Result<Uuid, Error> {
        let groups: Vec<&str> = s.split('-').collect();
        let ok = groups.len() == 5
            && groups
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(Error::InvalidValue {
                key: "uuid".into(),
                value: s.into(),
                reason: format!("{s:?} is not a UUID"),
            });
        }
        Ok(Uuid(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({})", self.0)
    }
}

macro_rules! serde_as_string {
    ($t:ty, $pattern:expr, $what:expr) => {
        impl schemars::JsonSchema for $t {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($t).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $what,
                })
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(
    MacAddr,
    "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$",
    "A MAC address, six hex pairs separated by ':'."
);
serde_as_string!(
    Uuid,
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "A UUID in its text form."
);

/// A count or size: `1073741824`, or with a suffix in powers of 1024:
/// `64K`, `512M`, `1G`, `2T`.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{text:?} is not a number (suffixes K, M, G, T)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_refusals() {
        let m: MacAddr = "52:54:00:AB:cd:0E".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0e");
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"52:54:00:ab:cd:0e\"");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0e:1",
            "5254.00ab.cd0e",
            "52:54:00:ab:cd:+e",
            "52:54:00:ab:cd:0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!(MacAddr::default().is_zero());
        assert!(serde_json::from_str::<MacAddr>("\"x\"").is_err());
    }

    #[test]
    fn uuid_canonical() {
        let u: Uuid = "4DCFE81E-3b4e-4c94-8f37-0bb4b9e2b0a2".parse().unwrap();
        assert_eq!(u.as_str(), "4dcfe81e-3b4e-4c94-8f37-0bb4b9e2b0a2");
        assert!("4dcfe81e-3b4e-4c94-8f37".parse::<Uuid>().is_err());
        assert!("4dcfe81e-3b4e-4c94-8f37-0bb4b9e2b0ag"
            .parse::<Uuid>()
            .is_err());
    }
}
