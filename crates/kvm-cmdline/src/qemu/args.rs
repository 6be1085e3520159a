//! The argv under construction, and the whole-machine options.

use super::pieces::{Blockdev, Chardev, Device, Drive, Netdev, Object};
use super::props::{keyval_with_head, Props, Syntax, Value};
use crate::Error;

/// A QEMU argv being built: `argv[0]` is the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args(Vec<String>);

impl Args {
    /// An argv that runs `binary`.
    pub fn new(binary: impl Into<String>) -> Args {
        Args(vec![binary.into()])
    }

    /// Continues an argv built earlier.
    pub fn from_vec(argv: Vec<String>) -> Args {
        Args(argv)
    }

    /// A bare option (`-S`, `-no-reboot`).
    pub fn flag(&mut self, option: &str) {
        self.0.push(option.to_owned());
    }

    /// An option and its argument, taken as it is.
    pub fn opt(&mut self, option: &str, value: impl Into<String>) {
        self.0.push(option.to_owned());
        self.0.push(value.into());
    }

    /// An option whose argument is `head,key=value,...` (`-machine`,
    /// `-spice`, `-vnc`, `-audio`).
    pub fn keyval(&mut self, option: &str, head: &str, props: &Props) -> Result<(), Error> {
        let arg = if head.is_empty() {
            props.to_keyval()?
        } else {
            keyval_with_head(head, props)?
        };
        self.opt(option, arg);
        Ok(())
    }

    /// `-device`.
    pub fn device(&mut self, device: &Device, syntax: Syntax) -> Result<(), Error> {
        let arg = device.to_arg(syntax)?;
        self.opt("-device", arg);
        Ok(())
    }

    /// `-netdev`.
    pub fn netdev(&mut self, netdev: &Netdev, syntax: Syntax) -> Result<(), Error> {
        let arg = netdev.to_arg(syntax)?;
        self.opt("-netdev", arg);
        Ok(())
    }

    /// `-object`.
    pub fn object(&mut self, object: &Object, syntax: Syntax) -> Result<(), Error> {
        let arg = object.to_arg(syntax)?;
        self.opt("-object", arg);
        Ok(())
    }

    /// `-chardev` (always `key=value`: QEMU takes no JSON here).
    pub fn chardev(&mut self, chardev: &Chardev) -> Result<(), Error> {
        let arg = chardev.to_arg(Syntax::KeyValue)?;
        self.opt("-chardev", arg);
        Ok(())
    }

    /// `-blockdev`.
    pub fn blockdev(&mut self, node: &Blockdev, syntax: Syntax) -> Result<(), Error> {
        let arg = node.to_arg(syntax)?;
        self.opt("-blockdev", arg);
        Ok(())
    }

    /// `-drive`.
    pub fn drive(&mut self, drive: &Drive) -> Result<(), Error> {
        let arg = drive.to_arg()?;
        self.opt("-drive", arg);
        Ok(())
    }

    /// `-machine` (see [`Machine`]).
    pub fn machine(&mut self, machine: &Machine) -> Result<(), Error> {
        self.keyval("-machine", &machine.kind, &machine.props)
    }

    /// `-smp` (see [`Smp`]).
    pub fn smp(&mut self, smp: &Smp) {
        let mut arg = smp.cpus.to_string();
        for (k, v) in [
            ("cores", smp.cores),
            ("threads", smp.threads),
            ("sockets", smp.sockets),
        ] {
            if let Some(v) = v {
                arg.push_str(&format!(",{k}={v}"));
            }
        }
        self.opt("-smp", arg);
    }

    /// `-m` in MiB.
    pub fn memory_mib(&mut self, mib: u64) {
        self.opt("-m", mib.to_string());
    }

    /// The argv so far.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// The argv.
    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// The machine: its type and properties (`accel=kvm`, `acpi=off`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The machine type (`pc-i440fx-10.0`, `q35`).
    pub kind: String,
    /// Its properties, in order.
    pub props: Props,
}

impl Machine {
    /// A machine of this type.
    pub fn new(kind: impl Into<String>) -> Machine {
        Machine {
            kind: kind.into(),
            props: Props::new(),
        }
    }

    /// With a property set.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Machine {
        self.props.set(key, value);
        self
    }
}

/// The vCPU topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smp {
    /// vCPUs at start.
    pub cpus: u32,
    /// Cores per socket, if given.
    pub cores: Option<u32>,
    /// Threads per core, if given.
    pub threads: Option<u32>,
    /// Sockets, if given.
    pub sockets: Option<u32>,
}

impl Smp {
    /// `cpus` vCPUs, topology left to QEMU.
    pub fn new(cpus: u32) -> Smp {
        Smp {
            cpus,
            cores: None,
            threads: None,
            sockets: None,
        }
    }
}
