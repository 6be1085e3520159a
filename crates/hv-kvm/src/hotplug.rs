//! NICs and disks into and out of a running instance, and disks grown
//! (Ganeti 3.1's HotAddDevice / HotDelDevice / ResizeDisk): a NIC's TAP
//! configured as at start, its descriptors passed with `getfd`,
//! `netdev_add` and `device_add` at a free PCI slot; a disk's block node
//! by `blockdev-add`; removal by `device_del`, `DEVICE_DELETED`, then
//! `netdev_del` (and the NIC's teardown) or `blockdev-del`. The runtime record changes only once QEMU has confirmed, and
//! a failure at any step undoes the earlier ones, even if the operation is
//! dropped (a drop guard undoes with a blocking QMP client).
//!
//! A gkvm killed outright (SIGKILL, a power cut of the caller) cannot
//! undo: each hot plug first writes what it is about to do to the
//! instance's journal (`conf/NAME.hotplug`), and the next hot plug, stop,
//! cleanup or migration settles it from what QEMU has — a device QEMU
//! holds is recorded (QEMU's confirmation is the commit point), anything
//! short of that is undone. An unplug the guest has not finished stays in
//! the journal until it has.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use gkvm_qmp::commands::{self, Command as _};
use kvm_cmdline::{DiskSpec, InstanceSpec, NicSpec};
use kvm_runtime::InstancePaths;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::KvmHypervisor;

/// One thing a failed hot plug undoes.
#[derive(Debug)]
enum Undo {
    /// A descriptor passed with `getfd` and not yet used.
    CloseFd(String),
    /// A backend added.
    NetdevDel(String),
    /// A device added.
    DeviceDel(String),
    /// A block node added.
    BlockdevDel(String),
    /// A descriptor set added (`add-fd`).
    RemoveFdset(i64),
    /// A configured NIC (script or native).
    Teardown {
        spec: Box<InstanceSpec>,
        seq: usize,
        tap: String,
        script: Option<std::path::PathBuf>,
    },
}

/// Undoes, in reverse order, what a hot plug did unless disarmed, then
/// puts the journal back as it was before the hot plug.
struct HotplugGuard {
    paths: InstancePaths,
    steps: Vec<Undo>,
    armed: bool,
    journal_before: Vec<Pending>,
}

/// A hot plug in progress, as its journal keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Pending {
    /// A NIC being added: its definition as placed, its TAP and the names
    /// its descriptors are passed under.
    AddNic {
        nic: NicSpec,
        tap: String,
        fds: Vec<String>,
    },
    /// A disk being added, as placed.
    AddDisk { disk: DiskSpec },
    /// A device (NIC or disk) being removed, by device id.
    Remove { id: String },
    /// A NIC's connection being changed to `nic`'s (same device id).
    ModifyNic { nic: NicSpec },
}

fn journal_bytes(journal: &[Pending]) -> Option<Vec<u8>> {
    (!journal.is_empty()).then(|| serde_json::to_vec(journal).unwrap_or_default())
}

impl Drop for HotplugGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        tracing::warn!(instance = %self.paths.name, "hot plug failed or was interrupted; undoing it");
        let options = gkvm_qmp::Options {
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(5),
            ..gkvm_qmp::Options::default()
        };
        let needs_qmp = self
            .steps
            .iter()
            .any(|s| !matches!(s, Undo::Teardown { .. }));
        let mut qmp = needs_qmp
            .then(|| gkvm_qmp::blocking::Qmp::connect(&self.paths.qmp, options).ok())
            .flatten();
        for step in self.steps.drain(..).rev() {
            if let Undo::Teardown {
                spec,
                seq,
                tap,
                script,
            } = step
            {
                crate::nic::deconfigure(&spec, seq, &tap, script.as_deref());
                continue;
            }
            let Some(q) = qmp.as_mut() else { continue };
            let (name, result) = match step {
                Undo::CloseFd(fdname) => (
                    commands::CloseFd::NAME,
                    q.run(&commands::CloseFd { fdname }),
                ),
                Undo::NetdevDel(id) => (
                    commands::NetdevDel::NAME,
                    q.run(&commands::NetdevDel { id }),
                ),
                Undo::DeviceDel(id) => (
                    commands::DeviceDel::NAME,
                    q.run(&commands::DeviceDel { id }),
                ),
                Undo::BlockdevDel(node_name) => (
                    commands::BlockdevDel::NAME,
                    q.run(&commands::BlockdevDel { node_name }),
                ),
                Undo::RemoveFdset(fdset_id) => (
                    commands::RemoveFd::NAME,
                    q.run(&commands::RemoveFd { fdset_id, fd: None }),
                ),
                Undo::Teardown { .. } => continue,
            };
            if let Err(e) = result {
                tracing::warn!(instance = %self.paths.name, step = name, error = %e, "undo");
            }
        }
        if let Err(e) = self
            .paths
            .write_hotplug_journal(journal_bytes(&self.journal_before).as_deref())
        {
            tracing::warn!(instance = %self.paths.name, error = %e, "hot plug journal");
        }
    }
}

fn params_err(instance: &str, source: kvm_cmdline::Error) -> Error {
    Error::Params {
        instance: instance.to_owned(),
        source,
    }
}

fn hotplug_err<'a>(instance: &'a str, step: &'static str) -> impl Fn(String) -> Error + 'a {
    move |reason| Error::Hotplug {
        instance: instance.to_owned(),
        step,
        reason,
    }
}

impl KvmHypervisor {
    /// The start of every hot plug: the instance's lock, its runtime
    /// record (read once) and its definition. It must run and have been
    /// started by gkvm with device places (an earlier release's, or
    /// Ganeti's, needs a restart first).
    async fn begin(&self, name: &str) -> Result<(Hotplug, InstanceSpec)> {
        let (mut hp, mut spec) = self.open_for_hotplug(name).await?;
        self.settle_journal(&mut hp, &mut spec).await?;
        Ok((hp, spec))
    }

    /// [`Self::begin`] without settling the journal (a dry run's start:
    /// it changes nothing).
    async fn open_for_hotplug(&self, name: &str) -> Result<(Hotplug, InstanceSpec)> {
        let paths = self.paths(name)?;
        let lock = self.lock(&paths).await?;
        self.running_pid(&paths)?;
        let record = self.running_record(&paths)?;
        refuse_in_migration(name, &record)?;
        let spec = crate::lifecycle::spec_from_record(name, &record, &paths.runtime)?;
        check_placed(&spec)?;
        let hp = Hotplug {
            paths,
            _lock: lock,
            record,
            journal: Vec::new(),
        };
        Ok((hp, spec))
    }

