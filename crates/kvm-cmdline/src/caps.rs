//! What one QEMU binary supports, from the text of `--help`, `-machine ?`
//! and `-device ?` (any QEMU from 0.9 to 10.x) or from QMP answers.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// A QEMU version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro (`1.0` is `1.0.0`).
    pub micro: u32,
    /// The version as QEMU printed it, e.g. `7.2.22` or `0.12.5`.
    pub text: String,
    /// The whole first line of `--help`, e.g. with the distribution's package.
    #[serde(default)]
    pub banner: String,
}

impl QemuVersion {
    /// Whether this version is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One machine type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MachineType {
    /// Its name, e.g. `pc-i440fx-7.2` or `pc`.
    pub name: String,
    /// For an alias, the concrete machine it stands for.
    #[serde(default)]
    pub alias_of: Option<String>,
    /// Whether it is QEMU's default.
    #[serde(default)]
    pub is_default: bool,
}

/// How one probe tells whether QEMU has a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The command-line option is listed (`--help`, or QMP's
    /// `query-command-line-options`).
    Option(&'static str),
    /// The `--help` text of an option (its line and continuation lines)
    /// mentions this text.
    OptionHelp(&'static str, &'static str),
    /// The `--help` text mentions this text anywhere.
    HelpText(&'static str),
    /// The device model exists.
    Device(&'static str),
    /// The version is at least `major.minor`.
    Since(u32, u32),
    /// The version is below `major.minor` (removed in it).
    Before(u32, u32),
    /// Every QEMU with QMP has it.
    Always,
    /// This probe cannot tell; assume not.
    Never,
}

/// One row of the capability table: a feature and how each probe tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The field of [`Features`].
    pub feature: &'static str,
    /// How the text of `--help`, `-machine ?` and `-device ?` tells it.
    pub help: Probe,
    /// How the QMP probe tells it (QMP lists no flag options, so those go
    /// by the release that removed them).
    pub qmp: Probe,
}

macro_rules! features {
    ($($(#[$doc:meta])* $name:ident: $help:expr, $qmp:expr;)+) => {
        /// The option features the builder and Ganeti's checks depend on,
        /// each derived by one row of [`RULES`].
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(default)]
        #[non_exhaustive]
        pub struct Features {
            $($(#[$doc])* pub $name: bool,)+
        }

        /// The capability table: every feature, how `--help` tells it and
        /// how QMP tells it. A QEMU release that adds or drops an option
        /// is one row here.
        pub const RULES: &[Rule] = &[
            $(Rule { feature: stringify!($name), help: $help, qmp: $qmp },)+
        ];

        impl Features {
            /// Evaluates every rule, reading `help` or `qmp` probes.
            fn evaluate(use_help: bool, mut eval: impl FnMut(&Probe) -> bool) -> Features {
                Features {
                    $($name: eval(if use_help { &$help } else { &$qmp }),)+
                }
            }
        }
    };
}

use Probe::Option as Opt;
use Probe::{Always, Before, Device, HelpText, Never, OptionHelp, Since};

features! {
    /// `-drive ...,boot=on|off` (qemu-kvm before 1.0).
    drive_boot: OptionHelp("drive", ",boot=on|off"), Never;
    /// `-qmp`.
    qmp: Opt("qmp"), Always;
    /// `-spice`.
    spice: Opt("spice"), Opt("spice");
    /// `vhost=on|off` on tap netdevs.
    vhost_net: OptionHelp("netdev", "vhost=on|off"), Always;
    /// `-enable-kvm`.
    enable_kvm: Opt("enable-kvm"), Always;
    /// `-disable-kvm`.
    disable_kvm: Opt("disable-kvm"), Never;
    /// `-netdev`.
    netdev: Opt("netdev"), Opt("netdev");
    /// `-display`.
    display: Opt("display"), Always;
    /// `-machine`.
    machine: Opt("machine"), Opt("machine");
    /// `-uuid`.
    uuid: Opt("uuid"), Always;
    /// The `virtio-net-pci` device.
    virtio_net_pci: Device("virtio-net-pci"), Device("virtio-net-pci");
    /// The `virtio-balloon-pci` device.
    virtio_balloon_pci: Device("virtio-balloon-pci"), Device("virtio-balloon-pci");
    /// `-balloon` (removed in QEMU 3.0).
    balloon_option: Opt("balloon"), Before(3, 0);
    /// `-no-acpi` (gone in QEMU 9+; `-machine acpi=off` replaces it).
    no_acpi: Opt("no-acpi"), Before(9, 0);
    /// `-localtime` (replaced by `-rtc base=localtime`, removed in 3.0).
    localtime: Opt("localtime"), Before(3, 0);
    /// `-rtc`.
    rtc: Opt("rtc"), Opt("rtc");
    /// `-action` (QEMU ≥ 6.0): what QEMU does on a guest event (the
    /// watchdog's).
    action: Opt("action"), Since(6, 0);
    /// `-sandbox` with its deny options (QEMU ≥ 2.11 built with seccomp).
    sandbox: OptionHelp("sandbox", "resourcecontrol="), Opt("sandbox");
    /// `-soundhw` (replaced by `-audio`, removed in 7.1).
    soundhw: Opt("soundhw"), Before(7, 1);
    /// `-audio` with `model=`.
    audio: OptionHelp("audio", "model="), Since(7, 1);
    /// `-chroot` (removed in 9.0).
    chroot: Opt("chroot"), Before(9, 0);
    /// `-runas` (removed in 9.1).
    runas: Opt("runas"), Before(9, 1);
    /// `-run-with` (chroot= and user=).
    run_with: Opt("run-with"), Opt("run-with");
    /// `-usbdevice`.
    usbdevice: Opt("usbdevice"), Always;
    /// The `usb-tablet` and `usb-mouse` devices.
    usb_devices: Device("usb-tablet"), Device("usb-tablet");
    /// `-nographic`.
    nographic: Opt("nographic"), Always;
    /// `-incoming defer`.
    incoming_defer: HelpText("-incoming defer"), Since(2, 3);
    /// `aio=io_uring` on drives (QEMU ≥ 5.0 built with liburing).
    aio_io_uring: OptionHelp("drive", "io_uring"), Since(5, 0);
    /// `-blockdev` (QEMU ≥ 2.9): disks as a node graph, with
    /// `cache.direct`/`cache.no-flush` and the device's `write-cache`.
    blockdev: Opt("blockdev"), Since(2, 9);
    /// `auto-read-only` on block nodes (QEMU ≥ 3.1).
    auto_read_only: Since(3, 1), Since(3, 1);
    /// `-name NAME,debug-threads=on`: QEMU names its threads (gone in
    /// QEMU 11).
    debug_threads: OptionHelp("name", "debug-threads"), Before(11, 0);
    /// JSON syntax for `-device`/`-object`/`-netdev` (QEMU ≥ 6.2); see
    /// [`crate::qemu::Syntax::for_caps`].
    json_cli: Since(6, 2), Since(6, 2);
    /// `on`/`off` values for boolean sub-options (`password=on`,
    /// `server=on`); older QEMU took bare flags.
    bool_suboptions: Since(2, 5), Since(2, 5);
    /// The `tls-creds-x509` object for VNC TLS (QEMU ≥ 2.5).
    tls_creds_object: Since(2, 5), Since(2, 5);
    /// `-k` takes a keymap file with `include` lines (QEMU < 4.0); newer
    /// QEMU refuses include files and takes the layout name.
    keymap_include_files: Before(4, 0), Before(4, 0);
}

/// What a probe evaluates against.
struct Facts<'a> {
    version: &'a QemuVersion,
    options: &'a BTreeSet<String>,
    devices: &'a BTreeSet<String>,
    help: Option<&'a HelpScan<'a>>,
}

impl Facts<'_> {
    fn eval(&self, probe: &Probe) -> bool {
        let v = self.version;
        match *probe {
            Probe::Option(o) => self.options.contains(o),
            OptionHelp(o, needle) => self.help.is_some_and(|h| h.option_text(o).contains(needle)),
            HelpText(needle) => self.help.is_some_and(|h| h.text.contains(needle)),
            Device(d) => self.devices.contains(d),
            Since(major, minor) => v.at_least(major, minor),
            Before(major, minor) => !v.at_least(major, minor),
            Always => true,
            Never => false,
        }
    }
}

/// What one QEMU binary supports. Serializable so it can be cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct Capabilities {
    /// Its version.
    pub version: QemuVersion,
    /// The default machine (concrete name), if QEMU marks one.
    pub default_machine: Option<String>,
    /// Every machine type, aliases included.
    pub machines: Vec<MachineType>,
    /// Every device model name.
    pub devices: BTreeSet<String>,
    /// Every command-line option, without the dash.
    pub options: BTreeSet<String>,
    /// Derived features.
    pub features: Features,
}

fn version_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\b(\d+)\.(\d+)(\.(\d+))?\b").expect("static regex"))
}

