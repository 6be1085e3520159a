//! What one QEMU binary supports, from the text of `--help`, `-machine ?`
//! and `-device ?` (any QEMU from 0.9 to 10.x) or from QMP answers.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// A QEMU version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The option features the builder and Ganeti's checks depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Features {
    /// `-drive ...,boot=on|off` (qemu-kvm before 1.0).
    pub drive_boot: bool,
    /// `-qmp`.
    pub qmp: bool,
    /// `-spice`.
    pub spice: bool,
    /// `vhost=on|off` on tap netdevs.
    pub vhost_net: bool,
    /// `-enable-kvm`.
    pub enable_kvm: bool,
    /// `-disable-kvm`.
    pub disable_kvm: bool,
    /// `-netdev`.
    pub netdev: bool,
    /// `-display`.
    pub display: bool,
    /// `-machine`.
    pub machine: bool,
    /// `-uuid`.
    pub uuid: bool,
    /// The `virtio-net-pci` device.
    pub virtio_net_pci: bool,
    /// The `virtio-balloon-pci` device.
    pub virtio_balloon_pci: bool,
    /// `-balloon` (removed from QEMU long ago).
    pub balloon_option: bool,
    /// `-no-acpi` (gone in QEMU 9+; `-machine acpi=off` replaces it).
    pub no_acpi: bool,
    /// `-localtime` (replaced by `-rtc base=localtime`).
    pub localtime: bool,
    /// `-rtc`.
    pub rtc: bool,
    /// `-soundhw` (replaced by `-audio`).
    pub soundhw: bool,
    /// `-audio` with `model=`.
    pub audio: bool,
    /// `-chroot`.
    pub chroot: bool,
    /// `-runas`.
    pub runas: bool,
    /// `-run-with` (chroot= and user=).
    pub run_with: bool,
    /// `-usbdevice`.
    pub usbdevice: bool,
    /// The `usb-tablet` and `usb-mouse` devices.
    pub usb_devices: bool,
    /// `-nographic`.
    pub nographic: bool,
    /// `-incoming defer`.
    pub incoming_defer: bool,
    /// JSON syntax for `-device`/`-object` (QEMU ≥ 6.2).
    pub json_cli: bool,
    /// `on`/`off` values for boolean sub-options (`password=on`,
    /// `server=on`); older QEMU took bare flags.
    pub bool_suboptions: bool,
    /// The `tls-creds-x509` object for VNC TLS (QEMU ≥ 2.5).
    pub tls_creds_object: bool,
    /// `-k` takes a keymap file with `include` lines (QEMU < 4.0); newer
    /// QEMU refuses include files and takes the layout name.
    pub keymap_include_files: bool,
}

/// What one QEMU binary supports. Serializable so it can be cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// One pass over `--help`: every option name, and the text (option line
/// plus continuation lines) of the few options whose sub-options matter.
struct HelpScan<'a> {
    options: BTreeSet<String>,
    drive: Vec<&'a str>,
    net: Vec<&'a str>,
    audio: Vec<&'a str>,
}