    /// Places `nic` as the next NIC of `spec` (its id and PCI slot), a
    /// NIC a hot plug may add (checked as a start checks it); its index.
    fn place_nic(
        name: &str,
        spec: &mut InstanceSpec,
        record: &kvm_runtime::RuntimeRecord,
        nic: NicSpec,
    ) -> Result<usize> {
        refuse_pcie_root(name, spec, record)?;
        let seq = spec.nics.len();
        spec.nics.push(nic);
        spec.assign_addresses().map_err(|e| params_err(name, e))?;
        crate::lifecycle::check_spec(spec)?;
        Ok(seq)
    }

    /// Places `disk` as the next disk of `spec` (its id and slot), checked
    /// as a start checks it; its index, block node and device.
    fn place_disk(
        name: &str,
        spec: &mut InstanceSpec,
        record: &kvm_runtime::RuntimeRecord,
        caps: &crate::Capabilities,
        disk: DiskSpec,
    ) -> Result<(
        usize,
        kvm_cmdline::qemu::Blockdev,
        kvm_cmdline::qemu::Device,
    )> {
        // A SCSI disk goes on the SCSI controller's bus, which hot-plugs.
        if !spec.hvparams.disk_type.on_scsi_bus() {
            refuse_pcie_root(name, spec, record)?;
        }
        let seq = spec.disks.len();
        spec.disks.push(disk);
        spec.assign_addresses().map_err(|e| params_err(name, e))?;
        crate::lifecycle::check_spec(spec)?;
        let (node, device) =
            kvm_cmdline::hotplug_disk(spec, caps, seq).map_err(|e| params_err(name, e))?;
        Ok((seq, node, device))
    }

    /// Settles what a killed gkvm's hot plug left in the journal (see the
    /// module's documentation), under the instance's lock: a device QEMU
    /// holds is recorded, one it does not is undone, an unplug the guest
    /// has not finished stays pending. Each kind of entry is settled on
    /// its own ([`Settle`]).
    async fn settle_journal(&self, hp: &mut Hotplug, spec: &mut InstanceSpec) -> Result<()> {
        let name = hp.paths.name.clone();
        let Some(data) = hp
            .paths
            .read_hotplug_journal()
            .map_err(|e| runtime(&name, e))?
        else {
            return Ok(());
        };
        let entries: Vec<Pending> = serde_json::from_slice(&data).map_err(|e| Error::Runtime {
            instance: name.clone(),
            source: kvm_runtime::Error::Corrupt {
                path: hp.paths.hotplug.clone(),
                reason: format!("not a hot plug journal: {e}"),
            },
        })?;
        let qmp = self.qmp(&hp.paths).await?;
        let present = qmp
            .run(&commands::QomList {
                path: "/machine/peripheral".into(),
            })
            .await
            .map_err(|e| hotplug_err(&name, "list QEMU's devices")(e.to_string()))?
            .into_iter()
            .filter(|p| p.kind.starts_with("child<"))
            .map(|p| p.name)
            .collect();
        let mut taps = hp.paths.read_nics().map_err(|e| runtime(&name, e))?;
        taps.truncate(spec.nics.len());
        let mut settle = Settle {
            hv: self,
            name: &name,
            qmp: &qmp,
            present,
            taps,
            changed: false,
        };
        let mut keep = Vec::new();
        for entry in entries {
            let pending = match &entry {
                Pending::AddNic { nic, tap, fds } => {
                    settle.add_nic(spec, nic, tap, fds).await;
                    false
                }
                Pending::AddDisk { disk } => {
                    settle.add_disk(spec, disk).await;
                    false
                }
                Pending::ModifyNic { nic } => {
                    settle.modify_nic(spec, nic).await;
                    false
                }
                Pending::Remove { id } => settle.remove(spec, id).await,
            };
            if pending {
                keep.push(entry);
            }
        }
        if settle.changed {
            hp.save(spec, Some((&settle.taps, 0)))?;
        }
        hp.journal = keep;
        hp.write_journal()
    }

    /// A hot plug's dry run: the NIC or disk as it would be plugged into
    /// the running instance (its device id and PCI slot), checked as the
    /// plug checks it, without changing anything. A hot plug that a killed
    /// gkvm left half done is settled by the real operation first, which
    /// may place the device elsewhere.
    pub async fn hotplug_plan(&self, name: &str, device: HotplugDevice) -> Result<HotplugDevice> {
        Ok(match device {
            HotplugDevice::Nic(nic) => {
                HotplugDevice::Nic(Box::new(self.nic_add_plan(name, *nic).await?))
            }
            HotplugDevice::Disk(disk) => {
                HotplugDevice::Disk(Box::new(self.disk_add_plan(name, *disk).await?))
            }
        })
    }

    /// [`Self::hotplug_plan`] of a NIC: where [`Self::nic_add`] would put it.
    pub async fn nic_add_plan(&self, name: &str, nic: NicSpec) -> Result<NicSpec> {
        let (hp, mut spec) = self.open_for_hotplug(name).await?;
        let seq = Self::place_nic(name, &mut spec, &hp.record, nic)?;
        Ok(spec.nics.swap_remove(seq))
    }

    /// [`Self::hotplug_plan`] of a disk: where [`Self::disk_add`] would put
    /// it.
    pub async fn disk_add_plan(&self, name: &str, disk: DiskSpec) -> Result<DiskSpec> {
        let (hp, mut spec) = self.open_for_hotplug(name).await?;
        let caps = self.capabilities(&spec.hvparams.kvm_path).await?;
        let (seq, _, _) = Self::place_disk(name, &mut spec, &hp.record, &caps, disk)?;
        Ok(spec.disks.swap_remove(seq))
    }