/// Parses QEMU's version from the first line of `--help` (or `--version`).
pub fn parse_version(text: &str) -> Result<QemuVersion, Error> {
    let first = text.lines().next().unwrap_or("").trim();
    let caps = version_re()
        .captures(first)
        .ok_or_else(|| Error::Capabilities {
            source_name: "--help".into(),
            reason: format!("no version number in its first line {first:?}"),
        })?;
    let num = |i: usize| -> Result<u32, Error> {
        caps.get(i)
            .map(|m| m.as_str().parse::<u32>())
            .transpose()
            .map(|v| v.unwrap_or(0))
            .map_err(|e| Error::Capabilities {
                source_name: "--help".into(),
                reason: format!("version number too large: {e}"),
            })
    };
    Ok(QemuVersion {
        major: num(1)?,
        minor: num(2)?,
        micro: num(4)?,
        text: caps
            .get(0)
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default(),
        banner: first.to_owned(),
    })
}

/// The option a `--help` line starts, if it starts one (`-name ...`).
fn option_name(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('-')?;
    if !rest.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return None;
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// One pass over `--help`: every option name, and each option's text
/// (its line plus continuation lines).
struct HelpScan<'a> {
    text: &'a str,
    options: BTreeSet<String>,
    sections: Vec<(&'a str, &'a str)>,
}

