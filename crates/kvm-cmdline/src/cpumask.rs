//! Ganeti's CPU mask syntax: `all`, `0-3,5`, or one set per vCPU
//! separated by `:` (`0-2,4:all:1,3`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Physical CPUs one vCPU (or the whole VM) may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuSet {
    /// No pinning.
    All,
    /// These CPUs, ascending, without duplicates.
    Cpus(Vec<u32>),
}

/// A parsed `cpu_mask`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuMask(Vec<CpuSet>);

/// Highest CPU number accepted (a sanity bound, far above real hosts).
pub const MAX_CPU: u32 = 8191;

impl CpuMask {
    /// `all`: no pinning.
    pub fn all() -> CpuMask {
        CpuMask(vec![CpuSet::All])
    }

    /// The sets: one for the whole VM, or one per vCPU.
    pub fn sets(&self) -> &[CpuSet] {
        &self.0
    }

    /// Whether the mask pins nothing.
    pub fn is_all(&self) -> bool {
        self.0.iter().all(|s| *s == CpuSet::All)
    }

    /// Parses Ganeti's `cpu_mask` syntax; the error names the parameter.
    pub fn parse(text: &str) -> Result<CpuMask, crate::Error> {
        Self::parse_text(text).map_err(|reason| crate::Error::InvalidValue {
            key: "cpu_mask".into(),
            value: text.into(),
            reason,
        })
    }

    fn parse_text(text: &str) -> Result<CpuMask, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(CpuMask::all());
        }
        text.split(':')
            .map(parse_set)
            .collect::<Result<_, _>>()
            .map(CpuMask)
    }

    /// The affinity set for vCPU `index` of `vcpus`, or for the whole VM
    /// when the mask has one set. `None` means no pinning.
    pub fn for_vcpu(&self, index: usize) -> Option<&[u32]> {
        let set = if self.0.len() == 1 {
            &self.0[0]
        } else {
            self.0.get(index)?
        };
        match set {
            CpuSet::All => None,
            CpuSet::Cpus(c) => Some(c),
        }
    }
}

fn parse_set(s: &str) -> Result<CpuSet, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("all") {
        return Ok(CpuSet::All);
    }
    if s.is_empty() {
        return Err("empty CPU set".into());
    }
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let num = |t: &str| -> Result<u32, String> {
            let n: u32 = t
                .trim()
                .parse()
                .map_err(|_| format!("{t:?} is not a CPU number"))?;
            if n > MAX_CPU {
                return Err(format!("CPU {n} is above {MAX_CPU}"));
            }
            Ok(n)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {a}-{b} is reversed"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(CpuSet::Cpus(cpus))
}

impl std::fmt::Display for CpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sets: Vec<String> = self
            .0
            .iter()
            .map(|s| match s {
                CpuSet::All => "all".to_owned(),
                CpuSet::Cpus(c) => ranges(c),
            })
            .collect();
        f.write_str(&sets.join(":"))
    }
}

fn ranges(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

impl Default for CpuMask {
    fn default() -> Self {
        CpuMask::all()
    }
}

impl schemars::JsonSchema for CpuMask {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CpuMask".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Ganeti's cpu_mask: \"all\", CPU lists and ranges (\"0-2,4\"), or one per vCPU separated by ':'.",
        })
    }
}

impl Serialize for CpuMask {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CpuMask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CpuMask, D::Error> {
        let s = String::deserialize(d)?;
        CpuMask::parse_text(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ganeti_examples() {
        let m = CpuMask::parse("0-2,4:all:1,3").unwrap();
        assert_eq!(
            m.sets(),
            &[
                CpuSet::Cpus(vec![0, 1, 2, 4]),
                CpuSet::All,
                CpuSet::Cpus(vec![1, 3])
            ]
        );
        assert_eq!(m.to_string(), "0-2,4:all:1,3");
        assert_eq!(m.for_vcpu(0), Some(&[0, 1, 2, 4][..]));
        assert_eq!(m.for_vcpu(1), None);
        assert!(CpuMask::parse("all").unwrap().is_all());
        let one = CpuMask::parse("1").unwrap();
        assert_eq!(one.for_vcpu(7), Some(&[1][..]));
        for bad in ["x", "1-", "3-1", "1,,2", "0:", "99999"] {
            assert!(CpuMask::parse(bad).is_err(), "{bad}");
        }
    }
}
