//! Stable device ids and PCI slots for NICs and disks (Ganeti 3.1's
//! hot-plug model: `kvm_pci_reservations` slots are left to QEMU's own
//! devices, NICs and disks take explicit slots above them).

use std::collections::BTreeSet;

use crate::hvparams::{DiskType, NicType};
use crate::instance::{DeviceAddress, PCIE_SLOTS, PCI_SLOTS};
use crate::{Capabilities, Error, InstanceSpec, Layout, PcieSlots, Uuid};

/// Whether a QEMU id is acceptable: a letter, then letters, digits,
/// `-`, `.` or `_` (QEMU's `id_wellformed`), at most 128 bytes.
pub fn is_valid_device_id(id: &str) -> bool {
    id.len() <= 128
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The longest id a device gets: a disk's id is also its block node's
/// name, which QEMU keeps in 31 bytes.
const MAX_DERIVED_ID: usize = 31;

/// A device's id from the cluster's UUID (up to its third `-`, exactly as
/// Ganeti 3.1 names devices: `disk-932df160-7a22-4067`) or name, when
/// they make one.
fn derived_id(kind: &str, uuid: Option<&Uuid>, name: Option<&str>) -> Option<String> {
    let uuid = uuid.and_then(|u| u.as_str().rsplitn(3, '-').last());
    [uuid, name]
        .into_iter()
        .flatten()
        .map(|s| format!("{kind}-{s}"))
        .find(|id| id.len() <= MAX_DERIVED_ID && is_valid_device_id(id))
}

/// Whether NICs of this model sit on the PCI bus.
pub(crate) fn nic_on_pci(nic_type: NicType) -> bool {
    nic_type != NicType::Ne2kIsa
}

/// Whether disks of this type are PCI devices themselves.
pub(crate) fn disk_on_pci(disk_type: DiskType) -> bool {
    disk_type == DiskType::Paravirtual
}

struct Allocator {
    ids: BTreeSet<String>,
    slots: BTreeSet<u8>,
    first_free: u8,
    end: u8,
}

impl Allocator {
    fn id(&mut self, kind: &str, uuid: Option<&Uuid>, name: Option<&str>) -> String {
        let id = derived_id(kind, uuid, name)
            .filter(|id| !self.ids.contains(id))
            .unwrap_or_else(|| {
                (0..)
                    .map(|n| format!("{kind}{n}"))
                    .find(|id| !self.ids.contains(id))
                    .unwrap_or_default()
            });
        self.ids.insert(id.clone());
        id
    }

    fn slot(&mut self, field: &str, instance: &str) -> Result<u8, Error> {
        let slot = (self.first_free..self.end)
            .find(|s| !self.slots.contains(s))
            .ok_or_else(|| Error::Instance {
                instance: instance.into(),
                field: field.into(),
                reason: format!(
                    "no free PCI slot: slots {}..{} are taken (kvm_pci_reservations keeps the first {} for QEMU)",
                    self.first_free,
                    self.end - 1,
                    self.first_free
                ),
            })?;
        self.slots.insert(slot);
        Ok(slot)
    }
}

impl InstanceSpec {
    /// Shapes a definition for a new start on the QEMU of `caps`, as
    /// hv-kvm starts every instance: a lean machine
    /// ([`Layout::Lean`]), root ports for NICs and disks on a q35 machine
    /// ([`PcieSlots::RootPorts`]), and every NIC and disk placed
    /// ([`Self::assign_addresses`]). What is already chosen is kept.
    pub fn shape_new(&mut self, caps: &Capabilities) -> Result<(), Error> {
        self.layout.get_or_insert(Layout::Lean);
        let q35 = caps
            .resolve_machine(&self.hvparams.machine_version)
            .is_ok_and(|m| m.contains("q35"));
        if q35 && self.pcie_slots.is_none() {
            self.pcie_slots = Some(PcieSlots::RootPorts);
        }
        self.assign_addresses()
    }

    /// One past the last slot a NIC or disk may take: a q35 machine with
    /// root ports keeps its last slot for its chipset.
    pub(crate) fn slot_end(&self) -> u8 {
        if self.pcie_slots == Some(PcieSlots::RootPorts) {
            PCIE_SLOTS
        } else {
            PCI_SLOTS
        }
    }

    /// Whether its NICs and disks were placed by a release without device
    /// addresses (none has one): such an instance keeps positional ids
    /// (`netdevN`, `diskN`) and the PCI slots QEMU chose, so that a
    /// migration from it lands on identical hardware.
    pub fn is_legacy_placement(&self) -> bool {
        self.nics.iter().all(|n| n.address.is_none())
            && self.disks.iter().all(|d| d.address.is_none())
    }

    /// Gives every NIC and disk that has no address one: an id from its
    /// UUID or name (`nic-<uuid>`, `disk-<name>`) or else the first free
    /// `nicN`/`diskN`, and, for a device on the PCI bus, the lowest free
    /// slot at or above `kvm_pci_reservations` (disks first, then NICs).
    /// Addresses already given are kept.
    pub fn assign_addresses(&mut self) -> Result<(), Error> {
        let reserved = u8::try_from(self.hvparams.kvm_pci_reservations).unwrap_or(PCI_SLOTS);
        let placed = self
            .disks
            .iter()
            .filter_map(|d| d.address.as_ref())
            .chain(self.nics.iter().filter_map(|n| n.address.as_ref()));
        let mut alloc = Allocator {
            ids: placed.clone().map(|a| a.id.clone()).collect(),
            slots: placed.filter_map(|a| a.pci_slot).collect(),
            first_free: reserved,
            end: self.slot_end(),
        };
        let disk_pci = disk_on_pci(self.hvparams.disk_type);
        for (i, disk) in self.disks.iter_mut().enumerate() {
            if disk.address.is_none() {
                let id = alloc.id("disk", disk.uuid.as_ref(), disk.name.as_deref());
                let pci_slot = if disk_pci {
                    Some(alloc.slot(&format!("disks[{i}]"), &self.name)?)
                } else {
                    None
                };
                disk.address = Some(DeviceAddress { id, pci_slot });
            }
        }
        let nic_pci = nic_on_pci(self.hvparams.nic_type);
        for (i, nic) in self.nics.iter_mut().enumerate() {
            if nic.address.is_none() {
                let id = alloc.id("nic", nic.uuid.as_ref(), nic.name.as_deref());
                let pci_slot = if nic_pci {
                    Some(alloc.slot(&format!("nics[{i}]"), &self.name)?)
                } else {
                    None
                };
                nic.address = Some(DeviceAddress { id, pci_slot });
            }
        }
        Ok(())
    }

    /// Checks the device addresses: all devices placed or none, ids valid
    /// and distinct, slots distinct, on the bus, and not reserved.
    pub(crate) fn check_addresses(&self) -> Result<(), Error> {
        let bad = |field: String, reason: String| Error::Instance {
            instance: self.name.clone(),
            field,
            reason,
        };
        if self.is_legacy_placement() {
            return Ok(());
        }
        let reserved = self.hvparams.kvm_pci_reservations;
        let devices = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("disks[{i}].address"), d.address.as_ref()))
            .chain(
                self.nics
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("nics[{i}].address"), n.address.as_ref())),
            );
        let (mut ids, mut slots) = (BTreeSet::new(), BTreeSet::new());
        for (field, address) in devices {
            let Some(a) = address else {
                return Err(bad(
                    field,
                    "missing while other devices have one (all NICs and disks are placed, or none)"
                        .into(),
                ));
            };
            if !is_valid_device_id(&a.id) {
                return Err(bad(
                    field,
                    format!(
                        "{:?} is not a QEMU device id (a letter, then letters, digits, - . _)",
                        a.id
                    ),
                ));
            }
            if !ids.insert(a.id.as_str()) {
                return Err(bad(field, format!("id {:?} is used twice", a.id)));
            }
            if let Some(slot) = a.pci_slot {
                if slot >= self.slot_end() || u32::from(slot) < reserved {
                    return Err(bad(field, format!("PCI slot {slot} is not between kvm_pci_reservations ({reserved}) and {}", self.slot_end() - 1)));
                }
                if !slots.insert(slot) {
                    return Err(bad(field, format!("PCI slot {slot} is used twice")));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskSpec, NicSpec};

    #[test]
    fn ids_from_uuid_or_name_else_generated_and_slots_above_reservations() {
        let mut s = InstanceSpec::new("p1", 128);
        s.disks = vec![DiskSpec::new("/dev/vg/a"), DiskSpec::new("/dev/vg/b")];
        s.disks[1].name = Some("data".into());
        s.nics = vec![NicSpec::new("52:54:00:00:00:01".parse().unwrap(), "br0")];
        s.nics[0].uuid = Some("2b1c9b3e-5d0e-4a39-9d5b-0c9e8ab1e2f4".parse().unwrap());
        assert!(s.is_legacy_placement());
        s.assign_addresses().unwrap();
        let a = |d: &Option<DeviceAddress>| d.clone().unwrap();
        assert_eq!(a(&s.disks[0].address).id, "disk0");
        assert_eq!(a(&s.disks[0].address).pci_slot, Some(12));
        assert_eq!(a(&s.disks[1].address).id, "disk-data");
        assert_eq!(a(&s.disks[1].address).pci_slot, Some(13));
        assert_eq!(a(&s.nics[0].address).id, "nic-2b1c9b3e-5d0e-4a39");
        assert_eq!(a(&s.nics[0].address).pci_slot, Some(14));
        s.check_addresses().unwrap();

        // Unplugging disk 0 and adding a NIC renumbers nothing.
        s.disks.remove(0);
        s.nics
            .push(NicSpec::new("52:54:00:00:00:02".parse().unwrap(), "br0"));
        s.assign_addresses().unwrap();
        assert_eq!(a(&s.disks[0].address).pci_slot, Some(13));
        assert_eq!(a(&s.nics[1].address).id, "nic0");
        assert_eq!(a(&s.nics[1].address).pci_slot, Some(12));
    }

    #[test]
    fn slots_run_out_with_an_error_naming_the_device() {
        let mut s = InstanceSpec::new("p2", 128);
        s.hvparams.kvm_pci_reservations = 30;
        s.disks = (0..3).map(|i| DiskSpec::new(format!("/d{i}"))).collect();
        match s.assign_addresses() {
            Err(Error::Instance { field, .. }) => assert_eq!(field, "disks[2]"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_q35_machine_with_root_ports_keeps_slot_31_for_its_chipset() {
        let mut s = InstanceSpec::new("p4", 128);
        s.hvparams.kvm_pci_reservations = 29;
        s.pcie_slots = Some(PcieSlots::RootPorts);
        s.disks = (0..3).map(|i| DiskSpec::new(format!("/d{i}"))).collect();
        let err = s.assign_addresses().unwrap_err().to_string();
        assert!(err.contains("disks[2]") && err.contains("29..30"), "{err}");
        // Without root ports (an earlier release's q35, or i440fx) slot 31
        // is a device's.
        s.pcie_slots = None;
        s.assign_addresses().unwrap();
        assert_eq!(s.disks[2].address.as_ref().unwrap().pci_slot, Some(31));
        s.pcie_slots = Some(PcieSlots::RootPorts);
        assert!(s.check_addresses().is_err(), "slot 31 behind a root port");
    }

    #[test]
    fn bad_addresses_are_refused() {
        let mut s = InstanceSpec::new("p3", 128);
        s.disks = vec![DiskSpec::new("/a"), DiskSpec::new("/b")];
        s.assign_addresses().unwrap();
        let mut t = s.clone();
        t.disks[1].address = None;
        assert!(t.check_addresses().is_err(), "mixed placement");
        let mut t = s.clone();
        t.disks[1].address.as_mut().unwrap().pci_slot = Some(12);
        assert!(t.check_addresses().is_err(), "slot twice");
        let mut t = s.clone();
        t.disks[1].address.as_mut().unwrap().pci_slot = Some(3);
        assert!(t.check_addresses().is_err(), "reserved slot");
        let mut t = s.clone();
        t.disks[1].address.as_mut().unwrap().id = "0bad,id".into();
        assert!(t.check_addresses().is_err(), "bad id");
        let mut t = s;
        t.disks[1].address.as_mut().unwrap().id = "disk0".into();
        assert!(t.check_addresses().is_err(), "id twice");
    }
}
