//! The runtime file: what is saved about a running instance.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fsutil::{read_nofollow, write_atomic_volatile};
use crate::{Error, InstancePaths};

/// The runtime format version this build writes.
pub const FORMAT_VERSION: u64 = 1;

/// Where a runtime record came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Written by gkvm.
    #[default]
    Gkvm,
    /// Written by Ganeti's KVM driver (2.x and 3.x): `[argv, nics, hvparams(, disks)]`.
    Ganeti,
}

/// What is saved about a running instance: the argv QEMU was started with,
/// its NICs, hvparams and disks, and a payload the caller owns. This crate
/// does not interpret NICs, hvparams, disks or the payload.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RuntimeRecord {
    /// The QEMU command line (without start-time parts such as fds).
    pub argv: Vec<String>,
    /// The NICs, as the writer serialized them (Ganeti's driver; gkvm keeps
    /// its instance definition in the payload instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Value>,
    /// The hypervisor parameters in force (as above).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub hvparams: Map<String, Value>,
    /// The disks (as above).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Value>,
    /// Anything else the writer needs back (opaque here).
    #[serde(default)]
    pub payload: Value,
    /// Who wrote it (not stored; set on load).
    #[serde(skip)]
    pub origin: Origin,
}

/// Records parsed by [`InstancePaths::read_runtime_shared`], by path,
/// with the identity of the file they were parsed from.
static PARSED: crate::memo::Memo<
    std::path::PathBuf,
    (crate::fsutil::FileKey, std::sync::Arc<RuntimeRecord>),
> = crate::memo::Memo::new();

/// gkvm's stored form: the record's fields beside its version. Spelled
/// out rather than `#[serde(flatten)]`, which buffers the whole record
/// before parsing it (a record is read for every instance on every list).
#[derive(Deserialize)]
struct Versioned {
    gkvm_runtime: u64,
    argv: Vec<String>,
    #[serde(default)]
    nics: Vec<Value>,
    #[serde(default)]
    hvparams: Map<String, Value>,
    #[serde(default)]
    disks: Vec<Value>,
    #[serde(default)]
    payload: Value,
}

impl Versioned {
    fn record(self) -> RuntimeRecord {
        RuntimeRecord {
            argv: self.argv,
            nics: self.nics,
            hvparams: self.hvparams,
            disks: self.disks,
            payload: self.payload,
            origin: Origin::Gkvm,
        }
    }
}

impl RuntimeRecord {
    /// Serializes in gkvm's versioned format.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize, schemars::JsonSchema)]
        struct VersionedRef<'a> {
            gkvm_runtime: u64,
            #[serde(flatten)]
            record: &'a RuntimeRecord,
        }
        let v = VersionedRef {
            gkvm_runtime: FORMAT_VERSION,
            record: self,
        };
        // Compact, as Ganeti writes its runtime files: written on every
        // hot plug, read on every operation.
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Parses gkvm's format (any version up to [`FORMAT_VERSION`]) or the
    /// Ganeti KVM driver's list form. `source` names the data in errors.
    pub fn from_json(data: &[u8], source: &std::path::Path) -> Result<RuntimeRecord, Error> {
        let corrupt = |reason: String| Error::Corrupt {
            path: source.to_owned(),
            reason,
        };
        // gkvm's own record, parsed once (the common case); anything else
        // is looked at as a JSON value for what it is.
        if let Ok(v) = serde_json::from_slice::<Versioned>(data) {
            if v.gkvm_runtime <= FORMAT_VERSION {
                return Ok(v.record());
            }
        }
        let value: Value =
            serde_json::from_slice(data).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        match value {
            Value::Object(ref obj) => {
                let version = obj
                    .get("gkvm_runtime")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| corrupt("no gkvm_runtime version".into()))?;
                if version > FORMAT_VERSION {
                    return Err(Error::UnsupportedVersion {
                        path: source.to_owned(),
                        version,
                    });
                }
                let v: Versioned = serde_json::from_value(value)
                    .map_err(|e| corrupt(format!("bad runtime record: {e}")))?;
                Ok(v.record())
            }
            Value::Array(items) => Self::from_ganeti(items).map_err(corrupt),
            _ => Err(corrupt(
                "neither a gkvm record nor a Ganeti runtime list".into(),
            )),
        }
    }

    /// Ganeti's `[argv, nics, hvparams]` or `[argv, nics, hvparams, disks]`;
    /// further elements are ignored, as Ganeti's driver ignores them (a
    /// runtime that came from gkvm carries gkvm's migration info there).
    fn from_ganeti(items: Vec<Value>) -> Result<RuntimeRecord, String> {
        if items.len() < 3 {
            return Err(format!(
                "Ganeti runtime list has {} elements, not 3 or more",
                items.len()
            ));
        }
        let mut it = items.into_iter();
        // Ganeti put some numbers (the memory size) into its argv as is.
        let argv = match it.next() {
            Some(Value::Array(args)) => args
                .into_iter()
                .map(|a| match a {
                    Value::String(s) => Ok(s),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(format!("Ganeti argv: {other} is not a string or number")),
                })
                .collect::<Result<Vec<String>, String>>()?,
            _ => return Err("Ganeti argv: not a list".into()),
        };
        let nics: Vec<Value> = serde_json::from_value(it.next().unwrap_or_default())
            .map_err(|e| format!("Ganeti nics: {e}"))?;
        let hvparams: Map<String, Value> = serde_json::from_value(it.next().unwrap_or_default())
            .map_err(|e| format!("Ganeti hvparams: {e}"))?;
        let disks: Vec<Value> = match it.next() {
            Some(d) => serde_json::from_value(d).map_err(|e| format!("Ganeti disks: {e}"))?,
            None => Vec::new(),
        };
        Ok(RuntimeRecord {
            argv,
            nics,
            hvparams,
            disks,
            payload: Value::Null,
            origin: Origin::Ganeti,
        })
    }

    /// Ganeti's KVM driver's list form (for handing a runtime to a Ganeti node).
    pub fn to_ganeti_json(&self) -> Vec<u8> {
        let mut list = vec![
            Value::from(self.argv.clone()),
            Value::from(self.nics.clone()),
            Value::Object(self.hvparams.clone()),
        ];
        if !self.disks.is_empty() {
            list.push(Value::from(self.disks.clone()));
        }
        serde_json::to_vec(&list).unwrap_or_default()
    }
}

