//! Each instance's QEMU log, `NAME.log` in the node's log directory: QEMU
//! writes its messages there before and after it daemonizes (its stderr is
//! the file, and `-D` keeps it from redirecting stderr to /dev/null). A
//! start keeps the previous run's log as `NAME.log.1`. The file is 0600
//! (QEMU's messages can name paths and addresses); for logrotate use
//! `copytruncate`, QEMU keeps the file open.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::KvmHypervisor;

/// Most of a log read back for an error or a crash reason.
const TAIL_BYTES: u64 = 8 << 10;

impl KvmHypervisor {
    /// The node's log directory.
    pub(crate) fn log_dir(&self) -> PathBuf {
        self.config
            .log_dir
            .clone()
            .unwrap_or_else(|| self.config.run_dir.root().join("log"))
    }

    /// The QEMU log of instance `name`.
    pub fn instance_log(&self, name: &str) -> PathBuf {
        self.log_dir().join(format!("{name}.log"))
    }

    /// Opens a fresh log for a start of `name` (the last one kept as
    /// `.1`): append-only, 0600, never through a symlink planted there.
    pub(crate) fn open_log(&self, name: &str) -> Result<(PathBuf, std::fs::File)> {
        let dir = self.log_dir();
        kvm_runtime::fsutil::ensure_private_dir(&dir).map_err(|e| Error::Runtime {
            instance: name.to_owned(),
            source: e,
        })?;
        let path = self.instance_log(name);
        let fail = |e: std::io::Error| Error::Io {
            context: format!("QEMU log {}", path.display()),
            source: e,
        };
        match std::fs::rename(&path, path.with_extension("log.1")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(fail)?;
        Ok((path, file))
    }
}

/// The last lines of a log that say something (QEMU's warnings about CPU
/// features this host lacks and modules it could not load left out),
/// joined with "; ".
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    // Not through a symlink planted at the log's place.
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = std::io::Seek::seek(
        &mut f,
        std::io::SeekFrom::Start(len.saturating_sub(TAIL_BYTES)),
    );
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::Read::take(f, TAIL_BYTES), &mut text);
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.contains("host doesn't support requested feature")
                && !l.contains("failed to open module")
        })
        .collect();
    // What QEMU wrote is shown, never run by a terminal.
    kept[kept.len().saturating_sub(lines)..]
        .join("; ")
        .chars()
        .flat_map(|c| {
            let escaped = c.is_control().then(|| c.escape_default());
            escaped
                .into_iter()
                .flatten()
                .chain((!c.is_control()).then_some(c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_escapes_controls_and_follows_no_symlink() {
        let dir = std::env::temp_dir().join(format!("gkvm-logtail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("i1.log");
        std::fs::write(&log, "first\nqemu: \u{1b}[2Jcleared\n").unwrap();
        let t = tail(&log, 2);
        assert_eq!(t, "first; qemu: \\u{1b}[2Jcleared");
        let secret = dir.join("secret");
        std::fs::write(&secret, "not for the log\n").unwrap();
        let link = dir.join("i2.log");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert_eq!(tail(&link, 2), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
