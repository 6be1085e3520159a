//! NICs and disks into and out of a running instance, and disks grown
//! (Ganeti 3.1's HotAddDevice / HotDelDevice / ResizeDisk): a NIC's TAP
//! configured as at start, its descriptors passed with `getfd`,
//! `netdev_add` and `device_add` at a free PCI slot; a disk's block node
//! by `blockdev-add`; removal by `device_del`, `DEVICE_DELETED`, then
//! `netdev_del` (and the NIC's teardown) or `blockdev-del`. The runtime record changes only once QEMU has confirmed, and
//! a failure at any step undoes the earlier ones, even if the operation is
//! dropped (a drop guard undoes with a blocking QMP client).

use std::os::fd::AsFd;
use std::time::Duration;

use gkvm_qmp::commands;
use kvm_cmdline::{DiskSpec, InstanceSpec, NicSpec};
use kvm_runtime::InstancePaths;
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
    /// A configured NIC (script or native).
    Teardown {
        spec: Box<InstanceSpec>,
        seq: usize,
        tap: String,
        script: Option<std::path::PathBuf>,
    },
}

/// Undoes, in reverse order, what a hot plug did unless disarmed.
struct HotplugGuard {
    paths: InstancePaths,
    steps: Vec<Undo>,
    armed: bool,
}

impl Drop for HotplugGuard {
    fn drop(&mut self) {
        if !self.armed || self.steps.is_empty() {
            return;
        }
        tracing::warn!(instance = %self.paths.name, "hot plug failed or was interrupted; undoing it");
        let options = gkvm_qmp::Options {
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(5),
            ..gkvm_qmp::Options::default()
        };
        let mut qmp = gkvm_qmp::blocking::Qmp::connect(&self.paths.qmp, options).ok();
        for step in self.steps.drain(..).rev() {
            let (name, args) = match step {
                Undo::Teardown {
                    spec,
                    seq,
                    tap,
                    script,
                } => {
                    crate::nic::deconfigure(&spec, seq, &tap, script.as_deref());
                    continue;
                }
                Undo::CloseFd(n) => ("closefd", serde_json::json!({"fdname": n})),
                Undo::NetdevDel(id) => ("netdev_del", serde_json::json!({"id": id})),
                Undo::DeviceDel(id) => ("device_del", serde_json::json!({"id": id})),
                Undo::BlockdevDel(n) => ("blockdev-del", serde_json::json!({"node-name": n})),
            };
            if let Some(q) = qmp.as_mut() {
                if let Err(e) = q.execute_raw(name, Some(args)) {
                    tracing::warn!(instance = %self.paths.name, step = name, error = %e, "undo");
                }
            }
        }
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
        let paths = self.paths(name)?;
        let lock = self.lock(&paths).await?;
        self.running_pid(&paths)?;
        let record = paths
            .read_runtime()
            .map_err(|e| runtime(name, e))?
            .ok_or_else(|| Error::NotRunning {
                instance: name.to_owned(),
            })?;
        let spec = crate::lifecycle::spec_from_record(name, &record, &paths.runtime)?;
        check_placed(&spec)?;
        let hp = Hotplug {
            paths,
            _lock: lock,
            record,
        };
        Ok((hp, spec))
    }