fn scan_help(help: &str) -> HelpScan<'_> {
    let mut scan = HelpScan {
        options: BTreeSet::new(),
        drive: Vec::new(),
        net: Vec::new(),
        audio: Vec::new(),
    };
    let mut current = "";
    for line in help.lines() {
        if line.starts_with('-') {
            current = option_name(line).unwrap_or("");
            if !current.is_empty() && !scan.options.contains(current) {
                scan.options.insert(current.to_owned());
            }
        }
        match current {
            "drive" => scan.drive.push(line),
            "netdev" | "net" => scan.net.push(line),
            "audio" => scan.audio.push(line),
            _ => {}
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

impl Capabilities {
    /// From the captured text of `--help`, `-machine ?` and `-device ?`
    /// (the last two may be empty: QEMU 0.9 has no `-device`).
    pub fn from_help(help: &str, machines: &str, devices: &str) -> Result<Capabilities, Error> {
        let version = parse_version(help)?;
        let scan = scan_help(help);
        let options = scan.options;
        if options.is_empty() {
            return Err(Error::Capabilities {
                source_name: "--help".into(),
                reason: "no options listed".into(),
            });
        }
        let (machines, default_machine) = parse_machines(machines);
        let devices = parse_devices(devices);
        let drive = scan.drive.join("\n");
        let has = |o: &str| options.contains(o);
        let vhost = scan.net.iter().any(|l| l.contains("vhost=on|off"));
        let features = Features {
            drive_boot: drive.contains(",boot=on|off"),
            qmp: has("qmp"),
            spice: has("spice"),
            vhost_net: vhost,
            enable_kvm: has("enable-kvm"),
            disable_kvm: has("disable-kvm"),
            netdev: has("netdev"),
            display: has("display"),
            machine: has("machine"),
            uuid: has("uuid"),
            virtio_net_pci: devices.contains("virtio-net-pci"),
            virtio_balloon_pci: devices.contains("virtio-balloon-pci"),
            balloon_option: has("balloon"),
            no_acpi: has("no-acpi"),
            localtime: has("localtime"),
            rtc: has("rtc"),
            soundhw: has("soundhw"),
            audio: scan.audio.iter().any(|l| l.contains("model=")),
            chroot: has("chroot"),
            runas: has("runas"),
            run_with: has("run-with"),
            usbdevice: has("usbdevice"),
            usb_devices: devices.contains("usb-tablet"),
            nographic: has("nographic"),
            incoming_defer: help.contains("-incoming defer"),
            json_cli: version.at_least(6, 2),
            bool_suboptions: version.at_least(2, 5),
            tls_creds_object: version.at_least(2, 5),
            keymap_include_files: !version.at_least(4, 0),
        };
        Ok(Capabilities {
            version,
            default_machine,
            machines,
            devices,
            options,
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
        let bad = |source: &str, reason: &str| Error::Capabilities {
            source_name: source.into(),
            reason: reason.into(),
        };
        let q = version
            .get("qemu")
            .ok_or_else(|| bad("query-version", "no qemu field"))?;
        let n = |k: &str| {
            q.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad("query-version", "version numbers missing"))
        };
        let (major, minor, micro) = (n("major")?, n("minor")?, n("micro")?);
        let package = version.get("package").and_then(Value::as_str).unwrap_or("");
        let version = QemuVersion {
            major,
            minor,
            micro,
            text: format!("{major}.{minor}.{micro}"),
            banner: format!("QEMU emulator version {major}.{minor}.{micro} {package}")
                .trim()
                .to_owned(),
        };
        let list = |v: &Value, source: &str| -> Result<Vec<Value>, Error> {
            v.as_array()
                .cloned()
                .ok_or_else(|| bad(source, "not a list"))
        };
        let mut machine_list = Vec::new();
        let mut default_machine = None;
        for m in list(machines, "query-machines")? {
            let name = m
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("query-machines", "machine without name"))?;
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
        let devices: BTreeSet<String> = list(device_types, "qom-list-types")?
            .iter()
            .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let qemu_opts: BTreeSet<String> = list(command_line_options, "query-command-line-options")?
            .iter()
            .filter_map(|o| o.get("option").and_then(Value::as_str).map(str::to_owned))
            .filter(|o| !o.is_empty())
            .collect();

        let mut caps = match help {
            Some(h) => Capabilities::from_help(h, "", "")?,
            None => {
                let v = &version;
                let mut options = qemu_opts.clone();
                // Flag options QMP cannot show, by the release that removed them.
                let inferred: [(&str, bool); 12] = [
                    ("qmp", true),
                    ("display", true),
                    ("uuid", true),
                    ("enable-kvm", true),
                    ("nographic", true),
                    ("usbdevice", true),
                    ("balloon", !v.at_least(3, 0)),
                    ("localtime", !v.at_least(3, 0)),
                    ("soundhw", !v.at_least(7, 1)),
                    ("no-acpi", !v.at_least(9, 0)),
                    ("chroot", !v.at_least(9, 0)),
                    ("runas", !v.at_least(9, 1)),
                ];
                for (o, present) in inferred {
                    if present {
                        options.insert(o.to_owned());
                    }
                }
                let has = |o: &str| options.contains(o);
                let features = Features {
                    drive_boot: false,
                    qmp: true,
                    spice: has("spice"),
                    vhost_net: true,
                    enable_kvm: true,
                    disable_kvm: false,
                    netdev: has("netdev"),
                    display: true,
                    machine: has("machine"),
                    uuid: true,
                    virtio_net_pci: false,
                    virtio_balloon_pci: false,
                    balloon_option: has("balloon"),
                    no_acpi: has("no-acpi"),
                    localtime: has("localtime"),
                    rtc: has("rtc"),
                    soundhw: has("soundhw"),
                    audio: v.at_least(7, 1),
                    chroot: has("chroot"),
                    runas: has("runas"),
                    run_with: has("run-with"),
                    usbdevice: true,
                    usb_devices: false,
                    nographic: true,
                    incoming_defer: v.at_least(2, 3),
                    json_cli: v.at_least(6, 2),
                    bool_suboptions: v.at_least(2, 5),
                    tls_creds_object: v.at_least(2, 5),
                    keymap_include_files: !v.at_least(4, 0),
                };
                Capabilities {
                    version: version.clone(),
                    default_machine: None,
                    machines: Vec::new(),
                    devices: BTreeSet::new(),
                    options,
                    features,
                }
            }
        };
        caps.version = version;
        caps.default_machine = default_machine;
        caps.machines = machine_list;
        caps.features.virtio_net_pci = devices.contains("virtio-net-pci");
        caps.features.virtio_balloon_pci = devices.contains("virtio-balloon-pci");
        caps.features.usb_devices = devices.contains("usb-tablet");
        caps.devices = devices;
        caps.options.extend(qemu_opts);
        Ok(caps)
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
    fn machine_list_old_and_new() {
        let (m, d) = parse_machines(
            "Supported machines are:\npc         Standard PC (alias of pc-1.0)\npc-1.0     Standard PC (default)\nisapc      ISA-only PC\n",
        );
        assert_eq!(d.as_deref(), Some("pc-1.0"));
        assert_eq!(m[0].alias_of.as_deref(), Some("pc-1.0"));
        assert_eq!(m.len(), 3);
    }
}