    /// Adds a NIC to a running instance: a TAP (queues, vnet_hdr and
    /// vhost-net as the instance's hvparams say), configured by the NIC
    /// script or natively, then `netdev_add` and `device_add` at a free
    /// PCI slot. Returns the NIC as placed (its id and slot). Errors name
    /// the step; whatever was done is undone.
    pub async fn nic_add(&self, name: &str, nic: NicSpec) -> Result<NicSpec> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let seq = Self::place_nic(name, &mut spec, &hp.record, nic)?;
        let paths = hp.paths.clone();
        let caps = self.capabilities(&spec.hvparams.kvm_path).await?;
        let id = device_id(spec.nics[seq].address.as_ref());
        let virtio = crate::nic::is_virtio(&spec, &caps);
        let tap = crate::nic::open_tap(&spec, seq, &self.config.tap_template, virtio)?;
        let vhost = crate::nic::open_vhost_for(&spec, &tap)?;
        let tap_fds = fd_names(&id, "tap", tap.fds().iter().map(AsFd::as_fd));
        let vhost_fds = fd_names(&id, "vhost", vhost.iter().map(AsFd::as_fd));
        // Until here nothing outlives this process (the TAP goes with its
        // descriptors); from here the journal knows.
        let mut guard = hp.intend(Pending::AddNic {
            nic: spec.nics[seq].clone(),
            tap: tap.name().to_owned(),
            fds: tap_fds
                .iter()
                .chain(&vhost_fds)
                .map(|(n, _)| n.clone())
                .collect(),
        })?;
        crate::nic::configure(&spec, seq, tap.name(), &self.config).await?;
        guard.steps.push(Undo::Teardown {
            spec: Box::new(spec.clone()),
            seq,
            tap: tap.name().to_owned(),
            script: self.config.nic_down_script.clone(),
        });
        let qmp = self.qmp(&paths).await?;
        let step = |s: &'static str| hotplug_err(name, s);
        for (fdname, fd) in tap_fds.iter().chain(&vhost_fds) {
            qmp.run_with_fds(
                &commands::GetFd {
                    fdname: fdname.clone(),
                },
                &[*fd],
            )
            .await
            .map_err(|e| step("getfd")(e.to_string()))?;
            guard.steps.push(Undo::CloseFd(fdname.clone()));
        }
        let names = |v: &[(String, std::os::fd::BorrowedFd<'_>)]| {
            v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
        };
        let (netdev, device) =
            kvm_cmdline::hotplug_nic(&spec, &caps, seq, &names(&tap_fds), &names(&vhost_fds))
                .map_err(|e| params_err(name, e))?;
        qmp.run(&netdev_add(&netdev))
            .await
            .map_err(|e| step("netdev_add")(e.to_string()))?;
        // QEMU took the descriptors: nothing to close any more.
        guard.steps.retain(|s| !matches!(s, Undo::CloseFd(_)));
        guard.steps.push(Undo::NetdevDel(id.clone()));
        qmp.run(&device_add(&device))
            .await
            .map_err(|e| step("device_add")(e.to_string()))?;
        guard.steps.push(Undo::DeviceDel(id.clone()));
        let mut taps = paths.read_nics().map_err(|e| runtime(name, e))?;
        taps.truncate(seq);
        taps.push(tap.name().to_owned());
        hp.save(&spec, Some((&taps, seq)))?;
        guard.armed = false;
        hp.done()?;
        tracing::info!(instance = %name, nic = %id, tap = %tap.name(), "NIC added");
        Ok(spec.nics[seq].clone())
    }

