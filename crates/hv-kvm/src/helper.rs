//! Host-side helpers an instance owns (libvirt's "external devices"): a
//! swtpm emulating its TPM. Each is started before QEMU (which connects to
//! it), runs as the user QEMU drops to under `security_model=user|pool`,
//! ends with QEMU (`--terminate`: when QEMU's connection closes), is
//! ended by every cleanup once QEMU is gone (also one left by a gkvm
//! killed before its QEMU started: `InstancePaths::stop_helpers`), and
//! keeps its persistent state beside the UEFI variable store, in the
//! node's state directory (`instances/NAME/tpm/`), which only
//! `remove-state` removes. A migration's destination starts its own; the
//! TPM's state comes in QEMU's migration stream.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use kvm_cmdline::hvparams::{SecurityModel, Tpm};
use kvm_cmdline::InstanceSpec;
use kvm_runtime::InstancePaths;

use crate::error::{Error, Result};
use crate::KvmHypervisor;

impl KvmHypervisor {
    /// The directory of an instance's TPM state on this node.
    pub fn tpm_state_dir(&self, name: &str) -> PathBuf {
        self.state_dir_of(name).join("tpm")
    }

    /// Starts the instance's helpers: a swtpm for `tpm=tpm2`, listening
    /// on the instance's TPM socket once this returns, running as the
    /// user QEMU drops to (`security_model=user|pool`: `run_as`) or as
    /// gkvm's caller.
    ///
    /// gkvm makes what swtpm would otherwise make in the run directory,
    /// which an unprivileged swtpm cannot enter: the control socket
    /// (bound and listening before swtpm starts, handed over as a
    /// descriptor: QEMU, which connects before it drops its privileges,
    /// may connect at once), the pid file (swtpm is gkvm's child, in a
    /// session of its own, and outlives it), the log (a descriptor) and
    /// the way into its state directory (a descriptor, the directory
    /// owned by the user swtpm runs as).
    pub(crate) async fn start_helpers(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        run_as: Option<&str>,
        cgroup: &[PathBuf],
    ) -> Result<()> {
        if spec.hvparams.tpm == Tpm::None {
            return Ok(());
        }
        let name = spec.name.as_str();
        let fail = |reason: String| Error::Start {
            instance: name.to_owned(),
            step: "swtpm",
            reason,
        };
        let user = match (spec.hvparams.security_model, run_as) {
            (SecurityModel::None, _) => None,
            (_, Some(user)) => Some(user),
            (SecurityModel::User, None) => Some(spec.hvparams.security_domain.as_str()),
            (SecurityModel::Pool, None) => {
                return Err(fail("security_model=pool but no user was allocated".into()))
            }
        };
        let ids = match user {
            None => None,
            Some(user) => {
                let u = nix::unistd::User::from_name(user)
                    .ok()
                    .flatten()
                    .ok_or_else(|| {
                        fail(format!("user {user:?} (security_domain) does not exist"))
                    })?;
                Some((u.uid, u.gid))
            }
        };
        // One left by an earlier run of this instance goes first.
        paths.stop_helpers().map_err(|source| Error::Runtime {
            instance: name.to_owned(),
            source,
        })?;
        let dir = self.tpm_state_dir(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(fail(format!("{} is not a directory", dir.display()))),
        }
        if let Some((uid, gid)) = ids {
            // The state is the user's (a pool hands out another uid at
            // each start).
            own_tree(&dir, uid, gid).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        }
        let state =
            std::fs::File::open(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let log_dir = self.log_dir();
        kvm_runtime::fsutil::ensure_private_dir(&log_dir).map_err(|source| Error::Runtime {
            instance: name.to_owned(),
            source,
        })?;
        let log_path = log_dir.join(format!("{name}.swtpm.log"));
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&log_path)
            .map_err(|e| fail(format!("{}: {e}", log_path.display())))?;
        // swtpm splits its options at commas; the socket's path is in its
        // command line, where the cleanup recognizes it.
        let socket_text = paths.tpm.to_str().unwrap_or(",");
        if socket_text.contains(',') {
            return Err(fail(format!(
                "{} has a comma (or is not UTF-8), which swtpm cannot take",
                paths.tpm.display()
            )));
        }
        remove_stale(&paths.tpm).map_err(|e| fail(format!("{}: {e}", paths.tpm.display())))?;
        let listener = std::os::unix::net::UnixListener::bind(&paths.tpm)
            .map_err(|e| fail(format!("{}: {e}", paths.tpm.display())))?;
        std::fs::set_permissions(&paths.tpm, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(format!("{}: {e}", paths.tpm.display())))?;
        let mut cmd = std::process::Command::new(&self.config.swtpm_path);
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir=/proc/self/fd/{STATE_FD},mode=0600"))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={socket_text},fd={CTRL_FD}"))
            .arg("--log")
            .arg(format!("fd={LOG_FD},level=1"))
            .arg("--terminate")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(
                log.try_clone()
                    .map_err(|e| fail(format!("{}: {e}", log_path.display())))?,
            );
        // Into the cgroup while still privileged, then the user (std's
        // own uid() would switch before any hook runs).
        crate::process::join_cgroup(&mut cmd, cgroup);
        if let Some((uid, gid)) = ids {
            drop_privileges(&mut cmd, uid.as_raw(), gid.as_raw());
        }
        place_fds(
            &mut cmd,
            [
                (listener.as_raw_fd(), CTRL_FD),
                (log.as_raw_fd(), LOG_FD),
                (state.as_raw_fd(), STATE_FD),
            ],
        );
        let swtpm = self.config.swtpm_path.display().to_string();
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => fail(format!(
                    "{swtpm} is not installed (Debian's swtpm; or set swtpm_path)"
                )),
                _ => fail(format!("{swtpm}: {e}")),
            })?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        kvm_runtime::fsutil::write_atomic(&paths.tpm_pid, format!("{pid}\n").as_bytes()).map_err(
            |source| Error::Runtime {
                instance: name.to_owned(),
                source,
            },
        )?;
        // Only swtpm holds the socket now: if it dies, QEMU's connection
        // is refused instead of waiting.
        drop(listener);
        if let Ok(Some(status)) = child.try_wait() {
            let mut reason = format!("{swtpm} exited at once ({status})");
            let last = crate::qemu_log::tail(&log_path, 2);
            if !last.is_empty() {
                reason.push_str(&format!("; its log ends: {last}"));
            }
            return Err(fail(reason));
        }
        // Reaped by tokio when it ends while this process lives; by init
        // after.
        drop(child);
        tracing::debug!(instance = name, pid, user, "swtpm listens");
        Ok(())
    }
}

