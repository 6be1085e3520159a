//! Block I/O limits: QEMU's throttle groups (`-object throttle-group`),
//! which one disk or several share, each disk joining its group through a
//! `throttle` filter node under its format node; a group's limits change
//! live (`qom-set` of its `limits`), without a restart.

use serde::{Deserialize, Serialize};

use crate::placement::is_valid_device_id;
use crate::{Error, InstanceSpec};

/// The limits of one throttle group, in QEMU's names (`ThrottleLimits`):
/// operations and bytes a second, in total or by direction, with bursts
/// (`-max`, for up to `-max-length` seconds). Unset means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IoLimits {
    /// Operations a second, reads and writes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_total: Option<u64>,
    /// Read operations a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_read: Option<u64>,
    /// Write operations a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_write: Option<u64>,
    /// Bytes a second, reads and writes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total: Option<u64>,
    /// Bytes read a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_read: Option<u64>,
    /// Bytes written a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_write: Option<u64>,
    /// A burst of operations a second above `iops-total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_total_max: Option<u64>,
    /// How many seconds the operations burst may last (QEMU's default: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_total_max_length: Option<u64>,
    /// A burst of bytes a second above `bps-total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total_max: Option<u64>,
    /// How many seconds the bytes burst may last (QEMU's default: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total_max_length: Option<u64>,
}

/// The most a limit may be (QEMU's `THROTTLE_VALUE_MAX`).
pub const MAX_IO_LIMIT: u64 = 1_000_000_000_000_000;

impl IoLimits {
    /// Each limit with its QEMU name, set or not.
    fn fields(&self) -> [(&'static str, Option<u64>); 10] {
        [
            ("iops-total", self.iops_total),
            ("iops-read", self.iops_read),
            ("iops-write", self.iops_write),
            ("bps-total", self.bps_total),
            ("bps-read", self.bps_read),
            ("bps-write", self.bps_write),
            ("iops-total-max", self.iops_total_max),
            ("iops-total-max-length", self.iops_total_max_length),
            ("bps-total-max", self.bps_total_max),
            ("bps-total-max-length", self.bps_total_max_length),
        ]
    }

    /// Sets one limit by its QEMU name (`iops-total=100`, as the CLI takes
    /// them); sizes take suffixes (`bps-total=10M`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let n =
            crate::values::parse_size_bytes(value).map_err(|e| format!("{key}={value}: {e}"))?;
        let slot = match key {
            "iops-total" => &mut self.iops_total,
            "iops-read" => &mut self.iops_read,
            "iops-write" => &mut self.iops_write,
            "bps-total" => &mut self.bps_total,
            "bps-read" => &mut self.bps_read,
            "bps-write" => &mut self.bps_write,
            "iops-total-max" => &mut self.iops_total_max,
            "iops-total-max-length" => &mut self.iops_total_max_length,
            "bps-total-max" => &mut self.bps_total_max,
            "bps-total-max-length" => &mut self.bps_total_max_length,
            other => {
                return Err(format!(
                    "unknown limit {other:?} (one of {})",
                    IoLimits::default().fields().map(|(k, _)| k).join(", ")
                ))
            }
        };
        *slot = (n > 0).then_some(n);
        Ok(())
    }

    /// What QEMU would refuse, said first: a total limit with a directed
    /// one, a burst below its rate or without it, a value out of range.
    pub fn problem(&self) -> Option<String> {
        for (k, v) in self.fields() {
            if v.is_some_and(|v| v > MAX_IO_LIMIT) {
                return Some(format!("{k} is above {MAX_IO_LIMIT}"));
            }
        }
        for (what, total, read, write) in [
            ("iops", self.iops_total, self.iops_read, self.iops_write),
            ("bps", self.bps_total, self.bps_read, self.bps_write),
        ] {
            if total.is_some() && (read.is_some() || write.is_some()) {
                return Some(format!(
                    "{what}-total cannot be set with {what}-read or {what}-write"
                ));
            }
        }
        for (what, avg, max, length) in [
            (
                "iops-total",
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            (
                "bps-total",
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
        ] {
            match (avg, max) {
                (None, Some(_)) => return Some(format!("{what}-max needs {what}")),
                (Some(a), Some(m)) if m < a => {
                    return Some(format!("{what}-max ({m}) is below {what} ({a})"))
                }
                _ => {}
            }
            if length.is_some() && max.is_none() {
                return Some(format!("{what}-max-length needs {what}-max"));
            }
        }
        None
    }

    /// The value of QOM's `limits` property for `qom-set`: every limit,
    /// 0 where unset (QEMU keeps a limit left out, so a change must say
    /// each).
    pub fn qom_value(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (k, v) in self.fields() {
            let v = match (k.ends_with("-length"), v) {
                // A burst length is at least 1 second.
                (true, v) => v.unwrap_or(1),
                (false, v) => v.unwrap_or(0),
            };
            map.insert(k.to_owned(), v.into());
        }
        serde_json::Value::Object(map)
    }

    /// The limits as `-object throttle-group` properties (`x-iops-total`).
    pub(crate) fn object_props(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        self.fields()
            .into_iter()
            .filter_map(|(k, v)| Some((format!("x-{k}"), v?)))
    }
}

/// The QOM id of throttle group `group`.
pub fn io_group_id(group: &str) -> String {
    format!("iogroup-{group}")
}

impl InstanceSpec {
    /// Checks the throttle groups and the disks' memberships.
    pub(crate) fn check_io_limits(&self) -> Result<(), Error> {
        let bad = |field: String, reason: String| Error::Instance {
            instance: self.name.clone(),
            field,
            reason,
        };
        for (group, limits) in &self.io_limits {
            let field = format!("io_limits.{group}");
            if group.len() > 24 || !is_valid_device_id(group) {
                return Err(bad(
                    field,
                    "a group's name is a letter, then letters, digits, - . _ (at most 24)".into(),
                ));
            }
            if let Some(p) = limits.problem() {
                return Err(bad(field, p));
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            if let Some(group) = &disk.io_group {
                if !self.io_limits.contains_key(group) {
                    return Err(bad(
                        format!("disks[{i}].io_group"),
                        format!("no throttle group {group:?} in io_limits"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_and_render_for_qemu() {
        let mut l = IoLimits::default();
        l.set("bps-total", "2M").unwrap();
        l.set("iops-total", "100").unwrap();
        assert_eq!(l.bps_total, Some(2 << 20));
        assert!(l.problem().is_none());
        l.set("bps-read", "1M").unwrap();
        assert!(l.problem().unwrap().contains("bps-total cannot"));
        l.set("bps-read", "0").unwrap();
        l.set("iops-total-max", "50").unwrap();
        assert!(l.problem().unwrap().contains("below"));
        l.set("iops-total-max", "500").unwrap();
        assert!(l.problem().is_none());
        assert!(l.set("iops", "1").unwrap_err().contains("unknown limit"));
        let v = l.qom_value();
        assert_eq!(v["bps-total"], 2 << 20);
        assert_eq!(v["bps-read"], 0);
        assert_eq!(v["iops-total-max-length"], 1);
        let props: Vec<_> = l.object_props().collect();
        assert_eq!(
            props,
            [
                ("x-iops-total".to_owned(), 100),
                ("x-bps-total".to_owned(), 2 << 20),
                ("x-iops-total-max".to_owned(), 500)
            ]
        );
    }
}
