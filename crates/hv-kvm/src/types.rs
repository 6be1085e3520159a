//! What the facade answers (serde types: the JSON cluster software reads).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A running instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InstanceInfo {
    /// Its name.
    pub name: String,
    /// QEMU's pid.
    pub pid: i32,
    /// QMP's run state (`running`, `paused`, `internal-error`, ...), or
    /// `unknown` when QMP did not answer in time.
    pub state: String,
    /// Guest memory in MiB (the balloon's actual size when known).
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// CPU time QEMU has used, in seconds.
    pub cpu_time_secs: f64,
}

/// The node's resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeInfo {
    /// Total memory in MiB.
    pub memory_total_mib: u64,
    /// Memory available for instances in MiB.
    pub memory_free_mib: u64,
    /// Memory used by the node itself (total - free - instances) in MiB.
    pub memory_dom0_mib: u64,
    /// Online CPUs.
    pub cpu_total: u32,
    /// Physical sockets.
    pub cpu_sockets: u32,
    /// NUMA nodes.
    pub cpu_nodes: u32,
    /// QEMU version (major, minor, micro) of the default binary.
    pub hv_version: Option<(u32, u32, u32)>,
}

/// How to reach an instance's console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[non_exhaustive]
pub enum ConsoleInfo {
    /// The serial console on a Unix socket.
    Serial {
        /// The instance.
        instance: String,
        /// The socket.
        socket: PathBuf,
        /// A command that attaches a terminal to it.
        command: Vec<String>,
    },
    /// VNC.
    Vnc {
        /// The instance.
        instance: String,
        /// Address (or Unix socket directory).
        host: String,
        /// TCP port.
        port: u16,
        /// VNC display (port - 5900).
        display: u16,
    },
    /// SPICE.
    Spice {
        /// The instance.
        instance: String,
        /// Address or interface.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// No console.
    Message {
        /// The instance.
        instance: String,
        /// Why not.
        message: String,
    },
}

/// Problems `verify` found; empty means healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// One line per problem.
    pub problems: Vec<String>,
}

/// What a successful start did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StartReport {
    /// The instance.
    pub name: String,
    /// QEMU's pid.
    pub pid: i32,
    /// The TAP interface of each NIC.
    pub taps: Vec<String>,
    /// The concrete machine type.
    pub machine: String,
    /// Whether it was left paused.
    pub paused: bool,
}