/// Where swtpm finds what gkvm opened for it.
const CTRL_FD: i32 = 3;
const LOG_FD: i32 = 4;
const STATE_FD: i32 = 5;

/// Makes each `(from, to)` descriptor of this process descriptor `to` of
/// the child (close-on-exec cleared), the child in a session of its own
/// (a Ctrl-C at gkvm's terminal does not reach it). Sources are first
/// copied above every target, so a source that is another's target is
/// still right.
fn place_fds(cmd: &mut std::process::Command, moves: [(i32, i32); 3]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child and only calls
    // fcntl(2), dup2(2), close(2) and setsid(2), which are
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 3];
            for (i, (from, _)) in moves.iter().enumerate() {
                high[i] = nix::libc::fcntl(*from, nix::libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, (_, to)) in moves.iter().enumerate() {
                if nix::libc::dup2(high[i], *to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::libc::close(high[i]);
            }
            if nix::libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child `uid:gid` with no supplementary groups, in the order
/// a privileged process must: groups, then gid, then uid.
fn drop_privileges(cmd: &mut std::process::Command, uid: u32, gid: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child and only calls
    // setgroups(2), setgid(2) and setuid(2), which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::setgroups(0, std::ptr::null()) != 0
                || nix::libc::setgid(gid) != 0
                || nix::libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Gives `dir` and everything in it (swtpm's state: files, no deeper
/// directories) to `uid:gid`, never following a symlink.
fn own_tree(
    dir: &std::path::Path,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
) -> std::io::Result<()> {
    use nix::fcntl::AtFlags;
    use nix::unistd::fchownat;
    let chown = |p: &std::path::Path| {
        fchownat(None, p, Some(uid), Some(gid), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(std::io::Error::from)
    };
    chown(dir)?;
    for entry in std::fs::read_dir(dir)? {
        chown(&entry?.path())?;
    }
    Ok(())
}

/// Removes a leftover socket file at `path` (a stale one of a killed
/// swtpm); anything else there is an error.
fn remove_stale(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::other("is there and is not a socket")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Refuses, before anything is made for the instance, helpers its
/// definition cannot have: a TPM with a kernel QEMU boots directly.
pub(crate) fn check_helpers(spec: &InstanceSpec) -> Result<()> {
    if spec.hvparams.tpm == Tpm::None {
        return Ok(());
    }
    if let Some(kernel) = &spec.hvparams.kernel_path {
        if is_elf(kernel) {
            return Err(Error::Params {
                instance: spec.name.clone(),
                source: kvm_cmdline::Error::Syntax {
                    key: "tpm".into(),
                    reason: format!(
                        "needs a kernel that firmware boots (a bzImage): {} is an ELF \
                         image, which QEMU boots directly (PVH), and then the guest gets \
                         broken ACPI tables and finds neither its TPM nor its power button",
                        kernel.display()
                    ),
                },
            });
        }
    }
    Ok(())
}

/// Whether `path` is an ELF image (an uncompressed kernel, which QEMU
/// boots directly through PVH).
fn is_elf(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}