    /// Removes the NIC with device id `id` (or index `id`) from a running
    /// instance: `device_del`, waits for the guest to release it
    /// (`DEVICE_DELETED`, up to [`crate::Config::unplug_timeout`]; a guest
    /// that never does leaves the NIC in place and the error says so), `netdev_del`, then the NIC's
    /// teardown (down script or native) and the record.
    pub async fn nic_remove(&self, name: &str, id: &str) -> Result<()> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let paths = hp.paths.clone();
        let seq = find_nic(&spec, id)
            .ok_or_else(|| hotplug_err(name, "find the NIC")(format!("it has no NIC {id:?}")))?;
        let dev_id = device_id(spec.nics[seq].address.as_ref());
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(&paths).await?;
        self.unplug(&qmp, &mut hp, &dev_id).await?;
        qmp.run(&commands::NetdevDel { id: dev_id.clone() })
            .await
            .map_err(|e| step("netdev_del")(e.to_string()))?;
        let mut taps = paths.read_nics().map_err(|e| runtime(name, e))?;
        if let Some(tap) = taps.get(seq).cloned() {
            crate::nic::deconfigure(&spec, seq, &tap, self.config.nic_down_script.as_deref());
            taps.remove(seq);
        }
        spec.nics.remove(seq);
        hp.save(&spec, Some((&taps, seq)))?;
        hp.done()?;
        tracing::info!(instance = %name, nic = %dev_id, "NIC removed");
        Ok(())
    }

    /// Adds a disk to a running instance: `blockdev-add` (the same node
    /// as at start: cache, aio, discard, `host_device`/`file`, or a
    /// storage URI) and `device_add` at a free slot (virtio or SCSI, as
    /// `disk_type` says). Returns the disk as placed. Errors name the
    /// step; whatever was done is undone.
    pub async fn disk_add(&self, name: &str, disk: DiskSpec) -> Result<DiskSpec> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let paths = hp.paths.clone();
        let caps = self.capabilities(&spec.hvparams.kvm_path).await?;
        let (seq, node, device) = Self::place_disk(name, &mut spec, &hp.record, &caps, disk)?;
        let id = device_id(spec.disks[seq].address.as_ref());
        let mut guard = hp.intend(Pending::AddDisk {
            disk: spec.disks[seq].clone(),
        })?;
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(&paths).await?;
        let mut node = node.qmp_arguments();
        if qemu_opens_as_another_user(&spec) && spec.disks[seq].uri.is_none() {
            // QEMU dropped root at start: gkvm opens the image and QEMU
            // takes it from a descriptor set (as libvirt does).
            let disk = &spec.disks[seq];
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(disk.mode != kvm_cmdline::DiskMode::ReadOnly)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
                .open(&disk.path)
                .map_err(|e| step("open the disk")(format!("{}: {e}", disk.path.display())))?;
            let set = qmp
                .run_with_fds(
                    &commands::AddFd {
                        fdset_id: None,
                        opaque: Some(id.clone()),
                    },
                    &[file.as_fd()],
                )
                .await
                .map_err(|e| step("add-fd")(e.to_string()))?;
            guard.steps.push(Undo::RemoveFdset(set.fdset_id));
            node["file"]["filename"] = format!("/dev/fdset/{}", set.fdset_id).into();
        }
        let options = match node {
            Value::Object(options) => options,
            other => {
                return Err(step("blockdev-add")(format!(
                    "not a block node's options: {other}"
                )))
            }
        };
        qmp.run(&commands::BlockdevAdd { options })
            .await
            .map_err(|e| step("blockdev-add")(e.to_string()))?;
        guard.steps.push(Undo::BlockdevDel(id.clone()));
        qmp.run(&device_add(&device))
            .await
            .map_err(|e| step("device_add")(e.to_string()))?;
        guard.steps.push(Undo::DeviceDel(id.clone()));
        hp.save(&spec, None)?;
        guard.armed = false;
        hp.done()?;
        // The I/O ceilings hold on the new disk's device too. The disk is
        // in; a ceiling that cannot be written is said, not undone.
        let ceilings = spec.hvparams.cgroup_io_max().is_ok_and(|m| m.is_set());
        if ceilings && hp.paths.cgroup.exists() {
            if let Err(e) = crate::cgroup::apply_limits(&spec, &hp.paths) {
                tracing::warn!(instance = %name, disk = %id, error = %e, "cgroup_io_max not applied");
            }
        }
        tracing::info!(instance = %name, disk = %id, "disk added");
        Ok(spec.disks[seq].clone())
    }

    /// Removes the disk with device id `id` (or index `id`): `device_del`,
    /// waits for the guest to release it (as [`Self::nic_remove`]), then
    /// `blockdev-del` and the record.
    pub async fn disk_remove(&self, name: &str, id: &str) -> Result<()> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let paths = hp.paths.clone();
        let seq = find_disk(&spec, id)
            .ok_or_else(|| hotplug_err(name, "find the disk")(format!("it has no disk {id:?}")))?;
        let dev_id = device_id(spec.disks[seq].address.as_ref());
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(&paths).await?;
        self.unplug(&qmp, &mut hp, &dev_id).await?;
        qmp.run(&commands::BlockdevDel {
            node_name: dev_id.clone(),
        })
        .await
        .map_err(|e| step("blockdev-del")(e.to_string()))?;
        remove_fdsets(&qmp, &dev_id).await;
        spec.disks.remove(seq);
        hp.save(&spec, None)?;
        hp.done()?;
        tracing::info!(instance = %name, disk = %dev_id, "disk removed");
        Ok(())
    }

    /// Grows disk `id` (device id or index) of a running instance to
    /// `bytes` (`block_resize`; a file image grows with it, a block device
    /// must have been grown first, as Ganeti grows the volume before).
    /// Shrinking is refused.
    pub async fn disk_grow(&self, name: &str, id: &str, bytes: u64) -> Result<()> {
        // QEMU's sizes are signed 64-bit.
        if i64::try_from(bytes).is_err() {
            return Err(hotplug_err(name, "check the size")(format!(
                "{bytes} bytes is beyond what QEMU can address ({} at most)",
                i64::MAX
            )));
        }
        let (hp, spec) = self.begin(name).await?;
        let paths = &hp.paths;
        let seq = find_disk(&spec, id)
            .ok_or_else(|| hotplug_err(name, "find the disk")(format!("it has no disk {id:?}")))?;
        let node = device_id(spec.disks[seq].address.as_ref());
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(paths).await?;
        let nodes = qmp
            .run(&commands::QueryNamedBlockNodes { flat: true })
            .await
            .map_err(|e| step("query-named-block-nodes")(e.to_string()))?;
        let current = nodes
            .iter()
            .find(|n| n.node_name == node)
            .map(|n| n.image.virtual_size)
            .ok_or_else(|| step("find the block node")(format!("QEMU has no node {node}")))?;
        if bytes < current {
            return Err(step("check the size")(format!(
                "{bytes} bytes is smaller than the disk's {current}; disks only grow"
            )));
        }
        warn_if_short_of_space(name, &spec.disks[seq], bytes - current);
        qmp.run(&commands::BlockResize {
            node_name: node.clone(),
            size: bytes,
        })
        .await
        .map_err(|e| step("block_resize")(e.to_string()))?;
        tracing::info!(instance = %name, disk = %node, bytes, "disk grown");
        Ok(())
    }

    /// `device_del` and the wait for the guest to release the device.
    /// No undo for an unplug: once asked, the guest may let go at any
    /// time, so the journal keeps it until it has.
    async fn unplug(&self, qmp: &gkvm_qmp::Qmp, hp: &mut Hotplug, dev_id: &str) -> Result<()> {
        let name = hp.paths.name.clone();
        let step = |s: &'static str| hotplug_err(&name, s);
        hp.intend(Pending::Remove {
            id: dev_id.to_owned(),
        })?
        .armed = false;
        qmp.run(&commands::DeviceDel {
            id: dev_id.to_owned(),
        })
        .await
        .map_err(|e| step("device_del")(e.to_string()))?;
        let gone = qmp
            .wait_for_event(self.config.unplug_timeout, |e| {
                e.name == "DEVICE_DELETED"
                    && e.data.get("device").and_then(Value::as_str) == Some(dev_id)
            })
            .await
            .map_err(|e| step("wait for DEVICE_DELETED")(e.to_string()))?;
        if gone.is_none() {
            return Err(step("wait for DEVICE_DELETED")(format!(
                "the guest did not release {dev_id} within {}; it stays plugged",
                kvm_runtime::human_duration(&self.config.unplug_timeout)
            )));
        }
        Ok(())
    }

    /// Changes a running NIC's connection — its mode, link (bridge, routing
    /// table, switch), IP or VLAN — without the guest noticing: the TAP is
    /// unconfigured (down script or native) and configured again with the
    /// new settings (Ganeti 3.1 unplugs and plugs the NIC instead, which
    /// the guest sees). The device stays. On failure the old settings are
    /// restored. A new MAC is the guest's hardware changing: the NIC is
    /// unplugged and plugged again with it, as Ganeti 3.1 does (the guest
    /// sees a new device).
    pub async fn nic_modify(&self, name: &str, id: &str, new: NicSpec) -> Result<NicSpec> {
        self.nic_modify_with(name, id, new, false).await
    }

    /// [`Self::nic_modify`]; with `keep_mac`, `new`'s MAC is ignored and the
    /// NIC keeps its own (the CLI's `--nic` without `mac=`).
    pub(crate) async fn nic_modify_with(
        &self,
        name: &str,
        id: &str,
        mut new: NicSpec,
        keep_mac: bool,
    ) -> Result<NicSpec> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let paths = hp.paths.clone();
        let seq = find_nic(&spec, id)
            .ok_or_else(|| hotplug_err(name, "find the NIC")(format!("it has no NIC {id:?}")))?;
        if keep_mac {
            new.mac = spec.nics[seq].mac;
        }
        if new.mac != spec.nics[seq].mac {
            // The same NIC (uuid, name: its device id) with the new MAC.
            let current = &spec.nics[seq];
            new.uuid = new.uuid.or_else(|| current.uuid.clone());
            new.name = new.name.or_else(|| current.name.clone());
            new.address = None;
            drop(hp);
            return self.nic_replug(name, id, new).await;
        }
        let taps = paths.read_nics().map_err(|e| runtime(name, e))?;
        let tap = taps.get(seq).cloned().ok_or_else(|| {
            hotplug_err(name, "find the TAP")(format!("NIC {id} has no TAP record"))
        })?;
        let old = spec.clone();
        let nic = &mut spec.nics[seq];
        nic.mode = new.mode;
        nic.link = new.link;
        nic.ip = new.ip;
        nic.vlan = new.vlan;
        nic.network = new.network.or_else(|| nic.network.clone());
        crate::lifecycle::check_spec(&spec)?;
        let (up, down) = (
            self.config.nic_script.as_deref(),
            self.config.nic_down_script.as_deref(),
        );
        // Interrupted from here, the next operation puts the recorded
        // (old) settings back.
        hp.intend(Pending::ModifyNic {
            nic: spec.nics[seq].clone(),
        })?
        .armed = false;
        crate::nic::deconfigure(&old, seq, &tap, down);
        detach_bridge(&old.nics[seq], &tap, up.is_some());
        if let Err(e) = crate::nic::configure(&spec, seq, &tap, &self.config).await {
            self.restore_nic(&spec, &old, seq, &tap).await;
            hp.done()?;
            return Err(e);
        }
        hp.save(&spec, Some((&taps, seq)))?;
        hp.done()?;
        tracing::info!(instance = %name, nic = %id, "NIC modified");
        Ok(spec.nics[seq].clone())
    }

    /// Unplugs NIC `id` and plugs `new` in its place (a MAC change).
    async fn nic_replug(&self, name: &str, id: &str, new: NicSpec) -> Result<NicSpec> {
        tracing::info!(instance = %name, nic = %id, mac = %new.mac,
            "a new MAC: unplugging the NIC and plugging it again");
        self.nic_remove(name, id).await?;
        self.nic_add(name, new).await.map_err(|e| {
            hotplug_err(name, "plug the NIC again with its new MAC")(format!(
                "NIC {id} was unplugged, and plugging it again failed: {}",
                e.report()
            ))
        })
    }

    /// Settles what an interrupted (killed) hot plug left in the
    /// instance's journal: a device QEMU holds is recorded, anything short
    /// of that undone (every hot plug does this first; migration info
    /// needs it). Nothing to do, and no lock taken, without a journal.
    pub async fn settle_hotplug(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        if paths
            .read_hotplug_journal()
            .map_err(|e| runtime(name, e))?
            .is_none()
        {
            return Ok(());
        }
        self.begin(name).await.map(drop)
    }

    /// Refuses what must not run on a record an interrupted hot plug may
    /// have left behind QEMU (a pending unplug is fine: the record still
    /// has the device).
    pub(crate) fn refuse_unsettled_hotplug(&self, paths: &InstancePaths) -> Result<()> {
        let name = paths.name.as_str();
        let Some(data) = paths.read_hotplug_journal().map_err(|e| runtime(name, e))? else {
            return Ok(());
        };
        let settled = serde_json::from_slice::<Vec<Pending>>(&data)
            .is_ok_and(|e| e.iter().all(|e| matches!(e, Pending::Remove { .. })));
        if settled {
            return Ok(());
        }
        Err(hotplug_err(name, "settle")(format!(
            "an interrupted hot plug is not settled ({}); settle it first \
             (settle_hotplug, or any gkvm hot plug command)",
            paths.hotplug.display()
        )))
    }

    /// At stop or cleanup: the teardown of NIC settings only the journal
    /// knows (a NIC whose hot plug or change was interrupted), beside the
    /// recorded ones'.
    pub(crate) fn teardown_journal(
        &self,
        paths: &InstancePaths,
        spec: &InstanceSpec,
        taps: &[String],
    ) {
        let Ok(Some(data)) = paths.read_hotplug_journal() else {
            return;
        };
        let Ok(entries) = serde_json::from_slice::<Vec<Pending>>(&data) else {
            return;
        };
        let down = self.config.nic_down_script.as_deref();
        for entry in entries {
            match entry {
                Pending::AddNic { nic, tap, .. } if !taps.contains(&tap) => {
                    let mut with = spec.clone();
                    with.nics.push(nic);
                    crate::nic::deconfigure(&with, with.nics.len() - 1, &tap, down);
                }
                Pending::ModifyNic { nic } => {
                    let id = device_id(nic.address.as_ref());
                    let seq = position_of(spec.nics.iter().map(|n| n.address.as_ref()), &id);
                    if let Some((seq, tap)) = seq.and_then(|i| Some((i, taps.get(i)?))) {
                        let mut with = spec.clone();
                        with.nics[seq] = nic;
                        crate::nic::deconfigure(&with, seq, tap, down);
                    }
                }
                _ => {}
            }
        }
    }

    /// Puts NIC `seq`'s TAP back from the settings of `new` to those of
    /// `old`.
    async fn restore_nic(&self, new: &InstanceSpec, old: &InstanceSpec, seq: usize, tap: &str) {
        let (up, down) = (
            self.config.nic_script.as_deref(),
            self.config.nic_down_script.as_deref(),
        );
        detach_bridge(&new.nics[seq], tap, up.is_some());
        crate::nic::deconfigure(new, seq, tap, down);
        if let Err(back) = crate::nic::configure(old, seq, tap, &self.config).await {
            tracing::error!(instance = %old.name, error = %back.report(), "the NIC's old settings could not be restored");
        }
    }

    /// Changes the limits of throttle group `group` of a running instance
    /// live (QOM `limits` of the group's object; the disks in it are
    /// throttled anew at once) and in its record, so a restart and a
    /// migration keep them. Limits left unset are lifted. The group must
    /// be one the instance was started with (`io_limits`).
    pub async fn set_io_limits(
        &self,
        name: &str,
        group: &str,
        limits: kvm_cmdline::IoLimits,
    ) -> Result<()> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let fail = hotplug_err(name, "io limits");
        if !spec.io_limits.contains_key(group) {
            let known: Vec<&str> = spec.io_limits.keys().map(String::as_str).collect();
            return Err(fail(format!(
                "it has no throttle group {group:?} (groups are made at start from \
                 io_limits; it has: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        }
        if let Some(p) = limits.problem() {
            return Err(Error::Params {
                instance: name.to_owned(),
                source: kvm_cmdline::Error::Syntax {
                    key: format!("io_limits.{group}"),
                    reason: p,
                },
            });
        }
        let before = spec.clone();
        spec.io_limits.insert(group.to_owned(), limits.clone());
        // The record first: one killed after this holds what was asked,
        // and a restart or migration applies it.
        hp.save(&spec, None)?;
        let qmp = self.qmp(&hp.paths).await?;
        let set = qmp
            .run(&commands::QomSet {
                path: format!("/objects/{}", kvm_cmdline::io_group_id(group)),
                property: "limits".into(),
                value: limits.qom_value(),
            })
            .await;
        if let Err(e) = set {
            hp.save(&before, None)?;
            return Err(fail(format!("qom-set of the group's limits: {e}")));
        }
        tracing::info!(instance = %name, group, ?limits, "I/O limits set");
        Ok(())
    }

    /// Changes a running instance's cgroup limits (the `cgroup_*`
    /// hvparams in `changes`; a 0 lifts one) live and in its record, so
    /// a restart and a migration keep them. An instance started without
    /// limits gets its cgroup now, its QEMU and helpers moved into it.
    pub async fn set_limits(
        &self,
        name: &str,
        changes: &std::collections::BTreeMap<String, Value>,
    ) -> Result<()> {
        let params = |e| params_err(name, e);
        for key in changes.keys() {
            if !kvm_cmdline::CGROUP_HVPARAMS.contains(&key.as_str()) {
                return Err(params(kvm_cmdline::Error::Syntax {
                    key: key.clone(),
                    reason: format!(
                        "is not a limit that changes live (those are: {})",
                        kvm_cmdline::CGROUP_HVPARAMS.join(", ")
                    ),
                }));
            }
        }
        let (mut hp, mut spec) = self.begin(name).await?;
        let paths = hp.paths.clone();
        for (key, value) in changes {
            spec.hvparams.set(key, value.clone()).map_err(params)?;
        }
        // As a start checks it (`cgroup_io_max` is parsed with the
        // hvparams' syntax).
        crate::lifecycle::check_spec(&spec)?;
        let pid = self.running_pid(&paths)?;
        let fail = |e: kvm_runtime::Error| Error::Hotplug {
            instance: name.to_owned(),
            step: "cgroup limits",
            reason: e.to_string(),
        };
        if !paths.cgroup.exists() {
            let procs = paths.cgroup.create().map_err(fail)?;
            // Moving a process moves all its threads.
            let members: Vec<i32> = std::iter::once(pid).chain(paths.tpm_helper()).collect();
            for file in &procs {
                for member in &members {
                    std::fs::write(file, member.to_string()).map_err(|e| {
                        fail(kvm_runtime::Error::Io {
                            op: "move the instance into its cgroup",
                            path: file.clone(),
                            source: e,
                        })
                    })?;
                }
            }
        }
        crate::cgroup::apply_limits(&spec, &paths).map_err(fail)?;
        hp.save(&spec, None)?;
        tracing::info!(instance = %name, ?changes, "limits set");
        Ok(())
    }

    /// Whether devices can be hot-plugged into this running instance
    /// (Ganeti's `HotplugSupported`): started by gkvm with fixed device
    /// ids and slots, on a QEMU with `-device` (so `device_add`). The
    /// error says why not.
    pub async fn hotplug_supported(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        self.running_pid(&paths)?;
        // The record once: the instance and its machine both come from it.
        let record = self.running_record(&paths)?;
        let spec = crate::lifecycle::spec_from_record(name, &record, &paths.runtime)?;
        check_placed(&spec)?;
        refuse_pcie_root(name, &spec, &record)?;
        let caps = self.capabilities(&spec.hvparams.kvm_path).await?;
        if caps.devices.is_empty() || caps.features.drive_boot {
            return Err(hotplug_err(name, "check")(format!(
                "QEMU {} has no -device (device_add)",
                caps.version.text
            )));
        }
        Ok(())
    }
}

/// A hot plug changes the hardware of the guest that runs here: not of a
/// destination still waiting for its guest (the migration would land
/// with devices the guest never saw plugged), nor of a source in or past
/// its migration (its QEMU must never run again).
fn refuse_in_migration(name: &str, record: &kvm_runtime::RuntimeRecord) -> Result<()> {
    use crate::lifecycle::{has_marker, HANDED_OVER, INCOMING, MIGRATING};
    let state = if has_marker(record, INCOMING) {
        "waiting for an incoming migration"
    } else if has_marker(record, HANDED_OVER) {
        "migrated away (its guest runs on the destination)"
    } else if has_marker(record, MIGRATING) {
        "migrating away"
    } else {
        return Ok(());
    };
    Err(hotplug_err(name, "check")(format!(
        "it is {state}: hot plug only where its guest runs"
    )))
}

/// A PCI Express machine (q35) has no hot-pluggable slot on its root bus
/// (QEMU: "Bus 'pcie.0' does not support hotplugging"): hot plug there
/// needs the root ports gkvm gives q35 instances it starts
/// ([`kvm_cmdline::PcieSlots::RootPorts`]); one started without them (by
/// an earlier release) is refused, naming the machine.
fn refuse_pcie_root(
    name: &str,
    spec: &kvm_cmdline::InstanceSpec,
    record: &kvm_runtime::RuntimeRecord,
) -> Result<()> {
    let machine = record
        .payload
        .get("machine")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if machine.contains("q35") && spec.pcie_slots != Some(kvm_cmdline::PcieSlots::RootPorts) {
        return Err(hotplug_err(name, "check")(format!(
            "machine {machine} is PCI Express and was started without root ports: \
             its root bus has no hot-pluggable slots (restart it to get them)"
        )));
    }
    Ok(())
}

/// An instance being hot plugged: its lock held, its record as read, its
/// journal.
struct Hotplug {
    paths: InstancePaths,
    _lock: kvm_runtime::InstanceLock,
    record: kvm_runtime::RuntimeRecord,
    journal: Vec<Pending>,
}

impl Hotplug {
    /// Notes in the journal what is about to be done, before QEMU or the
    /// node is touched; the guard returned puts the journal back if the
    /// hot plug fails or is dropped.
    fn intend(&mut self, entry: Pending) -> Result<HotplugGuard> {
        let journal_before = self.journal.clone();
        self.journal.retain(|e| *e != entry);
        self.journal.push(entry);
        self.write_journal()?;
        Ok(HotplugGuard {
            paths: self.paths.clone(),
            steps: Vec::new(),
            armed: true,
            journal_before,
        })
    }

    /// Takes the last entry out of the journal: its outcome is recorded.
    fn done(&mut self) -> Result<()> {
        self.journal.pop();
        self.write_journal()
    }

    fn write_journal(&self) -> Result<()> {
        self.paths
            .write_hotplug_journal(journal_bytes(&self.journal).as_deref())
            .map_err(|e| runtime(&self.paths.name, e))
    }

    /// Writes the instance's new definition into its runtime record and,
    /// when NICs changed from index `first` on, their TAPs into the NIC
    /// records (only those from `first`).
    fn save(&mut self, spec: &InstanceSpec, taps: Option<(&[String], usize)>) -> Result<()> {
        let name = spec.name.as_str();
        let record = &mut self.record;
        // The definition is the record of every device, hot-plugged NICs
        // and disks alike; lists in another form (Ganeti's, of an adopted
        // instance, or a record of an older gkvm) would go stale.
        record.nics.clear();
        record.disks.clear();
        if !record.payload.is_object() {
            record.payload = Value::Object(serde_json::Map::new());
        }
        if let Some(p) = record.payload.as_object_mut() {
            p.insert(
                "spec".into(),
                serde_json::to_value(spec).unwrap_or(Value::Null),
            );
            if let Some((taps, _)) = taps {
                p.insert(
                    "taps".into(),
                    serde_json::to_value(taps).unwrap_or(Value::Null),
                );
            }
        }
        self.paths
            .write_runtime(record)
            .map_err(|e| runtime(name, e))?;
        match taps {
            Some((taps, first)) => self
                .paths
                .write_nics_from(taps, first)
                .map_err(|e| runtime(name, e)),
            None => Ok(()),
        }
    }
}

/// Whether QEMU runs as another user than gkvm (`security_model` user
/// or pool): it cannot open what only root may once it runs.
fn qemu_opens_as_another_user(spec: &InstanceSpec) -> bool {
    spec.hvparams.security_model != kvm_cmdline::hvparams::SecurityModel::None
}

/// Removes the descriptor sets added for device `id` (their opaque note
/// says whose they are); none is fine.
async fn remove_fdsets(qmp: &gkvm_qmp::Qmp, id: &str) {
    let Ok(sets) = qmp.run(&commands::QueryFdsets).await else {
        return;
    };
    for set in sets {
        if set.fds.iter().any(|fd| fd.opaque.as_deref() == Some(id)) {
            let remove = commands::RemoveFd {
                fdset_id: set.fdset_id,
                fd: None,
            };
            if let Err(e) = qmp.run(&remove).await {
                tracing::warn!(device = id, fdset = set.fdset_id, error = %e, "remove-fd");
            }
        }
    }
}

/// What settling a hot plug journal works with: QEMU's devices as it
/// holds them now, the instance's TAPs, and whether the record changed.
struct Settle<'a> {
    hv: &'a KvmHypervisor,
    name: &'a str,
    qmp: &'a gkvm_qmp::Qmp,
    present: std::collections::HashSet<String>,
    taps: Vec<String>,
    changed: bool,
}

impl Settle<'_> {
    /// An undo step that finds nothing to undo is fine.
    fn ignore(&self, what: &str, r: std::result::Result<(), gkvm_qmp::Error>) {
        if let Err(e) = r {
            tracing::debug!(instance = %self.name, what, error = %e, "nothing to undo");
        }
    }

    /// A NIC plug: recorded if QEMU holds it as a NIC, else undone (its
    /// descriptors closed, its backend removed, its TAP's setup undone).
    async fn add_nic(&mut self, spec: &mut InstanceSpec, nic: &NicSpec, tap: &str, fds: &[String]) {
        let name = self.name;
        let id = device_id(nic.address.as_ref());
        if let Some(seq) = position_of(spec.nics.iter().map(|n| n.address.as_ref()), &id) {
            // Killed between the record and the NIC file.
            if seq == self.taps.len() {
                self.taps.push(tap.to_owned());
                self.changed = true;
            }
            return;
        }
        let held = self.present.contains(&id);
        if held && !is_device_of(self.qmp, &id, "netdev").await {
            // Not what the journal says it is: a tampered journal decides
            // nothing (recorded or undone).
            tracing::warn!(instance = %name, device = %id, "the hot plug journal names a device QEMU holds as a NIC, and it is not one: entry dropped");
            return;
        }
        if held {
            tracing::warn!(instance = %name, nic = %id, "an interrupted hot plug's NIC is in QEMU: recorded");
            spec.nics.push(nic.clone());
            self.taps.push(tap.to_owned());
            self.changed = true;
            return;
        }
        tracing::warn!(instance = %name, nic = %id, "an interrupted hot plug of a NIC: undone");
        for f in fds {
            let close = commands::CloseFd { fdname: f.clone() };
            self.ignore("closefd", self.qmp.run(&close).await);
        }
        let del = commands::NetdevDel { id: id.clone() };
        self.ignore("netdev_del", self.qmp.run(&del).await);
        let mut with = spec.clone();
        with.nics.push(nic.clone());
        let down = self.hv.config.nic_down_script.as_deref();
        crate::nic::deconfigure(&with, with.nics.len() - 1, tap, down);
    }

    /// A disk plug: recorded if QEMU holds it as a disk, else undone (its
    /// block node and descriptor sets removed).
    async fn add_disk(&mut self, spec: &mut InstanceSpec, disk: &DiskSpec) {
        let name = self.name;
        let id = device_id(disk.address.as_ref());
        if position_of(spec.disks.iter().map(|d| d.address.as_ref()), &id).is_some() {
            return;
        }
        let held = self.present.contains(&id);
        if held && !is_device_of(self.qmp, &id, "drive").await {
            tracing::warn!(instance = %name, device = %id, "the hot plug journal names a device QEMU holds as a disk, and it is not one: entry dropped");
            return;
        }
        if held {
            tracing::warn!(instance = %name, disk = %id, "an interrupted hot plug's disk is in QEMU: recorded");
            spec.disks.push(disk.clone());
            self.changed = true;
            return;
        }
        tracing::warn!(instance = %name, disk = %id, "an interrupted hot plug of a disk: undone");
        let del = commands::BlockdevDel {
            node_name: id.clone(),
        };
        self.ignore("blockdev-del", self.qmp.run(&del).await);
        remove_fdsets(self.qmp, &id).await;
    }

    /// A NIC change: its TAP is put back to the recorded settings unless
    /// they are the new ones already.
    async fn modify_nic(&mut self, spec: &InstanceSpec, nic: &NicSpec) {
        let id = device_id(nic.address.as_ref());
        let Some(seq) = position_of(spec.nics.iter().map(|n| n.address.as_ref()), &id) else {
            return;
        };
        let current = &spec.nics[seq];
        let recorded = (&current.mode, &current.link, &current.ip, &current.vlan)
            == (&nic.mode, &nic.link, &nic.ip, &nic.vlan);
        if recorded || seq >= self.taps.len() {
            return;
        }
        tracing::warn!(instance = %self.name, nic = %id, "an interrupted change of a NIC: its recorded settings put back");
        let mut new = spec.clone();
        new.nics[seq] = nic.clone();
        self.hv.restore_nic(&new, spec, seq, &self.taps[seq]).await;
    }

    /// An unplug: still pending (true) while the guest holds the device;
    /// once it let go, the device's backend goes and the record forgets it.
    async fn remove(&mut self, spec: &mut InstanceSpec, id: &str) -> bool {
        let name = self.name;
        if self.present.contains(id) {
            return true;
        }
        let nic = position_of(spec.nics.iter().map(|n| n.address.as_ref()), id);
        let disk = position_of(spec.disks.iter().map(|d| d.address.as_ref()), id);
        if let Some(seq) = nic {
            tracing::warn!(instance = %name, nic = %id, "an unplugged NIC: its removal finished");
            let del = commands::NetdevDel { id: id.to_owned() };
            self.ignore("netdev_del", self.qmp.run(&del).await);
            if seq < self.taps.len() {
                let down = self.hv.config.nic_down_script.as_deref();
                crate::nic::deconfigure(spec, seq, &self.taps[seq], down);
                self.taps.remove(seq);
            }
            spec.nics.remove(seq);
            self.changed = true;
        } else if let Some(seq) = disk {
            tracing::warn!(instance = %name, disk = %id, "an unplugged disk: its removal finished");
            let del = commands::BlockdevDel {
                node_name: id.to_owned(),
            };
            self.ignore("blockdev-del", self.qmp.run(&del).await);
            remove_fdsets(self.qmp, id).await;
            spec.disks.remove(seq);
            self.changed = true;
        }
        false
    }
}