impl HelpScan<'_> {
    /// The help lines of an option (`net` and `netdev` share theirs).
    fn option_text(&self, option: &str) -> String {
        fn alias(o: &str) -> &str {
            if o == "net" {
                "netdev"
            } else {
                o
            }
        }
        self.sections
            .iter()
            .filter(|(o, _)| alias(o) == alias(option))
            .map(|(_, l)| *l)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn scan_help(help: &str) -> HelpScan<'_> {
    let mut scan = HelpScan {
        text: help,
        options: BTreeSet::new(),
        sections: Vec::new(),
    };
    let mut current = "";
    for line in help.lines() {
        if line.starts_with('-') {
            current = option_name(line).unwrap_or("");
            if !current.is_empty() && !scan.options.contains(current) {
                scan.options.insert(current.to_owned());
            }
        }
        if !current.is_empty() {
            scan.sections.push((current, line));
        }
    }
    scan
}

/// Parses `-machine ?` output.
pub fn parse_machines(text: &str) -> (Vec<MachineType>, Option<String>) {
    let mut machines = Vec::new();
    let mut default = None;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with("Supported machines") || line.starts_with(' ') {
            continue;
        }
        let mut parts = line.splitn(2, char::is_whitespace);
        let Some(name) = parts.next().filter(|n| !n.is_empty()) else {
            continue;
        };
        let desc = parts.next().unwrap_or("");
        let alias_of = desc
            .find("(alias of ")
            .and_then(|i| desc[i + 10..].split(')').next())
            .map(str::to_owned);
        let is_default = desc.contains("(default)");
        if is_default {
            default = Some(name.to_owned());
        }
        machines.push(MachineType {
            name: name.to_owned(),
            alias_of,
            is_default,
        });
    }
    (machines, default)
}

/// Parses `-device ?` output: every `name "..."`.
pub fn parse_devices(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("name \""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_owned)
        .collect()
}

fn qmp_bad(source: &str, reason: &str) -> Error {
    Error::Capabilities {
        source_name: source.into(),
        reason: reason.into(),
    }
}

