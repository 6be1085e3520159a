//! Save and restore: a running instance stopped into a file and brought
//! back from it, as libvirt's `save`/`restore`.
//!
//! The file is self-describing and only ever complete under its name:
//!
//! ```text
//! "GKVMSAV1" | header length (u64 LE) | header (JSON) | zeros to 4 KiB
//! QEMU's migration stream
//! "GKVMEND1" | stream length (u64 LE)
//! ```
//!
//! The header holds the instance as a migration carries it (its runtime
//! record, sealed with the node's migration key when it has one). The
//! file is made unnamed (`O_TMPFILE`, 0600) in the target's directory,
//! filled by QEMU through a descriptor (`getfd` + `migrate fd:`) with the
//! guest paused, given its trailer and only then linked under its name:
//! a save that fails, is interrupted or is killed leaves no file. Until
//! the link the guest is resumed on any failure; once linked, QEMU is
//! stopped — the guest lives in the file.
//!
//! A restore checks the file (regular, this administrator's, not
//! writable by others, magic, header, trailer and length agree), starts
//! QEMU with the same devices (`-incoming defer`, TAPs recreated),
//! streams the file in (`migrate-incoming fd:`) and lets the guest run.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gkvm_qmp::commands::{self, RunState};
use kvm_runtime::InstancePaths;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lifecycle::{refuse_cont, set_marker, StartOpts, HANDED_OVER};
use crate::migration::qmp_err;
use crate::KvmHypervisor;
use crate::{MigrationOutcome, MigrationState, MigrationStatus, StartReport, StopMode};

/// The first bytes of a saved instance.
const MAGIC: &[u8; 8] = b"GKVMSAV1";
/// The first bytes of its trailer.
const TRAILER: &[u8; 8] = b"GKVMEND1";
/// Where QEMU's stream starts: the header padded to this.
const ALIGN: u64 = 4096;
/// The most header a file may claim.
const MAX_HEADER: u64 = 16 << 20;
/// The descriptor name QEMU gets the file under.
const FD_NAME: &str = "gkvm-save";
/// Marks the record of an instance being saved (its guest must run again
/// if the save does not complete).
pub(crate) const SAVING: &str = "saving";
/// QEMU's migration bandwidth for a save: no limit worth the name.
const SAVE_BANDWIDTH: u64 = 1 << 40;
/// How long a restore waits for QEMU to read the file.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a saved-instance file says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct SaveHeader {
    /// The header's format (1).
    pub format: u32,
    /// The instance.
    pub name: String,
    /// When it was saved (seconds since the epoch).
    pub saved_at: u64,
    /// The QEMU that saved it.
    pub qemu: String,
    /// The instance as a migration carries it: its runtime record (sealed
    /// with the node's migration key when it has one).
    pub info: String,
    /// How QEMU wrote the guest: `stream` (its migration stream, any
    /// QEMU) or `mapped-ram` (QEMU ≥ 9: each page at its own offset, the
    /// file no larger than the guest's memory; only a QEMU with the
    /// capability restores it). Files without it are `stream`.
    #[serde(default = "stream_format")]
    pub stream: String,
}

fn stream_format() -> String {
    STREAM.to_owned()
}

/// QEMU's migration stream, as a socket carries it.
const STREAM: &str = "stream";
/// QEMU's `mapped-ram` file format (its capability's name).
const MAPPED_RAM: &str = "mapped-ram";

/// What a save did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct SaveReport {
    /// The instance.
    pub name: String,
    /// The file it is in now.
    pub file: PathBuf,
    /// The file's size, in bytes.
    pub bytes: u64,
    /// How long QEMU took to write the guest out, in milliseconds.
    pub total_time_ms: Option<u64>,
}

fn save_err(name: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Save {
        instance: name.to_owned(),
        reason,
    }
}

fn file_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::SaveFile {
        path: path.to_owned(),
        reason,
    }
}

