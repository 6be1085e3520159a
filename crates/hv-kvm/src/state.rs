//! Per-instance state that outlives a run: a UEFI instance's variable
//! store. It lives under the node's state directory
//! (`Config::state_dir/instances/NAME/`, not the run directory, which is
//! tmpfs), is made at the instance's first start on this node (a
//! migration's destination makes its own; the guest's variables arrive in
//! the migration stream), survives stops, starts and reboots, and is
//! removed only by [`KvmHypervisor::remove_state`].

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use kvm_cmdline::hvparams::Firmware;
use kvm_cmdline::{FirmwareFiles, InstanceSpec};

use crate::error::{Error, Result};
use crate::KvmHypervisor;

/// The variable store's file name in an instance's state directory.
const NVRAM: &str = "nvram.fd";

impl KvmHypervisor {
    /// An instance's state directory on this node.
    pub fn state_dir_of(&self, name: &str) -> PathBuf {
        self.config.state_dir.join("instances").join(name)
    }

    /// The flash images of a UEFI instance (its firmware's code and its
    /// own variable store); `None` for BIOS.
    pub(crate) fn firmware_files(&self, spec: &InstanceSpec) -> Option<FirmwareFiles> {
        let code = match spec.hvparams.firmware {
            Firmware::Bios => return None,
            Firmware::Uefi => "OVMF_CODE_4M.fd",
            Firmware::UefiSecboot => "OVMF_CODE_4M.secboot.fd",
        };
        Some(FirmwareFiles {
            code: self.config.ovmf_dir.join(code),
            vars: self.state_dir_of(&spec.name).join(NVRAM),
        })
    }

    /// Makes a UEFI instance's variable store at its first start on this
    /// node: a copy (0600) of OVMF's template — with Microsoft's keys
    /// enrolled for Secure Boot. One that exists is kept as it is (the
    /// guest's variables). Nothing for BIOS.
    pub(crate) fn prepare_state(&self, spec: &InstanceSpec) -> Result<()> {
        let Some(files) = self.firmware_files(spec) else {
            return Ok(());
        };
        let fail = |reason: String| Error::Start {
            instance: spec.name.clone(),
            step: "firmware",
            reason,
        };
        if !files.code.is_file() {
            return Err(fail(format!(
                "{} is not there (install Debian's ovmf, or set ovmf_dir)",
                files.code.display()
            )));
        }
        let dir = self.state_dir_of(&spec.name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let meta =
            std::fs::symlink_metadata(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        if !meta.is_dir() {
            return Err(fail(format!("{} is not a directory", dir.display())));
        }
        match std::fs::symlink_metadata(&files.vars) {
            Ok(m) if m.is_file() => return Ok(()),
            Ok(_) => {
                return Err(fail(format!(
                    "{} is not a regular file",
                    files.vars.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(format!("{}: {e}", files.vars.display()))),
        }
        let template = self.config.ovmf_dir.join(match spec.hvparams.firmware {
            Firmware::UefiSecboot => "OVMF_VARS_4M.ms.fd",
            _ => "OVMF_VARS_4M.fd",
        });
        let data = std::fs::read(&template).map_err(|e| {
            fail(format!(
                "the variable store's template {}: {e}",
                template.display()
            ))
        })?;
        // Written whole under a temporary name, then renamed: a start
        // killed meanwhile leaves no half store.
        let tmp = dir.join(format!(".{NVRAM}.{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&data)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &files.vars));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(format!("{}: {e}", files.vars.display())));
        }
        Ok(())
    }

    /// Removes what an instance keeps on this node between runs (its UEFI
    /// variable store): the explicit end of its state, refused while the
    /// instance runs here. Nothing to remove is fine.
    pub async fn remove_state(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        if self.running_pid(&paths).is_ok() {
            return Err(Error::State {
                instance: name.to_owned(),
                reason: "it runs on this node: stop it first".into(),
            });
        }
        let dir = self.state_dir_of(name);
        match std::fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_err(name, &dir, e)),
            Ok(m) if !m.is_dir() => Err(Error::State {
                instance: name.to_owned(),
                reason: format!("{} is not a directory", dir.display()),
            }),
            Ok(_) => std::fs::remove_dir_all(&dir).map_err(|e| state_err(name, &dir, e)),
        }
    }
}

fn state_err(name: &str, dir: &std::path::Path, e: std::io::Error) -> Error {
    Error::State {
        instance: name.to_owned(),
        reason: format!("cannot remove {}: {e}", dir.display()),
    }
}
