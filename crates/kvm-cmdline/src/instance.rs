//! What to run: the instance definition cluster software and the CLI send.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, HvParams, MacAddr, Uuid};

/// An instance to start: the JSON interface of gkvm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Instance name (a host name; used in paths and `-name`).
    pub name: String,
    /// System UUID (`-uuid`), when known.
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// Memory in MiB (the maximum; the balloon can shrink it).
    pub memory: u64,
    /// Memory in MiB to balloon down to right after start (Ganeti's
    /// startup memory); none means `memory`.
    #[serde(default)]
    pub startup_memory: Option<u64>,
    /// Virtual CPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Tags, passed to the NIC script as `TAGS`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Hypervisor parameters (Ganeti key names; JSON types or strings).
    #[serde(default, deserialize_with = "hvparams_from_map")]
    pub hvparams: HvParams,
    /// Disks, in order (the first is the boot disk).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs, in order.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// The TCP port for VNC (display = port - 5900) or SPICE.
    #[serde(default)]
    pub network_port: Option<u16>,
    /// Which devices the machine has beyond those the instance asks for.
    /// `None` is [`Layout::QemuDefaults`], how earlier releases (and
    /// Ganeti) started instances; a new start chooses [`Layout::Lean`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
    /// Where a PCI Express machine (q35) plugs its NICs and disks. `None`
    /// is [`PcieSlots::RootBus`], how earlier releases started q35
    /// instances; a new q35 start chooses [`PcieSlots::RootPorts`].
    /// Meaningless on a PCI machine (i440fx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_slots: Option<PcieSlots>,
    /// Throttle groups by name: block I/O limits that the disks naming a
    /// group in their `io_group` share (one disk's own limits are a group
    /// of one). Every group is made at start, so a hot-plugged disk may
    /// join one; a group's limits change live.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub io_limits: std::collections::BTreeMap<String, crate::IoLimits>,
}

/// Where a q35 machine's NICs and disks sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PcieSlots {
    /// On the root bus (`pcie.0`) at their slot: nothing can be hot
    /// plugged (QEMU: "Bus 'pcie.0' does not support hotplugging").
    RootBus,
    /// Behind a `pcie-root-port` of their own at their slot, one port at
    /// every slot a device may take (from `kvm_pci_reservations` up to
    /// [`PCIE_SLOTS`]` - 1`): empty ports take hot-plugged devices, and
    /// the machine is the same whatever was plugged, so a migration
    /// target builds it from the definition alone (libvirt adds spare
    /// root ports for the same reason).
    RootPorts,
}

/// The machine's devices beyond those the instance asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// QEMU's defaults (VGA, parallel port, floppy and CD-ROM drives, a
    /// monitor) and a USB controller always, as Ganeti's driver and gkvm
    /// 0.1 start instances. Kept for instances started that way, so that
    /// a migration lands on identical hardware.
    QemuDefaults,
    /// `-nodefaults`: only what the hvparams ask for (a VGA card only for
    /// VNC or SPICE, a USB controller only for USB devices), as libvirt
    /// does. The guest boots faster: nothing to probe.
    Lean,
}

/// Most NICs an instance may have (Ganeti's `MAX_NICS`).
pub const MAX_NICS: usize = 8;
/// Most disks an instance may have (Ganeti's `MAX_DISKS`).
pub const MAX_DISKS: usize = 16;
/// Largest memory size accepted, in MiB (16 TiB, beyond any x86 host).
pub const MAX_MEMORY_MIB: u64 = 16 << 20;

fn one() -> u32 {
    1
}

/// Parses hvparams key by key, so an error names the key and the value.
fn hvparams_from_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HvParams, D::Error> {
    let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    HvParams::from_map(&map).map_err(serde::de::Error::custom)
}

/// Read-write or read-only.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
pub enum DiskMode {
    /// Read-write.
    #[default]
    #[serde(rename = "rw")]
    ReadWrite,
    /// Read-only.
    #[serde(rename = "ro")]
    ReadOnly,
}

