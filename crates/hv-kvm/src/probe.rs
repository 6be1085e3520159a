//! Capabilities of a QEMU binary: probed once per binary identity (path,
//! inode, size, mtime, ctime) and cached in memory and on disk, so a warm
//! start forks no probe process. The probe runs `--help`, `-machine ?` and
//! `-device ?` in parallel; the parsing is kvm-cmdline's.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_cmdline::Capabilities;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What identifies one build of a binary: any change re-probes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BinaryIdentity {
    /// The path as configured.
    pub path: PathBuf,
    /// Inode of the file it resolves to.
    pub inode: u64,
    /// Its size.
    pub size: u64,
    /// Modification time (ns since the epoch).
    pub mtime_ns: i128,
    /// Status change time (ns since the epoch).
    pub ctime_ns: i128,
}

impl BinaryIdentity {
    /// Reads the identity of `path` (following symlinks, as exec does).
    pub fn of(path: &Path) -> Result<BinaryIdentity> {
        let m = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::QemuMissing {
                path: path.to_owned(),
            },
            _ => Error::Io {
                context: format!("stat {}", path.display()),
                source: e,
            },
        })?;
        if !m.is_file() {
            return Err(Error::QemuMissing {
                path: path.to_owned(),
            });
        }
        Ok(BinaryIdentity {
            path: path.to_owned(),
            inode: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct CacheEntry {
    identity: BinaryIdentity,
    /// The feature table the entry was probed with ([`rules_fingerprint`]):
    /// a gkvm that knows more features probes again rather than reading
    /// the new ones as absent.
    #[serde(default)]
    rules: String,
    capabilities: Capabilities,
}

/// The names of every capability rule, in order.
fn rules_fingerprint() -> String {
    let names: Vec<&str> = kvm_cmdline::RULES.iter().map(|r| r.feature).collect();
    names.join(",")
}

/// Probes and caches capabilities.
#[derive(Debug)]
pub struct CapsCache {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<PathBuf, (BinaryIdentity, Arc<Capabilities>)>>,
    probes: std::sync::atomic::AtomicUsize,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

impl CapsCache {
    /// A cache keeping files in `dir` (none: memory only).
    pub fn new(dir: Option<PathBuf>) -> CapsCache {
        CapsCache {
            dir,
            memory: Mutex::new(HashMap::new()),
            probes: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many probes (process triples) this cache has run.
    pub fn probes_run(&self) -> usize {
        self.probes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn file_for(&self, path: &Path) -> Option<PathBuf> {
        let name: String = path
            .to_string_lossy()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.as_ref().map(|d| d.join(format!("{name}.json")))
    }

    /// The capabilities of the binary at `path`, probing only when this
    /// exact binary has not been seen.
    pub async fn get(&self, path: &Path) -> Result<Arc<Capabilities>> {
        let identity = BinaryIdentity::of(path)?;
        if let Some((id, caps)) = self.lock().get(path) {
            if *id == identity {
                return Ok(caps.clone());
            }
        }
        if let Some(file) = self.file_for(path) {
            let trusted = file
                .parent()
                .is_some_and(|d| kvm_runtime::fsutil::check_trusted_dir(d).is_ok());
            if let Some(data) = trusted
                .then(|| {
                    kvm_runtime::fsutil::read_capped(&file, MAX_CACHE_FILE)
                        .ok()
                        .flatten()
                })
                .flatten()
            {
                if let Ok(entry) = serde_json::from_slice::<CacheEntry>(&data) {
                    if entry.identity == identity && entry.rules == rules_fingerprint() {
                        let caps = Arc::new(entry.capabilities);
                        self.lock()
                            .insert(path.to_owned(), (identity, caps.clone()));
                        return Ok(caps);
                    }
                }
            }
        }
        let caps = Arc::new(probe(path).await?);
        self.probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(file) = self.file_for(path) {
            let entry = CacheEntry {
                identity: identity.clone(),
                rules: rules_fingerprint(),
                capabilities: (*caps).clone(),
            };
            // A cache that cannot be written only costs a probe next time.
            if let Err(e) = write_cache(&file, &entry) {
                tracing::debug!(error = %e.report(), file = %file.display(), "capability cache not written");
            }
        }
        self.lock()
            .insert(path.to_owned(), (identity, caps.clone()));
        Ok(caps)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (BinaryIdentity, Arc<Capabilities>)>> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes a cache file: in a directory this user owns and nobody else can
/// write, under an unguessable temp name created exclusively, never
/// following a planted symlink (a cache is not worth an fsync).
fn write_cache(file: &Path, entry: &CacheEntry) -> std::result::Result<(), kvm_runtime::Error> {
    if let Some(dir) = file.parent() {
        kvm_runtime::fsutil::ensure_private_dir(dir)?;
    }
    kvm_runtime::fsutil::write_atomic_volatile(file, &serde_json::to_vec(entry).unwrap_or_default())
}

/// Largest cache file read back (a probe of QEMU 10.0 is about 60 KiB).
const MAX_CACHE_FILE: u64 = 8 << 20;

async fn run(path: &Path, args: &[&str], may_fail: bool) -> Result<String> {
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
        Err(_) => {
            return Err(Error::Probe {
                path: path.to_owned(),
                reason: format!("{} did not answer within {PROBE_TIMEOUT:?}", args.join(" ")),
            })
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::QemuMissing {
                path: path.to_owned(),
            })
        }
        Ok(Err(e)) => {
            return Err(Error::Probe {
                path: path.to_owned(),
                reason: format!("cannot run it: {e}"),
            })
        }
        Ok(Ok(o)) => o,
    };
    if !out.status.success() && !may_fail {
        return Err(Error::Probe {
            path: path.to_owned(),
            reason: format!("{} exited with {}", args.join(" "), out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Probes a binary now (no cache): `--help`, `-machine ?` and `-device ?`
/// in parallel.
pub async fn probe(path: &Path) -> Result<Capabilities> {
    let (help, machines, devices) = tokio::join!(
        run(path, &["--help"], false),
        run(path, &["-machine", "?"], false),
        // Old QEMU has no -device; Ganeti accepted failure here too.
        run(path, &["-device", "?"], true),
    );
    Capabilities::from_help(&help?, &machines?, &devices.unwrap_or_default()).map_err(|e| {
        Error::Probe {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })
}