/// Refuses an instance whose devices have no fixed ids and slots.
fn check_placed(spec: &InstanceSpec) -> Result<()> {
    if spec.is_legacy_placement() && !(spec.nics.is_empty() && spec.disks.is_empty()) {
        return Err(hotplug_err(&spec.name, "check")(
            "its devices have no fixed ids and slots (started by an earlier release \
             or by Ganeti); restart it once to hot plug"
                .into(),
        ));
    }
    Ok(())
}

/// Names for descriptors passed with `getfd`: `ID-KINDn`.
fn fd_names<'a>(
    id: &str,
    kind: &str,
    fds: impl Iterator<Item = std::os::fd::BorrowedFd<'a>>,
) -> Vec<(String, std::os::fd::BorrowedFd<'a>)> {
    fds.enumerate()
        .map(|(j, fd)| (format!("{id}-{kind}{j}"), fd))
        .collect()
}

/// Takes a bridged NIC's TAP off its bridge (natively configured NICs:
/// a script owns what it did). A TAP that goes away leaves its bridge by
/// itself; one that stays, for a modify, must be taken off.
fn detach_bridge(nic: &NicSpec, tap: &str, scripted: bool) {
    if scripted || nic.mode != kvm_cmdline::NicMode::Bridged || nic.link.is_empty() {
        return;
    }
    if let Err(e) = gkvm_tap::bridge_remove_interface(&nic.link, tap) {
        tracing::debug!(tap, bridge = %nic.link, error = %e, "not on the bridge");
    }
}