impl InstancePaths {
    /// Hands a running instance over to Ganeti's own KVM driver (a node
    /// rolled back from gkvm): writes `record` as its runtime file in the
    /// driver's list form, then removes the files only gkvm keeps (QEMU's
    /// event log, which QEMU holds open, the settled hot plug journal,
    /// the lock file last). The caller holds the instance's lock and has
    /// built `record` in Ganeti's terms.
    pub fn release_to_ganeti(&self, record: &RuntimeRecord) -> Result<(), Error> {
        write_atomic_volatile(&self.runtime, &record.to_ganeti_json())?;
        for f in [&self.events_in(), &self.events_out(), &self.hotplug] {
            crate::fsutil::remove_file(f)?;
        }
        crate::fsutil::remove_file(&self.lock)
    }

    /// Writes the runtime file atomically (mode 0600), without fsync: it
    /// describes a running process, which a power cut ends too, so
    /// durability buys nothing, while atomicity (a reader, or a gkvm
    /// killed mid-write, sees the old or the new record) is kept.
    pub fn write_runtime(&self, record: &RuntimeRecord) -> Result<(), Error> {
        write_atomic_volatile(&self.runtime, &record.to_json())
    }

    /// The runtime file as [`Self::read_runtime`] reads it, parsed once
    /// per version of the file in this process: a file is identified by
    /// its inode, size and times, taken from the open file (records are
    /// replaced by rename, never rewritten in place), so a long-lived
    /// reader (the server answering `list` every few seconds) parses a
    /// record only after it changed.
    pub fn read_runtime_shared(&self) -> Result<Option<std::sync::Arc<RuntimeRecord>>, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        // Known by its identity alone (one stat, no open).
        if let Some(key) = crate::fsutil::file_key(&self.runtime) {
            let known = PARSED.find(&self.runtime, |(was, record)| {
                (*was == key).then(|| std::sync::Arc::clone(record))
            });
            if known.is_some() {
                return Ok(known);
            }
        }
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.runtime)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // The reader that reports it by name.
            Err(_) => return self.read_runtime().map(|r| r.map(std::sync::Arc::new)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat", &self.runtime, e))?;
        let key = crate::fsutil::key_of(&meta);
        let data =
            crate::fsutil::read_open_capped(file, &self.runtime, crate::fsutil::MAX_STATE_FILE)?;
        let record = std::sync::Arc::new(RuntimeRecord::from_json(&data, &self.runtime)?);
        PARSED.put(self.runtime.clone(), (key, std::sync::Arc::clone(&record)));
        Ok(Some(record))
    }

    /// Reads the runtime file; `Ok(None)` when there is none.
    pub fn read_runtime(&self) -> Result<Option<RuntimeRecord>, Error> {
        match read_nofollow(&self.runtime)? {
            None => Ok(None),
            Some(data) => RuntimeRecord::from_json(&data, &self.runtime).map(Some),
        }
    }
}
