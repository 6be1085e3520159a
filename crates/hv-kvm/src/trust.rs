//! Trusting a migration info file.
//!
//! The destination starts QEMU as root from what the file says, so the
//! file must not be able to choose what runs: node-local hvparams (the
//! QEMU binary, extra arguments, password and certificate files, chroot
//! and security settings) come from the destination's own configuration,
//! and a file whose values differ is refused, naming the key. When the
//! nodes share a migration key, the file is sealed with HMAC-SHA256 on the
//! source and checked on the destination, so it cannot be edited on the
//! way (Ganeti signs its RPC payloads with the cluster's HMAC key the same
//! way).

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::InstanceSpec;

/// Largest migration info accepted (a runtime record is a few KiB).
pub const MAX_MIGRATION_INFO: usize = 1 << 20;

/// Hvparams a migration info file may not choose: each is compared with
/// the destination's own value.
pub const NODE_LOCAL_HVPARAMS: &[&str] = &[
    "kvm_path",
    "kvm_extra",
    "vnc_password_file",
    "spice_password_file",
    "vnc_x509_path",
    "use_chroot",
    "security_model",
    "security_domain",
    "mem_path",
];

const ENVELOPE: &str = "gkvm_migration_info";

fn mac(key: &[u8], body: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(body.as_bytes());
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Wraps `body` with its HMAC under `key`.
pub fn seal(key: &[u8], body: &str) -> String {
    let tag = hex(&mac(key, body).finalize().into_bytes());
    serde_json::json!({ ENVELOPE: 1, "runtime": body, "hmac_sha256": tag }).to_string()
}

/// The key of gkvm's own info inside a migration info file in Ganeti's
/// format (the fifth element of its runtime list; Ganeti's driver reads
/// the first four).
pub(crate) const EMBEDDED: &str = "gkvm_migration_info";

/// The body of a migration info file, after checking its seal when this
/// node has a `key` (then an unsealed file is refused too). A file in
/// Ganeti's format that carries gkvm's own info (see
/// [`crate::KvmHypervisor::migration_info_for_ganeti`]) gives that info.
pub fn unseal(key: Option<&[u8]>, info: &str) -> Result<String> {
    let body = unseal_envelope(key, info)?;
    let embedded = serde_json::from_str::<Value>(&body).ok().and_then(|v| {
        let inner = v.as_array()?.get(4)?.get(EMBEDDED)?;
        inner.is_object().then(|| inner.to_string())
    });
    Ok(embedded.unwrap_or(body))
}

fn unseal_envelope(key: Option<&[u8]>, info: &str) -> Result<String> {
    let bad = |reason: String| Error::MigrationInfo {
        instance: "(unknown)".into(),
        reason,
    };
    if info.len() > MAX_MIGRATION_INFO {
        return Err(bad(format!(
            "{} bytes; at most {MAX_MIGRATION_INFO} are accepted",
            info.len()
        )));
    }
    let envelope = serde_json::from_str::<Value>(info)
        .ok()
        .filter(|v| v.get(ENVELOPE).is_some());
    let Some(envelope) = envelope else {
        return match key {
            Some(_) => Err(bad(
                "not sealed, but this node has a migration key and accepts only sealed files"
                    .into(),
            )),
            None => Ok(info.to_owned()),
        };
    };
    if envelope.get(ENVELOPE).and_then(Value::as_u64) != Some(1) {
        return Err(bad(format!(
            "unknown {ENVELOPE} version {}",
            envelope[ENVELOPE]
        )));
    }
    let body = envelope
        .get("runtime")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("sealed file without a runtime".into()))?;
    let Some(key) = key else {
        tracing::warn!("migration info is sealed but this node has no migration key to check it");
        return Ok(body.to_owned());
    };
    let tag = envelope
        .get("hmac_sha256")
        .and_then(Value::as_str)
        .and_then(unhex)
        .ok_or_else(|| bad("sealed file without a valid hmac_sha256".into()))?;
    mac(key, body).verify_slice(&tag).map_err(|_| {
        bad("integrity check failed: the file was changed after it was sealed, or sealed with another key".into())
    })?;
    Ok(body.to_owned())
}

/// Refuses a spec whose node-local hvparams differ from this node's.
/// `kvm_path` is not compared when the node overrides it for every
/// instance (`node_overrides_kvm_path`): the file's value is then unused.
pub fn check_node_local(
    spec: &InstanceSpec,
    node: &kvm_cmdline::HvParams,
    node_overrides_kvm_path: bool,
) -> Result<()> {
    let theirs = spec.hvparams.to_map();
    let ours = node.to_map();
    for key in NODE_LOCAL_HVPARAMS {
        if *key == "kvm_path" && node_overrides_kvm_path {
            continue;
        }
        let (t, o) = (theirs.get(*key), ours.get(*key));
        if t != o {
            return Err(Error::MigrationInfo {
                instance: spec.name.clone(),
                reason: format!(
                    "hvparam {key} is {} in the file but {} on this node; node-local settings come from the destination (set it on this node to accept it)",
                    show(t),
                    show(o)
                ),
            });
        }
    }
    Ok(())
}

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "unset".into(),
        Some(v) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gkvms_info_inside_ganetis_runtime_list_is_what_gkvm_reads() {
        let inner = r#"{"gkvm_runtime":1,"argv":["qemu"],"payload":{"accel":"tcg"}}"#;
        let list = format!(r#"[["qemu","-m","64"],[],{{}},[],{{"{EMBEDDED}":{inner}}}]"#);
        let body: Value = serde_json::from_str(&unseal(None, &list).unwrap()).unwrap();
        assert_eq!(body, serde_json::from_str::<Value>(inner).unwrap());
        // A plain Ganeti runtime stays as it is; a keyed node takes neither.
        let plain = r#"[["qemu"],[],{},[]]"#;
        assert_eq!(unseal(None, plain).unwrap(), plain);
        assert!(unseal(Some(b"key"), &list).is_err());
    }

    #[test]
    fn seal_round_trip_and_tampering() {
        let key = b"shared secret";
        let sealed = seal(key, r#"{"a":1}"#);
        assert_eq!(unseal(Some(key), &sealed).unwrap(), r#"{"a":1}"#);
        assert!(unseal(Some(b"other key"), &sealed).is_err());
        let edited = sealed.replace(r#"{\"a\":1}"#, r#"{\"a\":2}"#);
        assert_ne!(edited, sealed);
        let e = unseal(Some(key), &edited).unwrap_err().to_string();
        assert!(e.contains("integrity check failed"), "{e}");
        assert!(unseal(Some(key), r#"{"a":1}"#).is_err());
        assert_eq!(unseal(None, r#"{"a":1}"#).unwrap(), r#"{"a":1}"#);
        assert!(unseal(None, &"x".repeat(MAX_MIGRATION_INFO + 1)).is_err());
    }

    #[test]
    fn node_local_values_must_match() {
        let mut spec = InstanceSpec::new("n1", 128);
        let node = kvm_cmdline::HvParams::default();
        check_node_local(&spec, &node, false).unwrap();
        spec.hvparams
            .set_pair("kvm_extra=-qmp tcp:0.0.0.0:4444,server")
            .unwrap();
        let e = check_node_local(&spec, &node, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hvparam kvm_extra"), "{e}");
        let mut spec = InstanceSpec::new("n1", 128);
        spec.hvparams.kvm_path = "/tmp/evil".into();
        assert!(check_node_local(&spec, &node, false).is_err());
        check_node_local(&spec, &node, true).unwrap();
    }
}
