//! Instance definitions kept on this node (libvirt's persistent domains):
//! an instance that is not running still exists, starts by its name, and
//! may start when the node boots (autostart).
//!
//! Each is one file, `Config::state_dir/definitions/NAME.json` (0600, in a
//! 0700 directory), written whole or not at all ([`kvm_runtime::fsutil::write_atomic`])
//! and validated before it is written:
//!
//! ```json
//! {"version": 1, "autostart": true, "instance": {"name": "web1", "memory": 512, ...}}
//! ```
//!
//! `instance` is the instance definition of `gkvm start --file`. A file
//! that does not parse, names another instance, or is not this user's
//! own is an error naming the file: it is never rewritten or skipped in
//! silence. Ganeti does not use them (it keeps its own configuration).
//!
//! Beside them, `Config::state_dir/saved/NAME.save` is an instance's
//! *managed save* (libvirt's `managedsave`): the node's shutdown saved
//! it there ([`KvmHypervisor::shutdown_guests`] with
//! [`ShutdownAction::Save`]), and its next start by name restores it and
//! removes the file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvm_runtime::fsutil;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::{
    InstanceInfo, InstanceSpec, InstanceState, KvmHypervisor, StartMode, StartReport, StopMode,
    StopOutcome,
};

/// The definition file's format version.
const VERSION: u32 = 1;

/// Largest definition file read (an instance definition is a few KiB).
const MAX_DEFINITION: u64 = 1 << 20;

/// An instance defined on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct Definition {
    /// Whether it starts when the node boots (`gkvm guests-start`).
    pub autostart: bool,
    /// Whether a managed save waits for its next start (which restores
    /// it instead of booting the guest afresh).
    pub saved: bool,
    /// The instance definition (`gkvm start --file`'s).
    pub instance: InstanceSpec,
}

/// The file: [`Definition`] without what is not in it, with its version.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionFile {
    version: u32,
    autostart: bool,
    instance: InstanceSpec,
}

/// What the node's shutdown does with a running instance that has a
/// definition (instances without one are always stopped: nothing here
/// could bring them back).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownAction {
    /// The ACPI power button, then a kill after the timeout.
    #[default]
    Stop,
    /// A managed save (`state_dir/saved/NAME.save`), restored by the
    /// next start; a save that fails falls back to a stop.
    Save,
}

/// What became of one instance at the node's boot or shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct GuestOutcome {
    /// The instance.
    pub instance: String,
    /// `started`, `restored`, `already_running`, `powered_off`, `killed`,
    /// `saved`, `not_running` or `failed`.
    pub outcome: String,
    /// Why it failed, or what went wrong on the way (a save that fell
    /// back to a stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::ErrorReply>,
}

impl GuestOutcome {
    fn new(instance: &str, outcome: &str) -> GuestOutcome {
        GuestOutcome {
            instance: instance.to_owned(),
            outcome: outcome.to_owned(),
            error: None,
        }
    }

    fn failed(instance: &str, e: &Error) -> GuestOutcome {
        GuestOutcome {
            error: Some(e.into()),
            ..GuestOutcome::new(instance, "failed")
        }
    }
}

impl KvmHypervisor {
    /// Where definitions are kept.
    pub fn definitions_dir(&self) -> PathBuf {
        self.config.state_dir.join("definitions")
    }

    fn definition_path(&self, name: &str) -> PathBuf {
        self.definitions_dir().join(format!("{name}.json"))
    }

    /// Where an instance's managed save is kept.
    pub fn managed_save_path(&self, name: &str) -> PathBuf {
        self.config
            .state_dir
            .join("saved")
            .join(format!("{name}.save"))
    }

    /// Defines (or redefines) an instance on this node, validated as a
    /// start validates it (not against this node's QEMU, which may change
    /// before it starts). `autostart` `None` keeps what an earlier
    /// definition said (off for a new one). A running instance is not
    /// touched: the definition is what its next start uses.
    pub async fn define(&self, spec: &InstanceSpec, autostart: Option<bool>) -> Result<Definition> {
        crate::lifecycle::check_spec(spec)?;
        let paths = self.paths(&spec.name)?;
        let _lock = self.lock(&paths).await?;
        let autostart = match autostart {
            Some(a) => a,
            None => self
                .read_definition(&spec.name)?
                .is_some_and(|d| d.autostart),
        };
        self.write_definition(spec, autostart)?;
        Ok(Definition {
            autostart,
            saved: self.has_managed_save(&spec.name),
            instance: spec.clone(),
        })
    }

