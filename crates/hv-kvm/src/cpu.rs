//! The guest's CPU as QEMU built it — its CPUID feature words — so that a
//! live migration goes only where the destination gives the guest every
//! feature it already has: `cpu_type=host` between nodes whose CPUs
//! differ, or a named model whose features one node's CPU lacks (QEMU
//! drops those with a warning), would otherwise take features away from
//! a running guest.

use gkvm_qmp::{commands, Qmp};
use serde::{Deserialize, Serialize};

/// The migration info's record of the source guest's CPUID feature words.
pub(crate) const CPU_FEATURES_KEY: &str = "cpu_features";

/// One CPUID register's feature bits, as QOM's `feature-words` of an x86
/// CPU lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct FeatureWord {
    cpuid_input_eax: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpuid_input_ecx: Option<u64>,
    cpuid_register: String,
    features: u64,
}

/// The feature words of the guest's first vCPU (all vCPUs share one
/// model), or `None` where QEMU does not say (not x86, or too old).
pub(crate) async fn feature_words(qmp: &Qmp) -> Option<Vec<FeatureWord>> {
    let cpus = qmp.run(&commands::QueryCpusFast).await.ok()?;
    let path = cpus.first()?.qom_path.clone();
    let words = qmp
        .run(&commands::QomGet {
            path,
            property: "feature-words".into(),
        })
        .await
        .ok()?;
    serde_json::from_value(words).ok()
}

/// The source guest's feature bits that `here` lacks, one line per CPUID
/// register (`CPUID 0x7.0 EBX 0x00000400`); empty when `here` has them
/// all (it may have more: the guest sees those only after a restart).
pub(crate) fn missing(source: &[FeatureWord], here: &[FeatureWord]) -> Vec<String> {
    source
        .iter()
        .filter_map(|s| {
            let have = here
                .iter()
                .find(|h| {
                    h.cpuid_input_eax == s.cpuid_input_eax
                        && h.cpuid_input_ecx == s.cpuid_input_ecx
                        && h.cpuid_register == s.cpuid_register
                })
                .map_or(0, |h| h.features);
            let lacking = s.features & !have;
            (lacking != 0).then(|| {
                format!(
                    "CPUID {:#x}.{} {} {lacking:#010x}",
                    s.cpuid_input_eax,
                    s.cpuid_input_ecx.unwrap_or(0),
                    s.cpuid_register
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(eax: u64, ecx: Option<u64>, reg: &str, features: u64) -> FeatureWord {
        FeatureWord {
            cpuid_input_eax: eax,
            cpuid_input_ecx: ecx,
            cpuid_register: reg.into(),
            features,
        }
    }

    #[test]
    fn only_bits_the_source_had_and_here_lacks_are_missing() {
        let source = [
            word(1, None, "EDX", 0b1011),
            word(7, Some(0), "EBX", 0x400),
            word(0x8000_0001, None, "ECX", 0),
        ];
        let same = source.to_vec();
        assert!(missing(&source, &same).is_empty());
        let more = [word(1, None, "EDX", 0b1111), word(7, Some(0), "EBX", 0x401)];
        assert!(missing(&source, &more).is_empty());
        let less = [word(1, None, "EDX", 0b0011)];
        assert_eq!(
            missing(&source, &less),
            ["CPUID 0x1.0 EDX 0x00000008", "CPUID 0x7.0 EBX 0x00000400"]
        );
        // QOM's own JSON.
        let parsed: Vec<FeatureWord> = serde_json::from_str(
            r#"[{"cpuid-register": "EBX", "cpuid-input-ecx": 0, "cpuid-input-eax": 7, "features": 1024}]"#,
        )
        .unwrap();
        assert_eq!(parsed, [word(7, Some(0), "EBX", 0x400)]);
    }
}
