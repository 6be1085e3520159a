//! Ordered, typed properties and their two renderings.

use serde_json::{Map, Value as Json};

use crate::{Capabilities, Error};

/// How an option argument is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `driver,key=value,...` — every QEMU.
    KeyValue,
    /// `{"driver": ..., "key": value}` — `-device`, `-object`, `-blockdev`
    /// and `-netdev` of QEMU 6.2 and later (properties keep their types).
    Json,
}

impl Syntax {
    /// The best syntax this QEMU takes: JSON when it parses JSON option
    /// arguments, else `key=value`.
    pub fn for_caps(caps: &Capabilities) -> Syntax {
        if caps.features.json_cli {
            Syntax::Json
        } else {
            Syntax::KeyValue
        }
    }
}

/// One property value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A string (escaped when rendered as `key=value`).
    Str(String),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A boolean: `on`/`off`, or JSON `true`/`false`.
    Bool(bool),
    /// A bare flag (`,password`) of old QEMU's option syntax; JSON `true`.
    Flag,
    /// Nested properties: dotted keys (`file.driver=file`) or a JSON object.
    Object(Props),
    /// A list: indexed dotted keys (`server.0.host=a`) or a JSON array.
    List(Vec<Value>),
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Str(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Str(v.clone())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<u8> for Value {
    fn from(v: u8) -> Value {
        Value::UInt(u64::from(v))
    }
}
impl From<u16> for Value {
    fn from(v: u16) -> Value {
        Value::UInt(u64::from(v))
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::UInt(u64::from(v))
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::UInt(v)
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::UInt(u64::try_from(v).unwrap_or(u64::MAX))
    }
}
impl From<Props> for Value {
    fn from(v: Props) -> Value {
        Value::Object(v)
    }
}

impl Value {
    fn to_json(&self) -> Json {
        match self {
            Value::Str(s) => Json::from(s.as_str()),
            Value::Int(i) => Json::from(*i),
            Value::UInt(u) => Json::from(*u),
            Value::Bool(b) => Json::from(*b),
            Value::Flag => Json::Bool(true),
            Value::Object(p) => Json::Object(p.to_json()),
            Value::List(items) => Json::Array(items.iter().map(Value::to_json).collect()),
        }
    }
}

/// Properties in the order they are rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props(Vec<(String, Value)>);

impl Props {
    /// No properties.
    pub fn new() -> Props {
        Props(Vec::new())
    }

    /// Sets `key` (replacing an earlier value in place).
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let key = key.into();
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// With `key` set.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Props {
        self.set(key, value);
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The string value of `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The properties in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// As a JSON object (QMP arguments, JSON option syntax).
    pub fn to_json(&self) -> Map<String, Json> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect()
    }

    /// As `key=value,...` (no leading comma), nested keys dotted.
    pub fn to_keyval(&self) -> Result<String, Error> {
        let mut out = String::new();
        self.write_keyval(&mut out, "")?;
        Ok(out)
    }

    fn write_keyval(&self, out: &mut String, prefix: &str) -> Result<(), Error> {
        for (k, v) in &self.0 {
            write_value(out, &format!("{prefix}{k}"), v)?;
        }
        Ok(())
    }
}

fn write_value(out: &mut String, key: &str, v: &Value) -> Result<(), Error> {
    let scalar = match v {
        Value::Object(inner) => return inner.write_keyval(out, &format!("{key}.")),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                write_value(out, &format!("{key}.{i}"), item)?;
            }
            return Ok(());
        }
        Value::Str(s) => format!("{key}={}", crate::escape::opt_value(key, s)?),
        Value::Int(i) => format!("{key}={i}"),
        Value::UInt(u) => format!("{key}={u}"),
        Value::Bool(b) => format!("{key}={}", if *b { "on" } else { "off" }),
        Value::Flag => key.to_owned(),
    };
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(&scalar);
    Ok(())
}

/// `head,props` in `key=value` syntax (`head` alone without properties).
pub(crate) fn keyval_with_head(head: &str, props: &Props) -> Result<String, Error> {
    let head = crate::escape::opt_value("driver", head)?;
    let rest = props.to_keyval()?;
    Ok(if rest.is_empty() {
        head
    } else {
        format!("{head},{rest}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_escapes_and_nests() {
        let p = Props::new()
            .with("file", "/a,b")
            .with("ro", true)
            .with("n", 3)
            .with("password", Value::Flag)
            .with(
                "inner",
                Props::new().with("driver", "file").with("x", false),
            );
        assert_eq!(
            p.to_keyval().unwrap(),
            "file=/a,,b,ro=on,n=3,password,inner.driver=file,inner.x=off"
        );
        assert_eq!(
            serde_json::Value::Object(p.to_json()),
            serde_json::json!({"file": "/a,b", "ro": true, "n": 3, "password": true,
                               "inner": {"driver": "file", "x": false}})
        );
        assert!(Props::new().with("f", "a\nb").to_keyval().is_err());
    }

    #[test]
    fn set_replaces_in_place() {
        let mut p = Props::new().with("a", 1).with("b", 2);
        p.set("a", 3);
        assert_eq!(p.to_keyval().unwrap(), "a=3,b=2");
    }
}