    /// Removes an instance's definition (a running instance runs on,
    /// undefined), also one that does not read. A managed save waiting for it is refused unless
    /// `remove_state`, which also removes what it keeps between runs
    /// ([`Self::remove_state`]: refused while it runs).
    pub async fn undefine(&self, name: &str, remove_state: bool) -> Result<()> {
        let paths = self.paths(name)?;
        {
            let _lock = self.lock(&paths).await?;
            // A definition that does not read (tampered with, a later
            // version) can still go: its file is removed, not followed.
            match self.read_definition(name) {
                Ok(Some(_)) | Err(Error::Definition { .. }) => {}
                Ok(None) => {
                    return Err(Error::NotDefined {
                        instance: name.to_owned(),
                    })
                }
                Err(e) => return Err(e),
            }
            let saved = self.managed_save_path(name);
            if self.has_managed_save(name) && !remove_state {
                return Err(Error::State {
                    instance: name.to_owned(),
                    reason: format!(
                        "a managed save waits in {} (start it to restore it, or undefine with --remove-state to discard it)",
                        saved.display()
                    ),
                });
            }
            if remove_state && self.running_pid(&paths).is_ok() {
                return Err(Error::State {
                    instance: name.to_owned(),
                    reason: "it runs on this node: stop it before removing its state".into(),
                });
            }
            if remove_state {
                remove_if_there(name, &saved)?;
            }
            remove_if_there(name, &self.definition_path(name))?;
        }
        if remove_state {
            self.remove_state(name).await?;
        }
        Ok(())
    }

    /// Turns a defined instance's autostart on or off.
    pub async fn set_autostart(&self, name: &str, on: bool) -> Result<()> {
        let paths = self.paths(name)?;
        let _lock = self.lock(&paths).await?;
        let def = self
            .read_definition(name)?
            .ok_or_else(|| Error::NotDefined {
                instance: name.to_owned(),
            })?;
        if def.autostart != on {
            self.write_definition(&def.instance, on)?;
        }
        Ok(())
    }

    /// An instance's definition.
    pub fn definition(&self, name: &str) -> Result<Definition> {
        self.paths(name)?;
        self.read_definition(name)?
            .ok_or_else(|| Error::NotDefined {
                instance: name.to_owned(),
            })
    }