/// One disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DiskSpec {
    /// Block device or image file on this node (unused when `uri` is set).
    #[serde(default)]
    pub path: PathBuf,
    /// Userspace access (Ganeti's `access=userspace`): QEMU's own block
    /// driver opens this storage URI (`nbd://`, `nbd+unix://`, `rbd:`,
    /// `gluster://`, `iscsi://`) and no host device is involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Access mode.
    #[serde(default)]
    pub mode: DiskMode,
    /// The Ganeti disk template (`plain`, `drbd`, `sharedfile`, `blockdev`,
    /// `rbd`, `ext`, ...): shared-storage templates force `cache=none`.
    #[serde(default)]
    pub template: Option<String>,
    /// The disk's UUID in the cluster, if it has one (its device id derives
    /// from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// The disk's name in the cluster, if it has one (its device id derives
    /// from it when there is no UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it sits in the guest, once placed
    /// ([`InstanceSpec::assign_addresses`]); kept for the life of the
    /// instance, hot plug and migration included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<DeviceAddress>,
    /// The throttle group (of the instance's `io_limits`) whose limits
    /// this disk's I/O counts against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_group: Option<String>,
}

/// A NIC's or disk's identity in the guest: a device id that never
/// changes while the instance lives (unplugging one device renumbers no
/// other), and for a PCI device its slot on the machine's main PCI bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceAddress {
    /// The QEMU id of the device (its backend gets the same id).
    pub id: String,
    /// The PCI slot (`addr=0x..`), for devices on the PCI bus.
    #[serde(default)]
    pub pci_slot: Option<u8>,
}

/// Slots on a PCI bus.
pub const PCI_SLOTS: u8 = 32;

/// Slots a device may take on a q35 machine's root bus: slot 31 holds
/// its ICH9 functions (LPC, SATA, SMBus).
pub const PCIE_SLOTS: u8 = 31;

/// Disk templates on storage shared between nodes: QEMU's page cache must
/// be off for them or a migration can corrupt the disk.
pub const SHARED_STORAGE_TEMPLATES: &[&str] = &["sharedfile", "blockdev", "rbd", "ext", "gluster"];

impl DiskSpec {
    /// Whether this disk lives on storage shared between nodes.
    pub fn is_shared_storage(&self) -> bool {
        self.template
            .as_deref()
            .is_some_and(|t| SHARED_STORAGE_TEMPLATES.contains(&t))
    }
}

/// How a NIC reaches the network.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NicMode {
    /// TAP attached to the bridge named by `link`.
    #[default]
    Bridged,
    /// TAP routed by the host (routing table `link`).
    Routed,
    /// TAP attached to the Open vSwitch named by `link`.
    Openvswitch,
    /// Networking done outside gkvm (Ganeti's `ext`): the TAP is brought
    /// up and the NIC script, if any, does the rest.
    Ext,
}

impl NicMode {
    /// Ganeti's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NicMode::Bridged => "bridged",
            NicMode::Routed => "routed",
            NicMode::Openvswitch => "openvswitch",
            NicMode::Ext => "ext",
        }
    }
}

/// The network a NIC belongs to (Ganeti's network objects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(default)]
pub struct NetworkSpec {
    /// Network name.
    pub name: String,
    /// The network's UUID in the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// The network's tags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// IPv4 subnet.
    pub subnet: Option<String>,
    /// IPv4 gateway.
    pub gateway: Option<String>,
    /// IPv6 subnet.
    pub subnet6: Option<String>,
    /// IPv6 gateway.
    pub gateway6: Option<String>,
    /// MAC prefix.
    pub mac_prefix: Option<String>,
    /// Network type.
    pub network_type: Option<String>,
}

