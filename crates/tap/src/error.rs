//! The crate's one error type.

/// What went wrong with a TAP interface; every variant names the interface,
/// bridge or device it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TUN/TAP character device does not exist.
    #[error("{path} is missing: the kernel has no TUN/TAP driver (try `modprobe tun`)")]
    TunMissing {
        /// The device path that was opened.
        path: String,
    },
    /// The caller lacks `CAP_NET_ADMIN` or access to the TUN device.
    #[error(
        "permission denied for {name}: creating and configuring TAP interfaces needs CAP_NET_ADMIN"
    )]
    PermissionDenied {
        /// The interface or device concerned.
        name: String,
    },
    /// The name cannot be an interface name; checked before any kernel call.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Another interface already has this name.
    #[error("interface name {name} is already in use")]
    NameInUse {
        /// The name asked for.
        name: String,
    },
    /// No interface of this name exists.
    #[error("interface {name} not found")]
    InterfaceNotFound {
        /// The name looked up.
        name: String,
    },
    /// The bridge to attach to does not exist.
    #[error("bridge {bridge} not found (attaching {name})")]
    BridgeNotFound {
        /// The bridge asked for.
        bridge: String,
        /// The interface being attached or detached.
        name: String,
    },
    /// The named bridge is an interface but not a bridge.
    #[error("{bridge} is not a bridge (attaching {name})")]
    NotABridge {
        /// The interface that is not a bridge.
        bridge: String,
        /// The interface being attached or detached.
        name: String,
    },
    /// vnet_hdr was required but the TUN driver does not offer it.
    #[error("vnet_hdr required for {name} but the TUN driver lacks IFF_VNET_HDR")]
    VnetHdrUnsupported {
        /// The interface being created.
        name: String,
    },
    /// Several queues were asked for but the TUN driver lacks multiqueue.
    #[error("multiqueue requested for {name} but the TUN driver lacks IFF_MULTI_QUEUE")]
    MultiqueueUnsupported {
        /// The interface being created.
        name: String,
    },
    /// Any other system call failure.
    #[error("{op} failed for {name}")]
    Io {
        /// The operation (ioctl or call) that failed.
        op: &'static str,
        /// The interface or device concerned.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The message and its cause, for one line of output:
    /// `Display` shows this error alone and [`std::error::Error::source`]
    /// gives the cause, so this joins them.
    pub fn report(&self) -> String {
        match std::error::Error::source(self) {
            Some(cause) => format!("{self}: {cause}"),
            None => self.to_string(),
        }
    }
}
