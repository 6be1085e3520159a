//! The crate's one error type.

/// Why parameters, capabilities or an argv could not be produced. Every
/// variant names the hvparam, field or input concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hypervisor parameter that does not exist.
    #[error("unknown hypervisor parameter {key:?}")]
    UnknownParameter {
        /// The key given.
        key: String,
    },
    /// A value that does not parse for its parameter.
    #[error("invalid value {value:?} for hypervisor parameter {key}: {reason}")]
    InvalidValue {
        /// The parameter.
        key: String,
        /// The value given.
        value: String,
        /// What is expected.
        reason: String,
    },
    /// Parameters that are individually valid but do not fit together (the
    /// Ganeti's `CheckParameterSyntax`).
    #[error("hypervisor parameter {key}: {reason}")]
    Syntax {
        /// The parameter at fault.
        key: String,
        /// Why.
        reason: String,
    },
    /// A host fact contradicts the parameters (Ganeti's `ValidateParameters`).
    #[error("hypervisor parameter {key}: {reason}")]
    Host {
        /// The parameter at fault.
        key: String,
        /// Why.
        reason: String,
    },
    /// The QEMU binary lacks what a parameter asks for.
    #[error("hypervisor parameter {key}: QEMU {version} does not support {what}")]
    Unsupported {
        /// The parameter (or instance field) asking for it.
        key: String,
        /// What is missing.
        what: String,
        /// The QEMU version.
        version: String,
    },
    /// A value cannot be written safely into QEMU's option syntax.
    #[error("{field}: value {value:?} cannot be passed to QEMU: {reason}")]
    Unexpressible {
        /// The parameter or field.
        field: String,
        /// The value (control characters escaped by `Debug`).
        value: String,
        /// Why.
        reason: String,
    },
    /// The instance definition is wrong.
    #[error("instance {instance}: {field}: {reason}")]
    Instance {
        /// The instance name as given.
        instance: String,
        /// The field at fault.
        field: String,
        /// Why.
        reason: String,
    },
    /// QEMU's `--help`, `-machine ?` or `-device ?` text, or its QMP
    /// answers, could not be understood.
    #[error("cannot parse QEMU {source_name}: {reason}")]
    Capabilities {
        /// Which input (`--help`, `-machine ?`, `query-version`, ...).
        source_name: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The hypervisor parameter (or field) at fault, when the error is
    /// about one: what a caller matches on instead of the message.
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::UnknownParameter { key }
            | Error::InvalidValue { key, .. }
            | Error::Syntax { key, .. }
            | Error::Host { key, .. }
            | Error::Unsupported { key, .. } => Some(key),
            Error::Unexpressible { field, .. } => Some(field),
            Error::Instance { .. } | Error::Capabilities { .. } => None,
        }
    }
}