    /// Every definition on this node, by name. One that cannot be read is
    /// an error naming its file.
    pub fn definitions(&self) -> Result<Vec<Definition>> {
        let names = self.defined_names().map_err(|e| Error::Io {
            context: format!(
                "list the definitions in {}",
                self.definitions_dir().display()
            ),
            source: e,
        })?;
        let mut out = Vec::new();
        for name in names {
            if let Some(d) = self.read_definition(&name)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Whether this node knows an instance of that name: files of it in
    /// the run directory (running, stopped on its own, or left behind), a
    /// definition, a managed save, or state kept between runs. A name it
    /// does not know is most likely a typo (`gkvm stop wbe1`). Any
    /// operation that took its lock here makes a name known.
    pub fn is_known(&self, name: &str) -> Result<bool> {
        let paths = self.paths(name)?;
        let in_run_dir = self
            .config
            .run_dir
            .instances()
            .map_err(|e| Error::Runtime {
                instance: name.to_owned(),
                source: e,
            })?
            .iter()
            .any(|n| n == name);
        // Its lock file: an operation ran on it here (one killed before
        // it wrote anything else may have left a helper or a cgroup).
        Ok(in_run_dir
            || std::fs::symlink_metadata(&paths.lock).is_ok()
            || std::fs::symlink_metadata(self.definition_path(name)).is_ok()
            || std::fs::symlink_metadata(self.managed_save_path(name)).is_ok()
            || std::fs::symlink_metadata(self.state_dir_of(name)).is_ok())
    }

    /// What is wrong with the definitions on this node (for `verify`):
    /// each that cannot be read, or that a start would refuse, one line
    /// each.
    pub(crate) fn definition_problems(&self) -> Vec<String> {
        let names = match self.defined_names() {
            Ok(n) => n,
            Err(e) => {
                return vec![format!(
                    "definitions {}: {e}",
                    self.definitions_dir().display()
                )]
            }
        };
        names
            .into_iter()
            .filter_map(|name| match self.read_definition(&name) {
                Ok(Some(d)) => crate::lifecycle::check_spec(&d.instance)
                    .err()
                    .map(|e| format!("definition of {name}: {}", e.report())),
                Ok(None) => None,
                Err(e) => Some(e.report()),
            })
            .collect()
    }

    /// The names of the instances defined here, sorted (none when the
    /// directory is not there yet).
    fn defined_names(&self) -> std::io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(self.definitions_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            // Temporary files of a write in progress start with a dot.
            .filter(|f| !f.starts_with('.'))
            .filter_map(|f| f.strip_suffix(".json").map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// [`Self::overview`], and with `all` every instance defined on this
    /// node that is not running too (state `shut-off`), each defined one
    /// with its autostart.
    pub async fn overview_with(&self, all: bool) -> Result<Vec<InstanceInfo>> {
        let mut out = self.overview().await?;
        if !all {
            return Ok(out);
        }
        for d in self.definitions()? {
            match out.iter_mut().find(|i| i.name == d.instance.name) {
                Some(i) => i.autostart = Some(d.autostart),
                None => out.push(InstanceInfo {
                    name: d.instance.name.clone(),
                    pid: 0,
                    state: InstanceState::ShutOff,
                    memory_mib: d.instance.memory,
                    vcpus: d.instance.vcpus,
                    cpu_time_secs: 0.0,
                    reason: d
                        .saved
                        .then(|| "a managed save waits for its next start".to_owned()),
                    cause: None,
                    log: None,
                    guest_agent: None,
                    user_down: false,
                    helpers: Vec::new(),
                    autostart: Some(d.autostart),
                }),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Starts a defined instance by name: from its managed save when one
    /// waits (the file is removed once the guest runs again), else from
    /// its definition.
    pub async fn start_defined(&self, name: &str, mode: StartMode) -> Result<StartReport> {
        let def = self.definition(name)?;
        if def.saved {
            let saved = self.managed_save_path(name);
            let report = self.restore(&saved).await?;
            remove_if_there(name, &saved)?;
            if mode == StartMode::Paused {
                tracing::info!(instance = name, "restored running from its managed save");
            }
            return Ok(report);
        }
        self.start(&def.instance, mode).await
    }

    /// The node's boot (`gkvm guests-start`, libvirt-guests' start):
    /// every defined instance with autostart or a managed save that is not
    /// running is started (restored), all at once. One that fails does
    /// not stop the others; its outcome says why.
    pub async fn start_guests(&self) -> Result<Vec<GuestOutcome>> {
        let running = self.list()?;
        let todo: Vec<Definition> = self
            .definitions()?
            .into_iter()
            .filter(|d| d.autostart || d.saved)
            .collect();
        let starts = todo.iter().map(|d| {
            let name = d.instance.name.clone();
            let up = running.contains(&name);
            async move {
                if up {
                    return GuestOutcome::new(&name, "already_running");
                }
                let restoring = d.saved;
                match self.start_defined(&name, StartMode::Running).await {
                    Ok(_) if restoring => GuestOutcome::new(&name, "restored"),
                    Ok(_) => GuestOutcome::new(&name, "started"),
                    // Started meanwhile by somebody else: its goal holds.
                    Err(Error::AlreadyRunning { .. }) => {
                        GuestOutcome::new(&name, "already_running")
                    }
                    Err(e) => GuestOutcome::failed(&name, &e),
                }
            }
        });
        Ok(join_all(starts).await)
    }

    /// The node's shutdown (`gkvm guests-stop`, libvirt-guests' stop):
    /// every running instance, all at once, is stopped by its ACPI power
    /// button and killed if it has not powered off within `timeout` — or,
    /// with [`ShutdownAction::Save`], saved to its managed save when it
    /// has a definition (a failed save falls back to a stop).
    pub async fn shutdown_guests(
        &self,
        action: ShutdownAction,
        timeout: Duration,
    ) -> Result<Vec<GuestOutcome>> {
        let names = self.list()?;
        let defined: Vec<String> = self
            .definitions()?
            .into_iter()
            .map(|d| d.instance.name)
            .collect();
        let stops = names.iter().map(|name| {
            let save = action == ShutdownAction::Save && defined.contains(name);
            async move {
                let mut fell_back = None;
                if save {
                    match self.managed_save(name).await {
                        Ok(()) => return GuestOutcome::new(name, "saved"),
                        Err(e) => {
                            tracing::warn!(instance = %name, error = %e.report(),
                                "managed save failed; stopping it instead");
                            fell_back = Some(crate::ErrorReply::from(&e));
                        }
                    }
                }
                let mut out = match self.stop(name, StopMode::Acpi { timeout }).await {
                    Ok(o) => GuestOutcome::new(name, stop_word(o)),
                    Err(Error::Timeout { .. }) => match self.stop(name, StopMode::Force).await {
                        Ok(o) => GuestOutcome::new(name, stop_word(o)),
                        Err(e) => GuestOutcome::failed(name, &e),
                    },
                    Err(e) => GuestOutcome::failed(name, &e),
                };
                if out.error.is_none() {
                    out.error = fell_back;
                }
                out
            }
        });
        Ok(join_all(stops).await)
    }

    /// Saves a running instance to its managed save.
    async fn managed_save(&self, name: &str) -> Result<()> {
        let file = self.managed_save_path(name);
        self.ensure_state_subdir(&file)
            .map_err(|e| Error::Runtime {
                instance: name.to_owned(),
                source: e,
            })?;
        self.save(name, &file, |_| {}).await.map(|_| ())
    }

    /// The state directory and the one `file` goes in below it, made
    /// private (0700) or checked trusted.
    fn ensure_state_subdir(&self, file: &Path) -> std::result::Result<(), kvm_runtime::Error> {
        fsutil::ensure_private_dir(&self.config.state_dir)?;
        match file.parent() {
            Some(dir) => fsutil::ensure_private_dir(dir),
            None => Ok(()),
        }
    }

    fn has_managed_save(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.managed_save_path(name)).is_ok_and(|m| m.is_file())
    }

    /// The definition of `name`, `None` when there is none.
    fn read_definition(&self, name: &str) -> Result<Option<Definition>> {
        let path = self.definition_path(name);
        let fail = |reason: String| Error::Definition {
            instance: name.to_owned(),
            path: path.clone(),
            reason,
        };
        let dir = self.definitions_dir();
        match std::fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            _ => fsutil::check_trusted_dir(&dir).map_err(|e| fail(e.to_string()))?,
        }
        let Some(data) =
            fsutil::read_capped(&path, MAX_DEFINITION).map_err(|e| fail(e.to_string()))?
        else {
            return Ok(None);
        };
        let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(e.to_string()))?;
        // It chooses what QEMU opens as root: only this user may have
        // written it.
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid || meta.mode() & 0o022 != 0 {
            return Err(fail(format!(
                "owned by uid {} with mode {:04o}: only its owner (uid {euid}) may write it",
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        let file: DefinitionFile =
            serde_json::from_slice(&data).map_err(|e| fail(format!("not a definition: {e}")))?;
        if file.version != VERSION {
            return Err(fail(format!(
                "version {} (this gkvm reads version {VERSION})",
                file.version
            )));
        }
        if file.instance.name != name {
            return Err(fail(format!(
                "it defines instance {:?}, not {name:?}",
                file.instance.name
            )));
        }
        Ok(Some(Definition {
            autostart: file.autostart,
            saved: self.has_managed_save(name),
            instance: file.instance,
        }))
    }

    fn write_definition(&self, spec: &InstanceSpec, autostart: bool) -> Result<()> {
        let path = self.definition_path(&spec.name);
        let fail = |reason: String| Error::Definition {
            instance: spec.name.clone(),
            path: path.clone(),
            reason,
        };
        let file = DefinitionFile {
            version: VERSION,
            autostart,
            instance: spec.clone(),
        };
        let mut data = serde_json::to_vec_pretty(&file).map_err(|e| fail(e.to_string()))?;
        data.push(b'\n');
        self.ensure_state_subdir(&path)
            .and_then(|()| fsutil::write_atomic(&path, &data))
            .map_err(|e| fail(e.to_string()))
    }
}

fn stop_word(o: StopOutcome) -> &'static str {
    match o {
        StopOutcome::PoweredOff | StopOutcome::PowerButtonPressed => "powered_off",
        StopOutcome::Killed => "killed",
        StopOutcome::NotRunning => "not_running",
    }
}

fn remove_if_there(name: &str, path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::State {
            instance: name.to_owned(),
            reason: format!("cannot remove {}: {e}", path.display()),
        }),
        _ => Ok(()),
    }
}

/// Runs `futures` together on this task; their outputs in their order.
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
