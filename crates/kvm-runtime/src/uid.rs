//! The uid pool (Ganeti's `security_model=pool`): each running instance
//! gets its own unprivileged uid from a configured range.

use std::time::Duration;

use crate::fsutil::{read_nofollow, remove_file, write_atomic};
use crate::{Error, InstancePaths, RunDir};

/// A range of uids handed out one per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidPool {
    first: u32,
    last: u32,
}

impl UidPool {
    /// The uids `first..=last`.
    pub fn new(first: u32, last: u32) -> UidPool {
        UidPool {
            first: first.min(last),
            last: first.max(last),
        }
    }

    /// First uid.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// Last uid.
    pub fn last(&self) -> u32 {
        self.last
    }

    /// Gives `instance` a free uid and records it under `uid/`. Free means
    /// recorded for no other instance and owning no running process.
    /// Concurrent callers (threads or processes) are serialized by the node
    /// lock; an instance that already has a uid keeps it.
    pub fn allocate(
        &self,
        run: &RunDir,
        instance: &InstancePaths,
        lock_timeout: Duration,
    ) -> Result<u32, Error> {
        let _node = run.lock_node(lock_timeout)?;
        if let Some(uid) = read_uid(instance)? {
            return Ok(uid);
        }
        let taken = taken_uids(run)?;
        let busy = uids_with_processes();
        let uid = (self.first..=self.last)
            .find(|u| !taken.contains(u) && !busy.contains(u))
            .ok_or_else(|| Error::PoolExhausted {
                first: self.first,
                last: self.last,
                instance: instance.name.clone(),
            })?;
        write_atomic(&instance.uid, format!("{uid}\n").as_bytes())?;
        Ok(uid)
    }
}

/// The uid recorded for an instance.
pub fn read_uid(instance: &InstancePaths) -> Result<Option<u32>, Error> {
    match read_nofollow(&instance.uid)? {
        None => Ok(None),
        Some(b) => String::from_utf8_lossy(&b)
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Corrupt {
                path: instance.uid.clone(),
                reason: "not a uid".into(),
            }),
    }
}

/// Gives an instance's uid back to the pool; returns it.
pub(crate) fn release(instance: &InstancePaths) -> Result<Option<u32>, Error> {
    // An unreadable uid file is still removed: the uid is free again either way.
    let uid = read_uid(instance).unwrap_or(None);
    remove_file(&instance.uid)?;
    Ok(uid)
}

fn taken_uids(run: &RunDir) -> Result<Vec<u32>, Error> {
    let dir = run.root().join("uid");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    Ok(entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect())
}

/// Real uids of all running processes.
fn uids_with_processes() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|u| u.parse().ok())
        })
        .collect()
}