/// The index of the disk with device id `id`, or of index `id`.
fn find_disk(spec: &InstanceSpec, id: &str) -> Option<usize> {
    find_device(spec.disks.iter().map(|d| d.address.as_ref()), id)
}

/// The index of the NIC with device id `id`, or of index `id`.
fn find_nic(spec: &InstanceSpec, id: &str) -> Option<usize> {
    find_device(spec.nics.iter().map(|n| n.address.as_ref()), id)
}

/// The position of the device whose id is `id`, or position `id` itself.
fn find_device<'a>(
    addresses: impl ExactSizeIterator<Item = Option<&'a kvm_cmdline::DeviceAddress>>,
    id: &str,
) -> Option<usize> {
    let count = addresses.len();
    position_of(addresses, id).or_else(|| id.parse::<usize>().ok().filter(|&i| i < count))
}

/// The position of the device whose id is exactly `id`.
fn position_of<'a>(
    mut addresses: impl Iterator<Item = Option<&'a kvm_cmdline::DeviceAddress>>,
    id: &str,
) -> Option<usize> {
    addresses.position(|a| a.is_some_and(|a| a.id == id))
}

/// A placed device's id.
fn device_id(address: Option<&kvm_cmdline::DeviceAddress>) -> String {
    address.map(|a| a.id.clone()).unwrap_or_default()
}