    /// Adds a NIC to a running instance: a TAP (queues, vnet_hdr and
    /// vhost-net as the instance's hvparams say), configured by the NIC
    /// script or natively, then `netdev_add` and `device_add` at a free
    /// PCI slot. Returns the NIC as placed (its id and slot). Errors name
    /// the step; whatever was done is undone.
    pub async fn nic_add(&self, name: &str, nic: NicSpec) -> Result<NicSpec> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let paths = hp.paths.clone();
        let caps = self.capabilities(&spec.hvparams.kvm_path).await?;
        let seq = spec.nics.len();
        spec.nics.push(nic);
        let params = |e| Error::Params {
            instance: name.to_owned(),
            source: e,
        };
        spec.assign_addresses().map_err(params)?;
        crate::lifecycle::check_spec(&spec)?;
        let id = spec.nics[seq]
            .address
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        let mut guard = HotplugGuard {
            paths: paths.clone(),
            steps: Vec::new(),
            armed: true,
        };
        let virtio = crate::nic::is_virtio(&spec, &caps);
        let tap = crate::nic::open_tap(&spec, seq, &self.config.tap_template, virtio)?;
        let vhost = crate::nic::open_vhost_for(&spec, &tap)?;
        crate::nic::configure(&spec, seq, tap.name(), self.config.nic_script.as_deref()).await?;
        guard.steps.push(Undo::Teardown {
            spec: Box::new(spec.clone()),
            seq,
            tap: tap.name().to_owned(),
            script: self.config.nic_down_script.clone(),
        });
        let qmp = self.qmp(&paths).await?;
        let step = |s: &'static str| hotplug_err(name, s);
        let tap_fds = fd_names(&id, "tap", tap.fds().iter().map(AsFd::as_fd));
        let vhost_fds = fd_names(&id, "vhost", vhost.iter().map(AsFd::as_fd));
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
                .map_err(params)?;
        qmp.execute_raw("netdev_add", Some(netdev.qmp_arguments()))
            .await
            .map_err(|e| step("netdev_add")(e.to_string()))?;
        // QEMU took the descriptors: nothing to close any more.
        guard.steps.retain(|s| !matches!(s, Undo::CloseFd(_)));
        guard.steps.push(Undo::NetdevDel(id.clone()));
        qmp.execute_raw("device_add", Some(device.qmp_arguments()))
            .await
            .map_err(|e| step("device_add")(e.to_string()))?;
        guard.steps.push(Undo::DeviceDel(id.clone()));
        let mut taps = paths.read_nics().map_err(|e| runtime(name, e))?;
        taps.truncate(seq);
        taps.push(tap.name().to_owned());
        hp.save(&spec, Some((&taps, seq)))?;
        guard.armed = false;
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
        let dev_id = spec.nics[seq]
            .address
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(&paths).await?;
        self.unplug(&qmp, name, &dev_id).await?;
        qmp.execute_raw("netdev_del", Some(serde_json::json!({"id": dev_id})))
            .await
            .map_err(|e| step("netdev_del")(e.to_string()))?;
        let mut taps = paths.read_nics().map_err(|e| runtime(name, e))?;
        if let Some(tap) = taps.get(seq).cloned() {
            crate::nic::deconfigure(&spec, seq, &tap, self.config.nic_down_script.as_deref());
            taps.remove(seq);
        }
        spec.nics.remove(seq);
        hp.save(&spec, Some((&taps, seq)))?;
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
        let seq = spec.disks.len();
        spec.disks.push(disk);
        let params = |e| Error::Params {
            instance: name.to_owned(),
            source: e,
        };
        spec.assign_addresses().map_err(params)?;
        crate::lifecycle::check_spec(&spec)?;
        let (node, device) = kvm_cmdline::hotplug_disk(&spec, &caps, seq).map_err(params)?;
        let id = spec.disks[seq]
            .address
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        let mut guard = HotplugGuard {
            paths: paths.clone(),
            steps: Vec::new(),
            armed: true,
        };
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(&paths).await?;
        qmp.execute_raw("blockdev-add", Some(node.qmp_arguments()))
            .await
            .map_err(|e| step("blockdev-add")(e.to_string()))?;
        guard.steps.push(Undo::BlockdevDel(id.clone()));
        qmp.execute_raw("device_add", Some(device.qmp_arguments()))
            .await
            .map_err(|e| step("device_add")(e.to_string()))?;
        guard.steps.push(Undo::DeviceDel(id.clone()));
        hp.save(&spec, None)?;
        guard.armed = false;
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
        let dev_id = spec.disks[seq]
            .address
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(&paths).await?;
        self.unplug(&qmp, name, &dev_id).await?;
        qmp.execute_raw(
            "blockdev-del",
            Some(serde_json::json!({"node-name": dev_id})),
        )
        .await
        .map_err(|e| step("blockdev-del")(e.to_string()))?;
        spec.disks.remove(seq);
        hp.save(&spec, None)?;
        tracing::info!(instance = %name, disk = %dev_id, "disk removed");
        Ok(())
    }

    /// Grows disk `id` (device id or index) of a running instance to
    /// `bytes` (`block_resize`; a file image grows with it, a block device
    /// must have been grown first, as Ganeti grows the volume before).
    /// Shrinking is refused.
    pub async fn disk_grow(&self, name: &str, id: &str, bytes: u64) -> Result<()> {
        let (hp, spec) = self.begin(name).await?;
        let paths = &hp.paths;
        let seq = find_disk(&spec, id)
            .ok_or_else(|| hotplug_err(name, "find the disk")(format!("it has no disk {id:?}")))?;
        let node = spec.disks[seq]
            .address
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        let step = |s: &'static str| hotplug_err(name, s);
        let qmp = self.qmp(paths).await?;
        let nodes = qmp
            .execute_raw(
                "query-named-block-nodes",
                Some(serde_json::json!({"flat": true})),
            )
            .await
            .map_err(|e| step("query-named-block-nodes")(e.to_string()))?;
        let current = nodes
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node.as_str()))
            })
            .and_then(|n| n.get("image")?.get("virtual-size")?.as_u64())
            .ok_or_else(|| step("find the block node")(format!("QEMU has no node {node}")))?;
        if bytes < current {
            return Err(step("check the size")(format!(
                "{bytes} bytes is smaller than the disk's {current}; disks only grow"
            )));
        }
        qmp.execute_raw(
            "block_resize",
            Some(serde_json::json!({"node-name": node, "size": bytes})),
        )
        .await
        .map_err(|e| step("block_resize")(e.to_string()))?;
        tracing::info!(instance = %name, disk = %node, bytes, "disk grown");
        Ok(())
    }

    /// `device_del` and the wait for the guest to release the device.
    async fn unplug(&self, qmp: &gkvm_qmp::Qmp, name: &str, dev_id: &str) -> Result<()> {
        let step = |s: &'static str| hotplug_err(name, s);
        qmp.execute_raw("device_del", Some(serde_json::json!({"id": dev_id})))
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
    /// the guest sees). The MAC and device stay. On failure the old
    /// settings are restored.
    pub async fn nic_modify(&self, name: &str, id: &str, new: NicSpec) -> Result<NicSpec> {
        let (mut hp, mut spec) = self.begin(name).await?;
        let paths = hp.paths.clone();
        let seq = find_nic(&spec, id)
            .ok_or_else(|| hotplug_err(name, "find the NIC")(format!("it has no NIC {id:?}")))?;
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
        crate::nic::deconfigure(&old, seq, &tap, down);
        detach_bridge(&old.nics[seq], &tap, up.is_some());
        if let Err(e) = crate::nic::configure(&spec, seq, &tap, up).await {
            detach_bridge(&spec.nics[seq], &tap, up.is_some());
            crate::nic::deconfigure(&spec, seq, &tap, down);
            if let Err(back) = crate::nic::configure(&old, seq, &tap, up).await {
                tracing::error!(instance = %name, error = %back.report(), "the NIC's old settings could not be restored");
            }
            return Err(e);
        }
        hp.save(&spec, Some((&taps, seq)))?;
        tracing::info!(instance = %name, nic = %id, "NIC modified");
        Ok(spec.nics[seq].clone())
    }

    /// Whether devices can be hot-plugged into this running instance
    /// (Ganeti's `HotplugSupported`): started by gkvm with fixed device
    /// ids and slots, on a QEMU with `-device` (so `device_add`). The
    /// error says why not.
    pub async fn hotplug_supported(&self, name: &str) -> Result<()> {
        let paths = self.paths(name)?;
        self.running_pid(&paths)?;
        let spec = self.saved_spec(&paths)?.ok_or_else(|| Error::NotRunning {
            instance: name.to_owned(),
        })?;
        check_placed(&spec)?;
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

/// An instance being hot plugged: its lock held, its record as read.
struct Hotplug {
    paths: InstancePaths,
    _lock: kvm_runtime::InstanceLock,
    record: kvm_runtime::RuntimeRecord,
}

impl Hotplug {
    /// Writes the instance's new definition into its runtime record and,
    /// when NICs changed from index `first` on, their TAPs into the NIC
    /// records (only those from `first`).
    fn save(&mut self, spec: &InstanceSpec, taps: Option<(&[String], usize)>) -> Result<()> {
        let name = spec.name.as_str();
        let record = &mut self.record;
        record.nics = spec
            .nics
            .iter()
            .filter_map(|n| serde_json::to_value(n).ok())
            .collect();
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
    let mut addresses = addresses;
    addresses
        .position(|a| a.is_some_and(|a| a.id == id))
        .or_else(|| id.parse::<usize>().ok().filter(|&i| i < count))
}

fn runtime(name: &str, source: kvm_runtime::Error) -> Error {
    Error::Runtime {
        instance: name.to_owned(),
        source,
    }
}
