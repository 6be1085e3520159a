//! File primitives: trusted private directories, atomic replace with
//! unpredictable temp names, no-follow reads with a size cap.
//!
//! The run directory is root's: anything another user can write into is a
//! way to make root overwrite or read what it should not. So a directory
//! is used only if this user owns it and nobody else can write it (one we
//! did not create is never chmodded), no path component we create or
//! replace is followed when it is a symlink, and temp files are created
//! exclusively under names nobody can guess.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// Largest runtime, pid, NIC or uid file read (a runtime record is a few
/// KiB; anything near this is not ours).
pub const MAX_STATE_FILE: u64 = 4 << 20;

/// Checks that `dir` is a directory this user may trust: not a symlink,
/// owned by the effective uid, not writable by others, nor by its group
/// unless that group is root's (Ganeti creates its run directories 0775
/// root:root, and root's group writing there is root writing there).
pub fn check_trusted_dir(dir: &Path) -> Result<(), Error> {
    let m = fs::symlink_metadata(dir).map_err(|e| Error::io("stat", dir, e))?;
    trusted(dir, &m)
}

fn trusted(dir: &Path, m: &fs::Metadata) -> Result<(), Error> {
    if !m.is_dir() {
        return Err(Error::UnexpectedFileType {
            path: dir.to_owned(),
            expected: "directory",
        });
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if m.uid() != euid {
        return Err(Error::Untrusted {
            path: dir.to_owned(),
            reason: format!("owned by uid {}, not by this user (uid {euid})", m.uid()),
        });
    }
    let writable = if m.gid() == 0 && euid == 0 {
        0o002
    } else {
        0o022
    };
    if m.mode() & writable != 0 {
        return Err(Error::Untrusted {
            path: dir.to_owned(),
            reason: format!(
                "mode {:04o} lets other users write into it (use a private directory)",
                m.mode() & 0o7777
            ),
        });
    }
    Ok(())
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that an
/// existing one is trusted ([`check_trusted_dir`]). An existing directory
/// is never chmodded: what this process did not create is not its to fix.
pub fn ensure_private_dir(dir: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(dir) {
        Ok(m) => trusted(dir, &m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io("create directory", dir, e))?;
            // A racing creator may have won with other permissions.
            check_trusted_dir(dir)
        }
        Err(e) => Err(Error::io("stat", dir, e)),
    }
}

/// 128 bits from the kernel's random pool, in hex.
pub(crate) fn random_hex() -> String {
    let mut buf = [0u8; 16];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom(2) writes at most the given length into `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        // Only EINTR (n < 0) is possible with flags 0 on Linux ≥ 3.17; retry.
        if let Ok(n) = usize::try_from(n) {
            filled += n;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The prefix of every temp file made for `path` (used by cleanup).
pub(crate) fn tmp_prefix(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{file}.tmp.")
}

/// Replaces `path` with `data` atomically: a new 0600 file in the same
/// directory, created exclusively under an unpredictable name (never
/// through a planted symlink), fsync, rename over the old one, fsync the
/// directory. A reader sees the old or the new content, never a mix, even
/// if this process dies at any point.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    write_atomic_opts(path, data, true)
}

/// [`write_atomic`] without the fsyncs: atomic for readers, not durable
/// across a power cut (for caches that can be rebuilt).
pub fn write_atomic_volatile(path: &Path, data: &[u8]) -> Result<(), Error> {
    write_atomic_opts(path, data, false)
}

fn write_atomic_opts(path: &Path, data: &[u8], durable: bool) -> Result<(), Error> {
    let tmp = path.with_file_name(format!("{}{}", tmp_prefix(path), random_hex()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(data).map_err(|e| Error::io("write", &tmp, e))?;
        if durable {
            f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        }
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        if durable {
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::io("fsync directory", dir, e))?;
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a regular file of at most `max` bytes without following a
/// symlink at `path`; `Ok(None)` when it does not exist. A device, FIFO or
/// directory is refused before anything is read, so `/dev/zero` cannot
/// exhaust memory.
pub fn read_capped(path: &Path, max: u64) -> Result<Option<Vec<u8>>, Error> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::UnexpectedFileType {
                path: path.to_owned(),
                expected: "regular file",
            })
        }
        Err(e) => return Err(Error::io("open", path, e)),
    };
    read_open_capped(f, path, max).map(Some)
}

/// The last `max` bytes of a regular file (whole lines: a line cut by the
/// start of the window is dropped), never through a symlink; empty when
/// the file does not exist.
pub(crate) fn read_tail_nofollow(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::UnexpectedFileType {
                path: path.to_owned(),
                expected: "regular file",
            })
        }
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let meta = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::UnexpectedFileType {
            path: path.to_owned(),
            expected: "regular file",
        });
    }
    let start = meta.len().saturating_sub(max);
    f.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io("seek", path, e))?;
    let mut data = Vec::new();
    f.take(max)
        .read_to_end(&mut data)
        .map_err(|e| Error::io("read", path, e))?;
    if start > 0 {
        let cut = data
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |i| i + 1);
        data.drain(..cut);
    }
    Ok(data)
}

/// Reads an open file of at most `max` bytes (must be a regular file).
pub fn read_open_capped(f: File, path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let meta = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::UnexpectedFileType {
            path: path.to_owned(),
            expected: "regular file",
        });
    }
    if meta.len() > max {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read", path, e))?;
    if buf.len() as u64 > max {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(buf)
}

/// `a` and `b` name the same place: equal, or the same file name in one
/// directory (by device and inode).
pub(crate) fn same_place(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    let (Some(da), Some(na), Some(db), Some(nb)) =
        (a.parent(), a.file_name(), b.parent(), b.file_name())
    else {
        return false;
    };
    if na != nb || !a.is_absolute() {
        return false;
    }
    match (std::fs::metadata(da), std::fs::metadata(db)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// A file's identity: device, inode, size, modification time (seconds,
/// nanoseconds) and change time (nanoseconds). gkvm replaces its state
/// files by rename, never in place: the same identity is the same content.
pub type FileKey = (u64, u64, u64, i64, i64, i64);

/// The identity of a regular file at `path` (not followed if a symlink);
/// `None` for anything else or nothing.
pub fn file_key(path: &Path) -> Option<FileKey> {
    fs::symlink_metadata(path)
        .ok()
        .filter(fs::Metadata::is_file)
        .map(|m| key_of(&m))
}

/// [`FileKey`] of what `meta` describes.
pub fn key_of(meta: &fs::Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime_nsec(),
    )
}

/// Reads a regular file without following a symlink at `path`, capped at
/// [`MAX_STATE_FILE`]; `Ok(None)` when it does not exist.
pub(crate) fn read_nofollow(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    read_capped(path, MAX_STATE_FILE)
}

/// Removes a file; a missing one is fine.
pub(crate) fn remove_file(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Whether something listens on the Unix socket at `path` (a connection is
/// accepted into its backlog). Only a socket nobody serves may be removed.
pub fn socket_in_use(path: &Path) -> bool {
    match fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::os::unix::net::UnixStream::connect(path).is_ok()
        }
        _ => false,
    }
}

/// Removes a socket unless something still serves it.
pub(crate) fn remove_socket(path: &Path) -> Result<(), Error> {
    if socket_in_use(path) {
        return Err(Error::SocketInUse {
            path: path.to_owned(),
        });
    }
    remove_file(path)
}

/// Removes the temp files a killed writer left for `path`.
pub(crate) fn remove_tmp_files(path: &Path) -> Result<(), Error> {
    let (Some(dir), prefix) = (path.parent(), tmp_prefix(path)) else {
        return Ok(());
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            remove_file(&entry.path())?;
        }
    }
    Ok(())
}

/// `dir/name` for every `name` in `dir` (empty when `dir` is missing).
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect())
}
