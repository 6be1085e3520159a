//! The generic QEMU layer: typed pieces of a QEMU command line that know
//! QEMU versions and syntax, and nothing of Ganeti.
//!
//! A piece is data — a driver or type, an id, ordered properties — that
//! renders two ways from one value:
//!
//! - as a command-line argument, in QEMU's `key=value` syntax (commas
//!   doubled, control characters refused) or as JSON where the binary
//!   accepts it ([`Syntax::for_caps`]);
//! - as the arguments of the matching QMP command (`device_add`,
//!   `netdev_add`, `blockdev-add`, `object-add`, `chardev-add`), so cold
//!   plug and hot plug share one description.
//!
//! [`Args`] collects the pieces into an argv; the Ganeti layer of this
//! crate ([`crate::build`]) maps an instance and its hvparams onto it.
//! Tools that are not Ganeti use this module alone:
//!
//! ```
//! use kvm_cmdline::qemu::{Args, Blockdev, Device, Netdev, Syntax};
//!
//! let mut args = Args::new("qemu-system-x86_64");
//! let net = Netdev::new("tap", "net0").with("fds", "10:11").with("vhost", false);
//! let nic = Device::new("virtio-net-pci")
//!     .with("id", "nic0")
//!     .with("netdev", "net0")
//!     .with("mac", "52:54:00:12:34:56")
//!     .with("mq", true)
//!     .with("vectors", 6);
//! args.netdev(&net, Syntax::KeyValue).unwrap();
//! args.device(&nic, Syntax::KeyValue).unwrap();
//! assert_eq!(
//!     args.as_slice()[1..],
//!     ["-netdev", "tap,id=net0,fds=10:11,vhost=off",
//!      "-device", "virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:12:34:56,mq=on,vectors=6"]
//! );
//! // The same NIC, hot-plugged: the QMP arguments of device_add.
//! assert_eq!(nic.qmp_arguments()["vectors"], 6);
//! let disk = Blockdev::raw_file("disk0", "/dev/vg/disk0").with("read-only", true);
//! assert_eq!(
//!     disk.to_arg(Syntax::KeyValue).unwrap(),
//!     "driver=raw,node-name=disk0,file.driver=host_device,file.filename=/dev/vg/disk0,read-only=on"
//! );
//! ```

mod args;
mod pieces;
mod props;
mod uri;

pub use args::{Args, Machine, Smp};
pub use pieces::{Blockdev, Chardev, Device, Drive, Netdev, Object};
pub use props::{Props, Syntax, Value};
pub use uri::{is_storage_uri, storage_node};
