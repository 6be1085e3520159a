//! Helper processes an instance owns beside its QEMU (a swtpm for its
//! TPM): found by their pid file and identified by their command line
//! (which names the instance's socket), ended once QEMU is gone.

use std::path::Path;
use std::time::Duration;

use crate::fsutil::remove_file;
use crate::{Error, InstancePaths};

/// How long an ended helper may take to go.
const HELPER_EXIT: Duration = Duration::from_secs(5);

impl InstancePaths {
    /// The instance's swtpm, if its pid file names a live process whose
    /// command line has this instance's TPM socket (a pid file naming
    /// anything else is not trusted).
    pub fn tpm_helper(&self) -> Option<i32> {
        let data = crate::fsutil::read_capped(&self.tpm_pid, 64).ok()??;
        let pid = String::from_utf8_lossy(&data).trim().parse::<i32>().ok()?;
        (pid > 0 && names_socket(pid, &self.tpm)).then_some(pid)
    }

    /// Ends the helpers the instance had (its QEMU is gone; a swtpm
    /// whose gkvm was killed before QEMU started still waits for it) and
    /// removes their files. Idempotent.
    pub fn stop_helpers(&self) -> Result<(), Error> {
        let mut pids: Vec<i32> = self.tpm_helper().into_iter().collect();
        if pids.is_empty() && std::fs::symlink_metadata(&self.tpm).is_ok() {
            // The socket is made before swtpm starts and its pid file
            // after: a gkvm killed in between leaves a swtpm no pid file
            // names, found by its command line.
            pids = swtpms_naming(&self.tpm);
        }
        for pid in pids {
            tracing::info!(instance = %self.name, pid, "ending its swtpm");
            if let Ok(Some(fd)) = crate::pidfd_open(pid) {
                crate::kill_and_wait_pidfd(&fd, HELPER_EXIT);
            }
        }
        remove_file(&self.tpm)?;
        remove_file(&self.tpm_pid)?;
        // And the pid file's temp file, when gkvm was killed writing it.
        crate::fsutil::remove_tmp_files(&self.tpm_pid)
    }
}

/// Live swtpm processes whose command line names `socket`.
fn swtpms_naming(socket: &Path) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(b"swtpm"))
        })
        .filter(|&pid| names_socket(pid, socket))
        .collect()
}

/// Whether live process `pid` has `socket` in its command line (as
/// `path=SOCKET`, how swtpm is given its control socket): the same path,
/// or the same file name in the same directory reached by another path (a
/// run directory given as `/var/run/...` by one caller and `/run/...` by
/// another).
fn names_socket(pid: i32, socket: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    if crate::is_zombie_or_gone(pid) {
        return false;
    }
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    raw.split(|b| *b == 0)
        .flat_map(|arg| arg.split(|b| *b == b','))
        .filter_map(|part| part.strip_prefix(b"path="))
        .any(|given| {
            crate::fsutil::same_place(Path::new(std::ffi::OsStr::from_bytes(given)), socket)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_reached_by_another_path_is_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("alias")).unwrap();
        let sock = real.join("vm1.tpm");
        assert!(crate::fsutil::same_place(&sock, &sock));
        assert!(crate::fsutil::same_place(
            &tmp.path().join("alias/vm1.tpm"),
            &sock
        ));
        assert!(!crate::fsutil::same_place(
            &tmp.path().join("alias/vm2.tpm"),
            &sock
        ));
        assert!(!crate::fsutil::same_place(Path::new("vm1.tpm"), &sock));
    }

    /// A pid file planted to name another process (here: this test's) is
    /// not trusted: the process is not the instance's helper, and ending
    /// the helpers leaves it alone and removes the file.
    #[test]
    fn a_tampered_helper_pid_file_names_no_helper() {
        let tmp = tempfile::tempdir().unwrap();
        let run = crate::RunDir::new(tmp.path().join("run"));
        run.ensure().unwrap();
        let paths = run.instance("vm1").unwrap();
        std::fs::write(&paths.tpm_pid, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(paths.tpm_helper(), None);
        std::fs::write(&paths.tpm_pid, "garbage\n").unwrap();
        assert_eq!(paths.tpm_helper(), None);
        paths.stop_helpers().unwrap();
        assert!(!paths.tpm_pid.exists());
        // A symlink planted as the pid file is not followed either.
        std::os::unix::fs::symlink("/proc/self/stat", &paths.tpm_pid).unwrap();
        assert_eq!(paths.tpm_helper(), None);
        paths.stop_helpers().unwrap();
        assert!(std::fs::symlink_metadata(&paths.tpm_pid).is_err());
    }

    /// A swtpm whose gkvm was killed before it wrote the pid file is found
    /// by the socket its command line names, and ended; a process of
    /// another name with that command line is left alone.
    #[test]
    fn a_helper_without_its_pid_file_is_found_by_its_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let run = crate::RunDir::new(tmp.path().join("run"));
        let paths = run.instance("vm3").unwrap();
        std::fs::create_dir_all(paths.tpm.parent().unwrap()).unwrap();
        std::fs::write(&paths.tpm, b"").unwrap();
        let arg = format!("type=unixio,path={},fd=3", paths.tpm.display());
        // Shells blocked reading a pipe: one named swtpm, one sh.
        let fake = tmp.path().join("swtpm");
        std::fs::copy("/bin/sh", &fake).unwrap();
        let blocked = |program: &Path| {
            std::process::Command::new(program)
                .args(["-c", "read x", "x", &arg])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut other = blocked(Path::new("/bin/sh"));
        let mut swtpm = blocked(&fake);
        let pid = i32::try_from(swtpm.id()).unwrap();
        // spawn returns once the child's exec is past its point of no
        // return, a moment before the kernel names it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(b"swtpm")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the fake swtpm did not start"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(swtpms_naming(&paths.tpm), [pid]);
        paths.stop_helpers().unwrap();
        assert!(
            swtpm.try_wait().unwrap().is_some(),
            "the swtpm outlived stop_helpers"
        );
        assert!(
            other.try_wait().unwrap().is_none(),
            "another process was ended"
        );
        assert!(!paths.tpm.exists());
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
