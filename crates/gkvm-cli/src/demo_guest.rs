//! The demo's guest on an installed system, where there is no source tree
//! and no `scripts/build-test-guest`: made at run time of the host's own
//! kernel (`/boot/vmlinuz-VERSION` and its modules under
//! `/lib/modules/VERSION`) and a static busybox (Debian's
//! `busybox-static`), with the test guest's own `/init` and command line
//! (`packaging/test-guest/`), and kept in the node's state directory
//! until the kernel or busybox changes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The guest's `/init` (also the test guest's).
const INIT: &str = include_str!("../../../packaging/test-guest/init");
/// Its kernel command line.
pub(crate) const CMDLINE: &str = include_str!("../../../packaging/test-guest/cmdline");
/// The modules it loads, in an order that satisfies their dependencies.
const MODULES: &str = include_str!("../../../packaging/test-guest/modules");

/// Makes (or finds made) the guest of the host under `root` (`/`, or a
/// test's tree) in `cache`; returns the directory (`kernel`,
/// `initramfs.cpio`, `cmdline`). Errors say what to install.
pub(crate) fn make(root: &Path, cache: &Path) -> Result<PathBuf, String> {
    let kernel = host_kernel(root)?;
    let busybox = static_busybox(root)?;
    let version = kernel
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let stamp = stamp(&[&kernel, &busybox]);
    if std::fs::read_to_string(cache.join("stamp")).is_ok_and(|s| s == stamp)
        && cache.join("kernel").is_file()
        && cache.join("initramfs.cpio").is_file()
    {
        return Ok(cache.to_owned());
    }
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&version))
        .find(|d| d.is_dir());
    let mut found = HashMap::new();
    if let Some(dir) = &modules_dir {
        index_modules(dir, &mut found);
    }
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    cpio.console();
    cpio.file("init", 0o755, INIT.as_bytes());
    let busybox_data = read(&busybox)?;
    cpio.file("bin/busybox", 0o755, &busybox_data);
    let mut order = String::new();
    for name in MODULES.split_whitespace() {
        // Built into the kernel, or not there: the guest does without.
        let Some(path) = found.get(name) else {
            continue;
        };
        let data = module_data(path)?;
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
        order.push_str(name);
        order.push('\n');
    }
    cpio.file("lib/modules/order", 0o644, order.as_bytes());
    let archive = cpio.finish();

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache)
        .map_err(|e| format!("{}: {e}", cache.display()))?;
    write(&cache.join("kernel"), &read(&kernel)?)?;
    write(&cache.join("initramfs.cpio"), &archive)?;
    write(&cache.join("cmdline"), CMDLINE.as_bytes())?;
    write(&cache.join("stamp"), stamp.as_bytes())?;
    Ok(cache.to_owned())
}

/// The host's kernel: the running one's image when `/boot` has it, else
/// the newest there.
fn host_kernel(root: &Path) -> Result<PathBuf, String> {
    let boot = root.join("boot");
    let running = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|r| boot.join(format!("vmlinuz-{}", r.trim())));
    if let Some(k) = running.filter(|k| k.is_file()) {
        return Ok(k);
    }
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    images.sort();
    images.pop().map(|(_, p)| p).ok_or_else(|| {
        format!(
            "no kernel image in {} to make the demo's guest of: install one (apt install linux-image-amd64), or give --guest-dir",
            boot.display()
        )
    })
}

/// A statically linked busybox (a dynamic one cannot run in the guest,
/// which has no libraries).
fn static_busybox(root: &Path) -> Result<PathBuf, String> {
    let path = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| "no busybox for the demo's guest: apt install busybox-static".to_owned())?;
    if has_interpreter(&read(&path)?) {
        return Err(format!(
            "{} is dynamically linked and the demo's guest has no libraries: apt install busybox-static",
            path.display()
        ));
    }
    Ok(path)
}

/// Whether an ELF64 file asks for a program interpreter (is dynamically
/// linked): a `PT_INTERP` program header.
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !elf.starts_with(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(count)).any(|i| u32_at(phoff + i * usize::from(size)) == Some(3))
}

/// Every module file under `dir`, by module name (`NAME.ko`,
/// `NAME.ko.xz`, `NAME.ko.zst`).
fn index_modules(dir: &Path, found: &mut HashMap<String, PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => index_modules(&path, found),
            Ok(t) if t.is_file() => {
                let file = entry.file_name().to_string_lossy().into_owned();
                for suffix in [".ko", ".ko.xz", ".ko.zst"] {
                    if let Some(name) = file.strip_suffix(suffix) {
                        found.entry(name.to_owned()).or_insert(path.clone());
                    }
                }
            }
            _ => {}
        }
    }
}

/// A module as busybox's `insmod` loads it: uncompressed.
fn module_data(path: &Path) -> Result<Vec<u8>, String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tool = match ext {
        "xz" => "xz",
        "zst" => "zstd",
        _ => return read(path),
    };
    let out = std::process::Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{tool} (to decompress {}): {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!("{tool} could not decompress {}", path.display()));
    }
    Ok(out.stdout)
}

/// What the made guest depends on: the files (their size and time) and
/// what this gkvm puts in.
fn stamp(files: &[&Path]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (INIT, CMDLINE, MODULES).hash(&mut h);
    for f in files {
        f.hash(&mut h);
        if let Ok(m) = std::fs::metadata(f) {
            (m.len(), m.mtime(), m.mtime_nsec()).hash(&mut h);
        }
    }
    format!("{:016x}\n", h.finish())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a file whole under a temporary name, then renames it.
fn write(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", path.display())
        })
}

/// A `newc` cpio archive (the kernel's initramfs format), made in memory:
/// no root needed for its device node.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    /// `/dev/console` (5, 1): the kernel opens it for `/init`'s output
    /// before anything mounts `/dev`.
    fn console(&mut self) {
        self.entry("dev/console", 0o020600, (5, 1), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpio_archive_is_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let a = c.finish();
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file's data follows its 4-aligned name.
        let at = text.find("#!/bin/sh").unwrap();
        assert_eq!(at % 4, 0);
    }

    #[test]
    fn a_dynamic_elf_is_told_from_a_static_one() {
        // This test binary is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me));
        assert!(!has_interpreter(b"not an elf"));
        if let Ok(busybox) = std::fs::read("/bin/busybox") {
            // Debian's busybox-static (what the tests install).
            assert!(!has_interpreter(&busybox));
        }
    }
}