fn runtime(name: &str, source: kvm_runtime::Error) -> Error {
    Error::Runtime {
        instance: name.to_owned(),
        source,
    }
}

/// Whether QEMU's device `id` has the QOM property `property` (`netdev`
/// for a NIC, `drive` for a disk): what the journal says a device is, as
/// QEMU knows it.
async fn is_device_of(qmp: &gkvm_qmp::Qmp, id: &str, property: &str) -> bool {
    let get = commands::QomGet {
        path: format!("/machine/peripheral/{id}"),
        property: property.to_owned(),
    };
    qmp.run(&get).await.is_ok()
}

/// An image file grows sparse, so growing it past the free space of its
/// file system succeeds (thin provisioning, as Ganeti's own file storage
/// grows), but the guest then meets ENOSPC when it writes: said, not
/// refused.
fn warn_if_short_of_space(name: &str, disk: &DiskSpec, growth: u64) {
    if disk.uri.is_some() || !std::fs::metadata(&disk.path).is_ok_and(|m| m.is_file()) {
        return;
    }
    let Ok(fs) = nix::sys::statvfs::statvfs(&disk.path) else {
        return;
    };
    let free = fs.blocks_available().saturating_mul(fs.fragment_size());
    if growth > free {
        tracing::warn!(instance = %name, path = %disk.path.display(), growth, free,
            "the image grows by more than its file system has free: the guest will meet \
             'no space left' when it fills the disk");
    }
}

/// `netdev_add` of the argv layer's backend: its kind, its id, the rest.
fn netdev_add(netdev: &kvm_cmdline::qemu::Netdev) -> commands::NetdevAdd {
    let mut props = netdev.props.to_json();
    commands::NetdevAdd {
        kind: netdev.kind.clone(),
        id: take_id(&mut props),
        props,
    }
}

/// `device_add` of the argv layer's device: its driver, its id, the rest.
fn device_add(device: &kvm_cmdline::qemu::Device) -> commands::DeviceAdd {
    let mut props = device.props.to_json();
    commands::DeviceAdd {
        driver: device.driver.clone(),
        id: take_id(&mut props),
        props,
    }
}

/// The `id` property, taken out of the others.
fn take_id(props: &mut serde_json::Map<String, Value>) -> String {
    match props.remove("id") {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// A device to hot-plug (a dry run's input and answer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HotplugDevice {
    /// A NIC.
    Nic(Box<NicSpec>),
    /// A disk.
    Disk(Box<DiskSpec>),
}