/// One NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NicSpec {
    /// MAC address.
    pub mac: MacAddr,
    /// The guest's IP, for routed mode and the NIC script.
    #[serde(default)]
    pub ip: Option<String>,
    /// Bridged, routed or Open vSwitch.
    #[serde(default)]
    pub mode: NicMode,
    /// Bridge name, routing table or switch.
    #[serde(default)]
    pub link: String,
    /// Ganeti's `vlan` nicparam: `.N` untagged (access) VLAN N, `:N:M`
    /// tagged (trunk) VLANs, `.N:M` both; for Open vSwitch and VLAN-aware
    /// bridges (the NIC script reads it as `VLAN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<String>,
    /// The network, if the NIC belongs to one.
    #[serde(default)]
    pub network: Option<NetworkSpec>,
    /// The NIC's UUID in the cluster, if it has one (its device id derives
    /// from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// The NIC's name in the cluster, if it has one (its device id derives
    /// from it when there is no UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it sits in the guest, once placed
    /// ([`InstanceSpec::assign_addresses`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<DeviceAddress>,
    /// The kernel name template of this NIC's TAP (`%d` once; the kernel
    /// takes the lowest free number), instead of the node's: Ganeti 3.1's
    /// instance-communication NICs are `gnt.com.%d`. A template, never a
    /// fixed name, so a TAP is always new (a fixed name could join
    /// another instance's multi-queue TAP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_template: Option<String>,
}

/// Why `template` is not a TAP name template: it must contain `%d` once
/// and make an interface name (at most 15 bytes once numbered; letters,
/// digits, `-`, `_`, `.`; not starting with `-` or `.`).
pub fn tap_template_problem(template: &str) -> Option<String> {
    let plain = template
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '%' | '-' | '_' | '.'));
    let bad = template.matches("%d").count() != 1
        || template.matches('%').count() != 1
        || template.len() > 13
        || !plain
        || template.starts_with(['-', '.']);
    bad.then(|| {
        format!(
            "{template:?} must contain %d once and make an interface name of at most 15 \
             bytes (letters, digits, '-', '_', '.'; not starting with '-' or '.')"
        )
    })
}

impl NicSpec {
    /// A NIC with this MAC, bridged to `link`.
    pub fn new(mac: MacAddr, link: impl Into<String>) -> NicSpec {
        NicSpec {
            mac,
            link: link.into(),
            ..NicSpec::default()
        }
    }
}

impl DiskSpec {
    /// A read-write disk at `path`.
    pub fn new(path: impl Into<PathBuf>) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            ..DiskSpec::default()
        }
    }

    /// A read-write disk QEMU opens itself at a storage URI (userspace
    /// access).
    pub fn from_uri(uri: impl Into<String>) -> DiskSpec {
        DiskSpec {
            uri: Some(uri.into()),
            ..DiskSpec::default()
        }
    }
}

/// Checks an instance name: what is safe in a file name and in `-name`
/// (ASCII letters, digits, `. _ - +`; no leading `-` or `.`; no `..`; at
/// most 128 bytes). The same rule as kvm-runtime's, kept here so this crate
/// stays usable alone.
pub fn validate_instance_name(name: &str) -> Result<(), Error> {
    name_problem(name).map_err(|reason| Error::Instance {
        instance: name.into(),
        field: "name".into(),
        reason,
    })
}