fn qmp_list<'a>(v: &'a Value, source: &str) -> Result<&'a Vec<Value>, Error> {
    v.as_array().ok_or_else(|| qmp_bad(source, "not a list"))
}

/// The version in a `query-version` answer.
fn qmp_version(answer: &Value) -> Result<QemuVersion, Error> {
    let q = answer
        .get("qemu")
        .ok_or_else(|| qmp_bad("query-version", "no qemu field"))?;
    let n = |k: &str| {
        q.get(k)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| qmp_bad("query-version", "version numbers missing"))
    };
    let (major, minor, micro) = (n("major")?, n("minor")?, n("micro")?);
    let package = answer.get("package").and_then(Value::as_str).unwrap_or("");
    Ok(QemuVersion {
        major,
        minor,
        micro,
        text: format!("{major}.{minor}.{micro}"),
        banner: format!("QEMU emulator version {major}.{minor}.{micro} {package}")
            .trim()
            .to_owned(),
    })
}

/// Machine types (aliases as entries of their own) and the default, from
/// a `query-machines` answer.
fn qmp_machines(answer: &Value) -> Result<(Vec<MachineType>, Option<String>), Error> {
    let mut machine_list = Vec::new();
    let mut default_machine = None;
    for m in qmp_list(answer, "query-machines")? {
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| qmp_bad("query-machines", "machine without name"))?;
        let is_default = m
            .get("is-default")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if is_default {
            default_machine = Some(name.to_owned());
        }
        if let Some(alias) = m.get("alias").and_then(Value::as_str) {
            machine_list.push(MachineType {
                name: alias.to_owned(),
                alias_of: Some(name.to_owned()),
                is_default: false,
            });
        }
        machine_list.push(MachineType {
            name: name.to_owned(),
            alias_of: None,
            is_default,
        });
    }
    machine_list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((machine_list, default_machine))
}

/// QMP's option list plus the flag options it cannot show: those whose
/// rule the QMP probe answers from the version alone.
fn with_inferred_options(version: &QemuVersion, mut options: BTreeSet<String>) -> BTreeSet<String> {
    for rule in RULES {
        let by_version = matches!(rule.qmp, Always | Since(..) | Before(..));
        if let (Probe::Option(o), true) = (rule.help, by_version) {
            let facts = Facts {
                version,
                options: &options,
                devices: &BTreeSet::new(),
                help: None,
            };
            if facts.eval(&rule.qmp) {
                options.insert(o.to_owned());
            }
        }
    }
    options
}

impl Capabilities {
    /// From the captured text of `--help`, `-machine ?` and `-device ?`
    /// (the last two may be empty: QEMU 0.9 has no `-device`).
    pub fn from_help(help: &str, machines: &str, devices: &str) -> Result<Capabilities, Error> {
        let version = parse_version(help)?;
        let scan = scan_help(help);
        if scan.options.is_empty() {
            return Err(Error::Capabilities {
                source_name: "--help".into(),
                reason: "no options listed".into(),
            });
        }
        let (machines, default_machine) = parse_machines(machines);
        let devices = parse_devices(devices);
        let facts = Facts {
            version: &version,
            options: &scan.options,
            devices: &devices,
            help: Some(&scan),
        };
        let features = Features::evaluate(true, |p| facts.eval(p));
        Ok(Capabilities {
            version,
            default_machine,
            machines,
            devices,
            options: scan.options,
            features,
        })
    }