/// `path` made absolute (against the current directory), not resolved.
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_owned())
    }
}

/// The header, its bytes and where the stream starts.
fn header_bytes(header: &SaveHeader) -> (Vec<u8>, u64) {
    let json = serde_json::to_vec(header).unwrap_or_default();
    let mut out = Vec::with_capacity(json.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    let offset = (out.len() as u64).div_ceil(ALIGN) * ALIGN;
    (out, offset)
}

/// Reads and checks a saved-instance file: its header, and where QEMU's
/// stream starts; the file is left open at that offset.
pub(crate) fn open_saved(path: &Path) -> Result<(SaveHeader, std::fs::File, u64)> {
    let bad = file_err(path);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| bad(format!("cannot open it: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(bad("is not a regular file".into()));
    }
    // It chooses the disks and files QEMU opens as root: only a file its
    // own administrator could have written is taken.
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(bad(format!(
            "belongs to uid {}, not to you or root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "others may write it (mode {:o}); it decides what QEMU opens as root",
            meta.mode() & 0o7777
        )));
    }
    let size = meta.len();
    let mut head = [0u8; 16];
    file.read_exact(&mut head)
        .map_err(|_| bad("is not a saved instance (too short)".into()))?;
    if &head[..8] != MAGIC {
        return Err(bad(
            "is not a saved instance of gkvm (no GKVMSAV1 header)".into()
        ));
    }
    let len = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
    if len == 0 || len > MAX_HEADER || 16 + len > size {
        return Err(bad(format!("its header claims {len} bytes")));
    }
    let mut json = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact(&mut json)
        .map_err(|e| bad(format!("its header: {e}")))?;
    let header: SaveHeader =
        serde_json::from_slice(&json).map_err(|e| bad(format!("its header: {e}")))?;
    if header.format != 1 {
        return Err(bad(format!(
            "is in format {} (this gkvm reads 1)",
            header.format
        )));
    }
    let offset = (16 + len).div_ceil(ALIGN) * ALIGN;
    if size < offset + 16 {
        return Err(bad("is partial: it ends before the guest's state".into()));
    }
    let mut trailer = [0u8; 16];
    file.seek(SeekFrom::Start(size - 16))
        .and_then(|_| file.read_exact(&mut trailer))
        .map_err(|e| bad(format!("its end: {e}")))?;
    let stream = u64::from_le_bytes(trailer[8..].try_into().unwrap_or_default());
    if &trailer[..8] != TRAILER || offset + stream + 16 != size {
        return Err(bad(
            "is partial or was changed: its end does not close the guest's state".into(),
        ));
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| bad(e.to_string()))?;
    Ok((header, file, offset))
}

/// Whether this QEMU writes and reads the `mapped-ram` file format.
async fn has_mapped_ram(qmp: &gkvm_qmp::Qmp) -> bool {
    qmp.run(&commands::QueryMigrateCapabilities)
        .await
        .is_ok_and(|caps| caps.iter().any(|c| c.capability == MAPPED_RAM))
}

/// Either end of a migration through a file: QEMU's MIGRATION events on
/// (gkvm follows by them), `mapped-ram` when the file's `format` is it,
/// no TLS (a file is no channel to secure), no bandwidth limit worth the
/// name (the instance's `migration_bandwidth` is for networks; it counts
/// only on the saving side), and the file's descriptor given to QEMU.
/// Returns the URI of the migration: `fd:` of the descriptor for a
/// stream; for `mapped-ram`, `file:` of an fd set holding it (QEMU writes
/// pages at their offsets from `offset`, where the stream starts) and the
/// set, to remove once done.
async fn file_channel(
    qmp: &gkvm_qmp::Qmp,
    name: &str,
    file: BorrowedFd<'_>,
    format: &str,
    offset: u64,
) -> Result<(String, Option<i64>)> {
    let mapped = format == MAPPED_RAM;
    let mut capabilities = vec![commands::MigrationCapabilityStatus {
        capability: "events".into(),
        state: true,
    }];
    if mapped {
        capabilities.push(commands::MigrationCapabilityStatus {
            capability: MAPPED_RAM.into(),
            state: true,
        });
    }
    qmp.run(&commands::MigrateSetCapabilities { capabilities })
        .await
        .map_err(qmp_err(name, "migrate-set-capabilities"))?;
    qmp.run(&commands::MigrateSetParameters {
        max_bandwidth: Some(SAVE_BANDWIDTH),
        tls_creds: Some(String::new()),
        ..Default::default()
    })
    .await
    .map_err(qmp_err(name, "migrate-set-parameters"))?;
    if mapped {
        let set = qmp
            .run_with_fds(
                &commands::AddFd {
                    fdset_id: None,
                    opaque: Some(FD_NAME.into()),
                },
                &[file],
            )
            .await
            .map_err(qmp_err(name, "add-fd"))?;
        return Ok((
            format!("file:/dev/fdset/{},offset={offset}", set.fdset_id),
            Some(set.fdset_id),
        ));
    }
    qmp.run_with_fds(
        &commands::GetFd {
            fdname: FD_NAME.into(),
        },
        &[file],
    )
    .await
    .map_err(qmp_err(name, "getfd"))?;
    Ok((format!("fd:{FD_NAME}"), None))
}

/// 16 random bytes, as hex.
#[cfg(test)]
fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl KvmHypervisor {
    /// Saves running instance `name` into `file` (which must not exist)
    /// and stops it: its guest paused, QEMU's state streamed into an
    /// unnamed file in `file`'s directory, the file named once complete,
    /// then QEMU ended. If anything fails, or this future is dropped,
    /// before the file is named, no file is left and the guest runs again
    /// as it did. `progress` sees QEMU's migration status as it goes.
    pub async fn save(
        &self,
        name: &str,
        file: &Path,
        mut progress: impl FnMut(&MigrationStatus),
    ) -> Result<SaveReport> {
        let target = absolute(file);
        let fail = save_err(name);
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        self.settle_interrupted_save(&paths).await?;
        let pid = self.running_pid(&paths)?;
        if target.symlink_metadata().is_ok() {
            return Err(fail(format!("{} exists", target.display())));
        }
        let dir = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("/"))
            .to_owned();
        let (_, _, record) = self.migration_record_live(name).await?;
        let qmp = self.watch_qmp(&paths).await?;
        let qemu = qmp
            .run(&commands::QueryVersion)
            .await
            .map(|v| format!("{}.{}.{}", v.qemu.major, v.qemu.minor, v.qemu.micro))
            .unwrap_or_default();
        let stream = if has_mapped_ram(&qmp).await {
            MAPPED_RAM
        } else {
            STREAM
        };
        let header = SaveHeader {
            format: 1,
            name: name.to_owned(),
            saved_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            qemu,
            info: self.sealed(&record),
            stream: stream.to_owned(),
        };
        let (head, offset) = header_bytes(&header);
        // Unnamed until complete: a killed save leaves nothing behind.
        // Write-only: QEMU takes a descriptor of an fd set by its access
        // mode, and writes with that one.
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(&dir)
            .map_err(|e| fail(format!("cannot make a file in {}: {e}", dir.display())))?;
        out.write_all(&head)
            .and_then(|()| out.seek(SeekFrom::Start(offset)).map(drop))
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?;

        let state = qmp
            .run(&commands::QueryStatus)
            .await
            .map_err(qmp_err(name, "query-status"))?;
        refuse_cont(name, pid, state.status)?;
        let mut guard = SaveGuard {
            paths: paths.clone(),
            was_running: state.running,
            qmp_timeout: self.config.qmp_timeout,
            armed: true,
        };
        mark_saving(&paths, Some(&target)).map_err(|e| Error::Runtime {
            instance: name.into(),
            source: e,
        })?;
        // Paused, the guest's state is written once, as it stands.
        if state.running {
            qmp.run(&commands::Stop)
                .await
                .map_err(qmp_err(name, "stop"))?;
        }
        let (uri, _) = file_channel(&qmp, name, out.as_fd(), stream, offset).await?;
        qmp.run(&commands::Migrate { uri })
            .await
            .map_err(qmp_err(name, "migrate to the file"))?;
        let status = self.follow(&qmp, name, false, &mut progress).await?;
        if status.status != MigrationState::Completed {
            return Err(fail(status.error.unwrap_or_else(|| {
                format!("QEMU's migration to the file {}", status.status)
            })));
        }
        // Complete: the trailer, then the name.
        let end = out
            .seek(SeekFrom::End(0))
            .map_err(|e| fail(e.to_string()))?;
        let mut trailer = Vec::with_capacity(16);
        trailer.extend_from_slice(TRAILER);
        trailer.extend_from_slice(&(end - offset).to_le_bytes());
        out.write_all(&trailer)
            .and_then(|()| out.sync_all())
            .map_err(|e| fail(format!("writing the file: {e}")))?;
        let fd_path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&out)
        ));
        nix::unistd::linkat(
            None,
            &fd_path,
            None,
            &target,
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        )
        .map_err(|e| fail(format!("cannot name the file {}: {e}", target.display())))?;
        // The guest is in the file now: it must not run here again, even
        // if this future is dropped before its QEMU is stopped.
        guard.armed = false;
        let mut finalize = crate::guard::RollbackGuard::new(&paths, "finalize save");
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        if let Err(e) = set_marker(&paths, HANDED_OVER, true) {
            tracing::warn!(instance = %name, error = %e.report(), "handed-over marker not written");
        }
        qmp.close().await;
        self.stop_locked(&paths, StopMode::Force).await?;
        finalize.disarm();
        tracing::info!(instance = %name, file = %target.display(), bytes = end + 16, "saved");
        Ok(SaveReport {
            name: name.to_owned(),
            file: target,
            bytes: end + 16,
            total_time_ms: status.total_time_ms,
        })
    }

    /// Brings back the instance saved in `file`: checks the file, starts
    /// QEMU with the instance's devices waiting for its state, streams the
    /// file in and lets the guest run on from where it was saved. The file
    /// is kept. A failure, or this future dropped, before the guest has
    /// landed leaves nothing running.
    pub async fn restore(&self, file: &Path) -> Result<StartReport> {
        let path = absolute(file);
        let (header, saved, offset) = open_saved(&path)?;
        let spec = self
            .incoming_spec_from(&header.info, None, true)
            .map_err(|e| file_err(&path)(e.report()))?;
        if spec.name != header.name {
            return Err(file_err(&path)(format!(
                "its header names {} and its instance {}",
                header.name, spec.name
            )));
        }
        crate::lifecycle::check_spec(&spec)?;
        let name = spec.name.clone();
        let paths = self.paths(&name)?;
        let _lock = self.lock(&paths).await?;
        // A start that fails rolls itself back; from then on, a restore
        // that does not land ends the waiting QEMU. (Not before: a start
        // refused because the instance runs must leave that one alone.)
        let mut report = self
            .start_locked(
                &spec,
                &paths,
                StartOpts {
                    paused: true,
                    incoming: Some("defer".into()),
                },
            )
            .await?;
        let _guard = crate::migration::IncomingGuard::new(&paths, self.config.qmp_timeout);
        let qmp = self.qmp(&paths).await?;
        if header.stream != STREAM && !has_mapped_ram(&qmp).await {
            return Err(file_err(&path)(format!(
                "QEMU wrote it as {} (QEMU {}), which this QEMU cannot read",
                header.stream, header.qemu
            )));
        }
        let (uri, fdset) = file_channel(&qmp, &name, saved.as_fd(), &header.stream, offset).await?;
        qmp.run(&commands::MigrateIncoming { uri })
            .await
            .map_err(qmp_err(&name, "migrate-incoming from the file"))?;
        drop(saved);
        // wait_incoming follows on the watch socket; this one is done.
        qmp.close().await;
        self.wait_incoming(&name, RESTORE_TIMEOUT).await?;
        if let Some(set) = fdset {
            // QEMU would keep the file open for the guest's whole life.
            let qmp = self.qmp(&paths).await?;
            if let Err(e) = qmp
                .run(&commands::RemoveFd {
                    fdset_id: set,
                    fd: None,
                })
                .await
            {
                tracing::warn!(instance = %name, error = %e, "the saved file's fd set stays in QEMU");
            }
            qmp.close().await;
        }
        self.finalize_dst_locked(&paths, MigrationOutcome::Completed)
            .await?;
        report.paused = false;
        tracing::info!(instance = %name, file = %path.display(), "restored");
        Ok(report)
    }

    /// The header of a saved-instance file, checked as a restore checks
    /// it (nothing is started).
    pub fn saved_header(&self, file: &Path) -> Result<SaveHeader> {
        open_saved(&absolute(file)).map(|(h, _, _)| h)
    }

    /// A save interrupted by a killed gkvm (its record still marked
    /// `saving`): if its file was never named, the guest must run again
    /// (what QEMU still does of the save is cancelled, the guest
    /// resumed); if it was, the guest is in the file and its QEMU here is
    /// stopped ([`Error::NotRunning`] then). A no-op otherwise. Run by
    /// `resume`, `save` and `start` (and `restore`) of the instance.
    pub(crate) async fn settle_interrupted_save(&self, paths: &InstancePaths) -> Result<()> {
        let Some(record) = paths.read_runtime().ok().flatten() else {
            return Ok(());
        };
        let Some(target) = record.payload.get(SAVING).and_then(|v| v.as_str()) else {
            return Ok(());
        };
        if crate::lifecycle::has_marker(&record, HANDED_OVER) {
            return Ok(());
        }
        let name = paths.name.clone();
        // Named before the gkvm died: the guest is in the file, and
        // must not run here again.
        if Path::new(target).symlink_metadata().is_ok() {
            tracing::warn!(instance = %name, file = target, "a save was interrupted after its file was named; stopping the source");
            if let Err(e) = set_marker(paths, HANDED_OVER, true) {
                tracing::warn!(instance = %name, error = %e.report(), "handed-over marker not written");
            }
            self.stop_locked(paths, StopMode::Force).await?;
            return Err(Error::NotRunning { instance: name });
        }
        tracing::warn!(instance = %name, "a save was interrupted before its file was named; the guest runs on");
        let paths = paths.clone();
        let timeout = self.config.qmp_timeout;
        tokio::task::spawn_blocking(move || {
            drop(SaveGuard {
                paths,
                was_running: true,
                qmp_timeout: timeout,
                armed: true,
            });
        })
        .await
        .map_err(|e| save_err(&name)(e.to_string()))
    }
}