fn name_problem(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > 128 {
        return Err("name longer than 128 bytes".into());
    }
    if name.starts_with('-') || name.starts_with('.') {
        return Err("name starts with '-' or '.'".into());
    }
    if name.contains("..") {
        return Err("name contains '..'".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
    {
        return Err("name may only have ASCII letters, digits and . _ - +".into());
    }
    Ok(())
}

/// Checks a MAC address `aa:bb:cc:dd:ee:ff` for a NIC: well formed,
/// unicast and not all zeros.
pub fn validate_mac(mac: &str) -> Result<(), Error> {
    let parsed: MacAddr = mac.parse()?;
    mac_problem(&parsed).map_err(|reason| Error::InvalidValue {
        key: "mac".into(),
        value: mac.into(),
        reason,
    })
}

fn mac_problem(mac: &MacAddr) -> Result<(), String> {
    if mac.is_multicast() {
        return Err(format!(
            "{mac} is a multicast address (a NIC needs a unicast one)"
        ));
    }
    if mac.is_zero() {
        return Err("00:00:00:00:00:00 is not a usable MAC address".into());
    }
    Ok(())
}

impl InstanceSpec {
    /// A minimal instance: `memory` MiB, one vCPU, default hvparams.
    pub fn new(name: impl Into<String>, memory: u64) -> InstanceSpec {
        InstanceSpec {
            name: name.into(),
            uuid: None,
            memory,
            startup_memory: None,
            vcpus: 1,
            tags: Vec::new(),
            hvparams: HvParams::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            network_port: None,
            layout: None,
            pcie_slots: None,
            io_limits: std::collections::BTreeMap::new(),
        }
    }

    /// Checks the fields that do not depend on hvparams.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, reason: String| Error::Instance {
            instance: self.name.clone(),
            field: field.into(),
            reason,
        };
        name_problem(&self.name).map_err(|r| bad("name", r))?;
        if self.memory == 0 || self.memory > MAX_MEMORY_MIB {
            return Err(bad(
                "memory",
                format!(
                    "{} MiB is not between 1 MiB and {MAX_MEMORY_MIB} MiB",
                    self.memory
                ),
            ));
        }
        if self.nics.len() > MAX_NICS {
            return Err(bad(
                "nics",
                format!("{} NICs; at most {MAX_NICS} are allowed", self.nics.len()),
            ));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(bad(
                "disks",
                format!(
                    "{} disks; at most {MAX_DISKS} are allowed",
                    self.disks.len()
                ),
            ));
        }
        if let Some(s) = self.startup_memory {
            if s == 0 || s > self.memory {
                return Err(bad(
                    "startup_memory",
                    format!("{s} MiB is not between 1 and memory ({} MiB)", self.memory),
                ));
            }
        }
        if self.vcpus == 0 || self.vcpus > 1024 {
            return Err(bad(
                "vcpus",
                format!("{} is not between 1 and 1024", self.vcpus),
            ));
        }
        self.check_nics()?;
        self.check_addresses()?;
        self.check_io_limits()?;
        self.check_cgroup_limits()?;
        for t in &self.tags {
            if t.chars().any(char::is_control) {
                return Err(bad("tags", format!("{t:?} has control characters")));
            }
        }
        Ok(())
    }
}

impl InstanceSpec {
    /// Checks the cgroup limits: weights in the kernel's range, a memory
    /// limit the instance can run under.
    fn check_cgroup_limits(&self) -> Result<(), Error> {
        let hv = &self.hvparams;
        let bad = |key: &str, reason: String| Error::Syntax {
            key: key.into(),
            reason,
        };
        for (key, v) in [
            ("cgroup_cpu_weight", hv.cgroup_cpu_weight),
            ("cgroup_io_weight", hv.cgroup_io_weight),
        ] {
            if v > 10_000 {
                return Err(bad(
                    key,
                    format!("{v} is not between 1 and 10000 (0: the default)"),
                ));
            }
        }
        if hv.cgroup_cpu_quota > 100_000 {
            return Err(bad(
                "cgroup_cpu_quota",
                format!("{}% is more CPUs than a node has", hv.cgroup_cpu_quota),
            ));
        }
        let need = HvParams::min_cgroup_memory(self.memory);
        let max = u64::from(hv.cgroup_memory_max);
        if max > 0 && max < need {
            return Err(Error::Instance {
                instance: self.name.clone(),
                field: "hvparams.cgroup_memory_max".into(),
                reason: format!(
                    "{max} MiB is below what it needs: its {} MiB of guest memory and QEMU's \
                     own ({need} MiB in all)",
                    self.memory
                ),
            });
        }
        Ok(())
    }

    fn check_nics(&self) -> Result<(), Error> {
        let bad = |field: &str, reason: String| Error::Instance {
            instance: self.name.clone(),
            field: field.into(),
            reason,
        };
        for (i, nic) in self.nics.iter().enumerate() {
            mac_problem(&nic.mac).map_err(|r| bad(&format!("nics[{i}].mac"), r))?;
            if let Some(j) = self.nics[..i].iter().position(|o| o.mac == nic.mac) {
                return Err(bad(
                    &format!("nics[{i}].mac"),
                    format!("{} is already the MAC of NIC {j}", nic.mac),
                ));
            }
            if nic.mode == NicMode::Bridged && nic.link.is_empty() {
                return Err(bad(
                    &format!("nics[{i}].link"),
                    "a bridged NIC needs the bridge to attach to".into(),
                ));
            }
            for (what, v) in [("link", Some(nic.link.as_str())), ("ip", nic.ip.as_deref())] {
                if v.is_some_and(|v| v.chars().any(char::is_control) || v.starts_with('-')) {
                    return Err(bad(
                        &format!("nics[{i}].{what}"),
                        "has control characters or starts with '-'".into(),
                    ));
                }
            }
            check_nic_mode(nic).map_err(|(what, r)| bad(&format!("nics[{i}].{what}"), r))?;
        }
        Ok(())
    }
}