    /// From the answers of one QMP probe (`query-version`, `query-machines`,
    /// `qom-list-types` of devices, `query-command-line-options`). QMP does
    /// not list flag options such as `-no-acpi` or `-chroot`: pass the
    /// `--help` text to read them, or they are inferred from the version.
    pub fn from_qmp(
        version: &Value,
        machines: &Value,
        device_types: &Value,
        command_line_options: &Value,
        help: Option<&str>,
    ) -> Result<Capabilities, Error> {
        let version = qmp_version(version)?;
        let (machine_list, default_machine) = qmp_machines(machines)?;
        let devices: BTreeSet<String> = qmp_list(device_types, "qom-list-types")?
            .iter()
            .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let qemu_opts: BTreeSet<String> =
            qmp_list(command_line_options, "query-command-line-options")?
                .iter()
                .filter_map(|o| o.get("option").and_then(Value::as_str).map(str::to_owned))
                .filter(|o| !o.is_empty())
                .collect();

        let (options, features) = match help {
            Some(h) => {
                let scan = scan_help(h);
                let mut options = scan.options.clone();
                options.extend(qemu_opts);
                let facts = Facts {
                    version: &version,
                    options: &options,
                    devices: &devices,
                    help: Some(&scan),
                };
                let features = Features::evaluate(true, |p| facts.eval(p));
                (options, features)
            }
            None => {
                let options = with_inferred_options(&version, qemu_opts);
                let facts = Facts {
                    version: &version,
                    options: &options,
                    devices: &devices,
                    help: None,
                };
                let features = Features::evaluate(false, |p| facts.eval(p));
                (options, features)
            }
        };
        Ok(Capabilities {
            version,
            default_machine,
            machines: machine_list,
            devices,
            options,
            features,
        })
    }

    /// Resolves a machine name to its concrete type: an alias such as `pc`
    /// becomes `pc-i440fx-7.2`; an empty name becomes the default machine
    /// (or `pc` when QEMU marks none, as Ganeti does). Unknown names are
    /// an error naming `machine_version`.
    pub fn resolve_machine(&self, requested: &str) -> Result<String, Error> {
        let requested = requested.trim();
        if requested.is_empty() {
            return Ok(self.default_machine.clone().unwrap_or_else(|| "pc".into()));
        }
        if self.machines.is_empty() {
            // Nothing to check against (no machine list captured).
            return Ok(requested.to_owned());
        }
        match self.machines.iter().find(|m| m.name == requested) {
            Some(m) => Ok(m.alias_of.clone().unwrap_or_else(|| m.name.clone())),
            None => Err(Error::Host {
                key: "machine_version".into(),
                reason: format!(
                    "QEMU {} has no machine type {requested:?}",
                    self.version.text
                ),
            }),
        }
    }

    /// Whether the binary has this device model. Without a device list
    /// (QEMU 0.9, or none captured) nothing can be ruled out.
    pub fn has_device(&self, name: &str) -> bool {
        self.devices.is_empty() || self.devices.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_every_age() {
        for (line, want) in [
            ("QEMU PC emulator version 0.9.1, Copyright (c) 2003-2008 Fabrice Bellard", (0, 9, 1)),
            ("QEMU emulator version 1.0 (qemu-kvm-1.0), Copyright (c) 2003-2008 Fabrice Bellard", (1, 0, 0)),
            ("QEMU PC emulator version 0.12.5 (qemu-kvm-0.12.5), Copyright (c) 2003-2008 Fabrice Bellard", (0, 12, 5)),
            ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", (10, 0, 2)),
        ] {
            let v = parse_version(line).unwrap();
            assert_eq!((v.major, v.minor, v.micro), want, "{line}");
        }
        assert!(parse_version("no digits here").is_err());
        assert!(parse_version("").is_err());
        assert!(parse_version("version 99999999999.1").is_err());
    }

    #[test]
    fn one_rule_per_feature() {
        let fields = match serde_json::to_value(Features::default()) {
            Ok(Value::Object(m)) => m.keys().cloned().collect::<BTreeSet<_>>(),
            _ => BTreeSet::new(),
        };
        let rules: BTreeSet<String> = RULES.iter().map(|r| r.feature.to_owned()).collect();
        assert_eq!(fields, rules);
        assert_eq!(RULES.len(), rules.len(), "a feature has two rows");
    }

    #[test]
    fn machine_list_old_and_new() {
        let (m, d) = parse_machines(
            "Supported machines are:\npc         Standard PC (alias of pc-1.0)\npc-1.0     Standard PC (default)\nisapc      ISA-only PC\n",
        );
        assert_eq!(d.as_deref(), Some("pc-1.0"));
        assert_eq!(m[0].alias_of.as_deref(), Some("pc-1.0"));
        assert_eq!(m.len(), 3);
    }
}
