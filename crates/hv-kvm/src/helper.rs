//! Host-side helpers an instance owns (libvirt's "external devices"): a
//! swtpm emulating its TPM. Each is started before QEMU (which connects to
//! it), ends with QEMU (`--terminate`: when QEMU's connection closes), is
//! ended by every cleanup once QEMU is gone (also one left by a gkvm
//! killed before its QEMU started: `InstancePaths::stop_helpers`), and
//! keeps its persistent state beside the UEFI variable store, in the
//! node's state directory (`instances/NAME/tpm/`), which only
//! `remove-state` removes. A migration's destination starts its own; the
//! TPM's state comes in QEMU's migration stream.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_cmdline::hvparams::{SecurityModel, Tpm};
use kvm_cmdline::InstanceSpec;
use kvm_runtime::InstancePaths;

use crate::error::{Error, Result};
use crate::KvmHypervisor;

/// How long swtpm may take to listen.
const SWTPM_START: Duration = Duration::from_secs(10);

impl KvmHypervisor {
    /// The directory of an instance's TPM state on this node.
    pub fn tpm_state_dir(&self, name: &str) -> PathBuf {
        self.state_dir_of(name).join("tpm")
    }

    /// Starts the instance's helpers: a swtpm for `tpm=tpm2`, listening
    /// on the instance's TPM socket once this returns.
    pub(crate) async fn start_helpers(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
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
        if spec.hvparams.security_model != SecurityModel::None {
            return Err(fail(format!(
                "a TPM with security_model={} is not supported yet (swtpm would run \
                 as root beside an unprivileged QEMU)",
                spec.hvparams.security_model.as_str()
            )));
        }
        if let Some(kernel) = &spec.hvparams.kernel_path {
            if is_elf(kernel) {
                return Err(Error::Params {
                    instance: name.to_owned(),
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
        let log_dir = self.log_dir();
        kvm_runtime::fsutil::ensure_private_dir(&log_dir).map_err(|source| Error::Runtime {
            instance: name.to_owned(),
            source,
        })?;
        let log = log_dir.join(format!("{name}.swtpm.log"));
        for path in [&dir, &paths.tpm, &paths.tpm_pid, &log] {
            // swtpm splits its options at commas.
            let text = path.to_str().unwrap_or(",");
            if text.contains(',') {
                return Err(fail(format!(
                    "{} has a comma (or is not UTF-8), which swtpm cannot take",
                    path.display()
                )));
            }
        }
        let mut cmd = tokio::process::Command::new(&self.config.swtpm_path);
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={},mode=0600", dir.display()))
            .arg("--ctrl")
            .arg(format!(
                "type=unixio,path={},mode=0600",
                paths.tpm.display()
            ))
            .arg("--pid")
            .arg(format!("file={}", paths.tpm_pid.display()))
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .arg("--terminate")
            .arg("--daemon")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let swtpm = self.config.swtpm_path.display().to_string();
        let out = match tokio::time::timeout(SWTPM_START, cmd.output()).await {
            Err(_) => {
                return Err(fail(format!(
                    "{swtpm} did not start within {SWTPM_START:?}"
                )))
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(format!(
                    "{swtpm} is not installed (Debian's swtpm; or set swtpm_path)"
                )))
            }
            Ok(Err(e)) => return Err(fail(format!("{swtpm}: {e}"))),
            Ok(Ok(out)) => out,
        };
        if !out.status.success() {
            let mut reason = format!(
                "{swtpm} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let last = crate::qemu_log::tail(&log, 2);
            if !last.is_empty() {
                reason.push_str(&format!("; its log ends: {last}"));
            }
            return Err(fail(reason));
        }
        // Daemonized: listening once its pid file names it and its socket
        // is there.
        let deadline = Instant::now() + SWTPM_START;
        while paths.tpm_helper().is_none() || !paths.tpm.exists() {
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "{swtpm} did not listen on {} within {SWTPM_START:?}",
                    paths.tpm.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::debug!(instance = name, pid = paths.tpm_helper(), "swtpm listens");
        Ok(())
    }
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