/// What a NIC's mode needs: an Open vSwitch NIC its switch, a routed NIC
/// its IP (the host routes to it), and a VLAN spec in Ganeti's syntax.
fn check_nic_mode(nic: &NicSpec) -> Result<(), (&'static str, String)> {
    if nic.mode == NicMode::Openvswitch && nic.link.is_empty() {
        return Err(("link", "an openvswitch NIC needs the switch to join".into()));
    }
    if nic.mode == NicMode::Routed {
        match nic.ip.as_deref() {
            None => return Err(("ip", "a routed NIC needs the guest's IP address".into())),
            Some(ip) if ip.parse::<std::net::IpAddr>().is_err() => {
                return Err(("ip", format!("{ip:?} is not an IP address")));
            }
            Some(_) => {}
        }
    }
    if let Some(problem) = nic.tap_template.as_deref().and_then(tap_template_problem) {
        return Err(("tap_template", problem));
    }
    if let Some(vlan) = &nic.vlan {
        if !is_vlan_spec(vlan) {
            return Err((
                "vlan",
                format!(
                    "{vlan:?}: expected .N (untagged), :N[:M...] (tagged) or .N:M..., N in 0..4095"
                ),
            ));
        }
    }
    Ok(())
}

/// Ganeti's VLAN syntax: an optional `.N` or `N` (untagged), then any
/// number of `:N` (tagged).
fn is_vlan_spec(vlan: &str) -> bool {
    let id = |s: &str| !s.is_empty() && s.len() <= 4 && s.parse::<u16>().is_ok_and(|n| n < 4096);
    let mut parts = vlan.split(':');
    let first = parts.next().unwrap_or("");
    let first_ok = first.is_empty() || id(first.strip_prefix('.').unwrap_or(first));
    let rest: Vec<&str> = parts.collect();
    !vlan.is_empty() && first_ok && rest.iter().all(|p| id(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_specs_as_ganeti_writes_them() {
        for ok in [".100", "100", ":100", ":100:200", ".1:2:3", "0"] {
            assert!(is_vlan_spec(ok), "{ok}");
        }
        for bad in ["", ".", ":", "a", ".4096", "1::2", ".1:x", "-1"] {
            assert!(!is_vlan_spec(bad), "{bad}");
        }
    }

    fn nic(mac: &str, link: &str) -> NicSpec {
        NicSpec::new(mac.parse().unwrap(), link)
    }

    fn field_of(spec: &InstanceSpec) -> String {
        match spec.validate() {
            Err(Error::Instance { field, .. }) => field,
            other => panic!("expected an instance error, got {other:?}"),
        }
    }

    #[test]
    fn bounds_macs_and_links() {
        let mut s = InstanceSpec::new("b1", 0);
        assert_eq!(field_of(&s), "memory");
        s.memory = MAX_MEMORY_MIB + 1;
        assert_eq!(field_of(&s), "memory");
        s.memory = 128;
        s.validate().unwrap();

        s.nics = (0..=MAX_NICS)
            .map(|i| nic(&format!("52:54:00:00:00:{i:02x}"), "br0"))
            .collect();
        assert_eq!(field_of(&s), "nics");
        s.nics.truncate(MAX_NICS);
        s.validate().unwrap();

        for bad in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            s.nics = vec![nic(bad, "br0")];
            assert_eq!(field_of(&s), "nics[0].mac", "{bad}");
        }
        s.nics = vec![
            nic("52:54:00:00:00:01", "br0"),
            nic("52:54:00:00:00:01", "br0"),
        ];
        assert_eq!(field_of(&s), "nics[1].mac");
        s.nics = vec![nic("52:54:00:00:00:01", "")];
        assert_eq!(field_of(&s), "nics[0].link");
        s.nics.clear();

        s.disks = (0..=MAX_DISKS)
            .map(|i| DiskSpec::new(format!("/dev/vg/d{i}")))
            .collect();
        assert_eq!(field_of(&s), "disks");
    }
}