/// Marks the record of an instance being saved to `target`, or clears
/// the mark.
fn mark_saving(
    paths: &InstancePaths,
    target: Option<&Path>,
) -> std::result::Result<(), kvm_runtime::Error> {
    let Some(mut record) = paths.read_runtime()? else {
        return Ok(());
    };
    let Some(payload) = record.payload.as_object_mut() else {
        return Ok(());
    };
    match target {
        Some(t) => {
            payload.insert(SAVING.into(), t.to_string_lossy().into_owned().into());
        }
        None => {
            if payload.remove(SAVING).is_none() {
                return Ok(());
            }
        }
    }
    paths.write_runtime(&record)
}

/// While a save has not named its file: if the operation fails or is
/// dropped, cancel QEMU's migration into the file and let the guest run
/// again as it did (from `paused`, or `postmigrate` once QEMU finished:
/// the file was never named, so this is the only copy).
struct SaveGuard {
    paths: InstancePaths,
    was_running: bool,
    qmp_timeout: Duration,
    armed: bool,
}

impl Drop for SaveGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let name = self.paths.name.clone();
        tracing::warn!(instance = %name, "save failed or was interrupted; the guest runs on");
        if let Some(mut qmp) = crate::migration::blocking_qmp(&self.paths, self.qmp_timeout) {
            crate::migration::cancel_and_wait_blocking(&mut qmp);
            if self.was_running {
                // A migration QEMU has just completed leaves its guest in
                // finish-migrate until QEMU's main loop cleans up after it
                // (a moment): resumed from where it settles.
                let status = |qmp: &mut gkvm_qmp::blocking::Qmp| {
                    qmp.run(&commands::QueryStatus).ok().map(|s| s.status)
                };
                let deadline = std::time::Instant::now() + self.qmp_timeout;
                let mut state = status(&mut qmp);
                while state == Some(RunState::FinishMigrate) && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                    state = status(&mut qmp);
                }
                if matches!(state, Some(RunState::Paused | RunState::Postmigrate)) {
                    if let Err(e) = qmp.run(&commands::Cont) {
                        tracing::error!(instance = %name, error = %e, "the guest could not be resumed after a failed save");
                    }
                }
            }
        }
        if let Err(e) = mark_saving(&self.paths, None) {
            tracing::warn!(instance = %name, error = %e.report(), "saving marker not cleared");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_file(dir: &Path, stream: &[u8], mangle: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let header = SaveHeader {
            format: 1,
            name: "vm1".into(),
            saved_at: 1,
            qemu: "7.2.0".into(),
            info: "{}".into(),
            stream: STREAM.into(),
        };
        let (mut bytes, offset) = header_bytes(&header);
        bytes.resize(usize::try_from(offset).unwrap(), 0);
        bytes.extend_from_slice(stream);
        bytes.extend_from_slice(TRAILER);
        bytes.extend_from_slice(&(stream.len() as u64).to_le_bytes());
        mangle(&mut bytes);
        let path = dir.join(format!("f{}", random_id()));
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    }

    #[test]
    fn saved_files_are_checked_before_anything_reads_them() {
        let tmp = tempfile::tempdir().unwrap();
        let good = saved_file(tmp.path(), b"QEVM-stream", |_| {});
        let (header, mut f, offset) = open_saved(&good).unwrap();
        assert_eq!(header.name, "vm1");
        assert_eq!(offset, ALIGN);
        let mut stream = Vec::new();
        f.read_to_end(&mut stream).unwrap();
        assert!(stream.starts_with(b"QEVM-stream"));
        for (mangle, says) in [
            (
                Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 5))
                    as Box<dyn FnOnce(&mut Vec<u8>)>,
                "partial",
            ),
            (Box::new(|b: &mut Vec<u8>| b.truncate(100)), "partial"),
            (Box::new(|b: &mut Vec<u8>| b.truncate(20)), "header"),
            (
                Box::new(|b: &mut Vec<u8>| b[0] = b'X'),
                "not a saved instance",
            ),
            (
                Box::new(|b: &mut Vec<u8>| {
                    let n = b.len();
                    b[n - 20] ^= 1;
                    b.insert(n - 16, 0);
                }),
                "partial",
            ),
            (Box::new(|b: &mut Vec<u8>| b[20] = b'!'), "header"),
        ] {
            let bad = saved_file(tmp.path(), b"QEVM-stream", mangle);
            let e = open_saved(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
        // Others may write it: refused.
        std::fs::set_permissions(&good, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        assert!(open_saved(&good)
            .unwrap_err()
            .to_string()
            .contains("others may write"));
        // Not through a symlink.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(open_saved(&link).is_err());
        assert!(open_saved(tmp.path()).is_err());
    }
}
