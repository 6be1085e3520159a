//! The node's configuration file (`/etc/gkvm/node.toml`, or
//! `--node-config`/`GKVM_NODE_CONFIG`): what is per node rather than per
//! instance. Flags and environment variables override it.
//!
//! ```toml
//! run_dir = "/run/gkvm"
//! log_dir = "/var/log/gkvm"                # QEMU's logs, NAME.log
//! state_dir = "/var/lib/gkvm"              # what outlives a run (UEFI variables)
//! ovmf_dir = "/usr/share/OVMF"             # OVMF's images (Debian's ovmf)
//! swtpm_path = "/usr/bin/swtpm"             # the TPM emulator (tpm=tpm2)
//! kvm_path = "/usr/bin/qemu-system-x86_64"
//! nic_up_script = "/etc/gkvm/kvm-ifup"      # ACTION=up; none: native
//! nic_down_script = "/etc/gkvm/kvm-ifdown"  # ACTION=down; none: native
//! nic_communication_script = "/etc/ganeti/kvm-ifup-os"  # natively, for gnt.com.N TAPs
//! tap_template = "gkvm%d"
//! uid_pool = "20000-20999"                  # for security_model=pool
//! migration_key = "/etc/gkvm/migration.key"
//! migration_tls_dir = "/etc/gkvm/migration-tls"  # TLS for every migration
//! spice_cacert = "/etc/gkvm/spice-ca.pem"
//! spice_cert = "/etc/gkvm/spice.pem"
//! ```
//!
//! It chooses programs that run as root, so it must belong to this user
//! (or root) and be writable by nobody else.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the file is looked for when no path is given.
pub(crate) const DEFAULT_PATH: &str = "/etc/gkvm/node.toml";

/// Largest file read.
const MAX_SIZE: u64 = 64 << 10;

/// Every key of the file, with an example value (TOML) and what it does:
/// `gkvm-node.toml(5)` is made of it, and a test checks that it lists
/// exactly [`NodeConfig`]'s keys.
pub(crate) const KEYS: &[(&str, &str, &str)] = &[
    ("run_dir", "\"/run/gkvm\"", "The run directory: pid files, QMP sockets, runtime records (tmpfs; Ganeti's /var/run/ganeti/kvm-hypervisor works too). Default /run/gkvm; --run-dir and GKVM_RUN_DIR override it."),
    ("log_dir", "\"/var/log/gkvm\"", "Where each instance's QEMU log (NAME.log, 0600) is kept. Default: /var/log/gkvm with the default run directory (which is tmpfs), else log/ in the run directory."),
    ("state_dir", "\"/var/lib/gkvm\"", "What outlives a run: definitions (definitions/NAME.json), managed saves (saved/NAME.save), UEFI variable stores and TPM state (instances/NAME/), the demo's guest. Default /var/lib/gkvm."),
    ("ovmf_dir", "\"/usr/share/OVMF\"", "Where OVMF's images are (Debian's ovmf), for firmware=uefi and uefi-secboot."),
    ("swtpm_path", "\"/usr/bin/swtpm\"", "The TPM emulator for tpm=tpm2 (Debian's swtpm)."),
    ("kvm_path", "\"/usr/bin/qemu-system-x86_64\"", "The QEMU binary for every instance, instead of each one's kvm_path; --kvm-path and GKVM_KVM_PATH override it."),
    ("nic_up_script", "\"/etc/gkvm/kvm-ifup\"", "Run with a TAP's name and Ganeti's environment (ACTION=up) when a NIC comes up. Without it gkvm configures each NIC itself, as Ganeti's net-*-up scripts do."),
    ("nic_down_script", "\"/etc/gkvm/kvm-ifdown\"", "Run (ACTION=down) when a TAP goes away. Without it gkvm undoes natively what the kernel keeps."),
    ("nic_communication_script", "\"/etc/ganeti/kvm-ifup-os\"", "What configures a Ganeti instance-communication NIC (TAP gnt.com.N) when there is no nic_up_script."),
    ("tap_template", "\"gkvm%d\"", "Kernel name template of TAP interfaces (%d: a number)."),
    ("uid_pool", "\"20000-20999\"", "The uids QEMU runs as with security_model=pool (above the system uids)."),
    ("migration_key", "\"/etc/gkvm/migration.key\"", "The key the nodes share to seal migration info (mode 0600, at least 16 bytes); --migration-key and GKVM_MIGRATION_KEY override it."),
    ("migration_tls_dir", "\"/etc/gkvm/migration-tls\"", "TLS credentials for every migration to and from this node (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem); peers are verified and a peer without TLS is refused."),
    ("spice_cacert", "\"/etc/gkvm/spice-ca.pem\"", "The CA certificate of SPICE with TLS."),
    ("spice_cert", "\"/etc/gkvm/spice.pem\"", "The certificate of SPICE with TLS."),
];

/// The file's settings; every one is optional.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeConfig {
    pub(crate) run_dir: Option<PathBuf>,
    pub(crate) log_dir: Option<PathBuf>,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) ovmf_dir: Option<PathBuf>,
    pub(crate) swtpm_path: Option<PathBuf>,
    pub(crate) kvm_path: Option<PathBuf>,
    pub(crate) nic_up_script: Option<PathBuf>,
    pub(crate) nic_down_script: Option<PathBuf>,
    pub(crate) nic_communication_script: Option<PathBuf>,
    pub(crate) tap_template: Option<String>,
    pub(crate) uid_pool: Option<String>,
    pub(crate) migration_key: Option<PathBuf>,
    pub(crate) migration_tls_dir: Option<PathBuf>,
    pub(crate) spice_cacert: Option<PathBuf>,
    pub(crate) spice_cert: Option<PathBuf>,
}

/// The configuration at `explicit` (which must exist), else at
/// [`DEFAULT_PATH`] if it exists, else empty. Errors name the file and
/// the key.
pub(crate) fn load(explicit: Option<&Path>) -> Result<NodeConfig, String> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
        None => return Ok(NodeConfig::default()),
    };
    let fail = |e: String| format!("node configuration {}: {e}", path.display());
    let text = read_private(&path).map_err(fail)?;
    let config: NodeConfig = toml::from_str(&text).map_err(|e| fail(one_line(&e)))?;
    config.check().map_err(fail)?;
    Ok(config)
}

/// A TOML error on one line (its message names the key or line).
fn one_line(e: &toml::de::Error) -> String {
    let mut msg = e.message().to_owned();
    if let Some(span) = e.span() {
        msg = format!("{msg} (at byte {})", span.start);
    }
    msg
}

fn read_private(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    check_owner(path, &meta, "it")?;
    // Whoever may rename in a directory above it may swap it.
    check_directories(path)?;
    let text = hv_kvm::read_open_capped(file, path, MAX_SIZE).map_err(|e| e.report())?;
    String::from_utf8(text).map_err(|_| "not UTF-8".to_owned())
}

impl NodeConfig {
    /// Checks each value; the error names the key.
    fn check(&self) -> Result<(), String> {
        for (key, path) in [
            ("run_dir", &self.run_dir),
            ("log_dir", &self.log_dir),
            ("state_dir", &self.state_dir),
            ("ovmf_dir", &self.ovmf_dir),
            ("swtpm_path", &self.swtpm_path),
            ("kvm_path", &self.kvm_path),
            ("nic_up_script", &self.nic_up_script),
            ("nic_down_script", &self.nic_down_script),
            ("nic_communication_script", &self.nic_communication_script),
            ("migration_key", &self.migration_key),
            ("migration_tls_dir", &self.migration_tls_dir),
            ("spice_cacert", &self.spice_cacert),
            ("spice_cert", &self.spice_cert),
        ] {
            if let Some(p) = path {
                if !p.is_absolute() {
                    return Err(format!("{key}: {} is not an absolute path", p.display()));
                }
            }
        }
        for (key, program) in [
            ("kvm_path", &self.kvm_path),
            ("nic_up_script", &self.nic_up_script),
            ("nic_down_script", &self.nic_down_script),
            ("nic_communication_script", &self.nic_communication_script),
        ] {
            if let Some(p) = program {
                check_program(p).map_err(|e| format!("{key}: {}: {e}", p.display()))?;
            }
        }
        if let Some(problem) = self
            .tap_template
            .as_deref()
            .and_then(hv_kvm::tap_template_problem)
        {
            return Err(format!("tap_template: {problem}"));
        }
        self.uid_pool()?;
        if let Some(dir) = &self.migration_tls_dir {
            for f in [
                "ca-cert.pem",
                "server-cert.pem",
                "server-key.pem",
                "client-cert.pem",
                "client-key.pem",
            ] {
                if !dir.join(f).is_file() {
                    return Err(format!("migration_tls_dir: {} has no {f}", dir.display()));
                }
            }
        }
        Ok(())
    }

    /// `uid_pool` as `FIRST-LAST`.
    pub(crate) fn uid_pool(&self) -> Result<Option<hv_kvm::UidPool>, String> {
        let Some(text) = &self.uid_pool else {
            return Ok(None);
        };
        let bad = || format!("uid_pool: {text:?} is not FIRST-LAST (e.g. 20000-20999)");
        let (a, b) = text.trim().split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if first == 0 || first > last {
            return Err(bad());
        }
        let sys_max = sys_uid_max();
        if first <= sys_max {
            return Err(format!(
                "uid_pool: {text:?} covers system uids (up to {sys_max}, SYS_UID_MAX of \
                 /etc/login.defs): QEMU would run as a system account"
            ));
        }
        Ok(Some(hv_kvm::UidPool::new(first, last)))
    }
}

/// A program gkvm runs as root must be a regular executable file that
/// only root (or this user) can change, in directories only they can
/// change, as sudo and sshd require of what they run.
fn check_program(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    check_owner(path, &meta, "it")?;
    check_directories(path)
}

/// The directories above `path` (symlinks resolved: what is read or run
/// is the target, which must be as safe as the link) belong to root or
/// this user and nobody else may write them.
fn check_directories(path: &Path) -> Result<(), String> {
    let real = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    let real_meta = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    check_owner(&real, &real_meta, "it")?;
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        check_owner(dir, &m, &dir.display().to_string())?;
    }
    Ok(())
}

/// `path` belongs to root or this user and nobody else may write it (a
/// directory with the sticky bit, such as /tmp, keeps others from
/// replacing what is in it, so its own mode may be open).
fn check_owner(path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<(), String> {
    owned_by_root_or_me(meta).map_err(|e| format!("{what} is {e}"))?;
    let mode = meta.permissions().mode();
    let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky_dir {
        return Err(format!(
            "{what} ({}) is writable by others (mode {:04o}): what runs as root would be \
             theirs to change; chmod go-w it",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// What gkvm trusts — its node configuration, the programs it names, the
/// migration key — belongs to root or to the user running gkvm.
pub(crate) fn owned_by_root_or_me(meta: &std::fs::Metadata) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "owned by uid {}, not by this user or root",
            meta.uid()
        ));
    }
    Ok(())
}

/// The highest system uid: `SYS_UID_MAX` of `/etc/login.defs`, else 999
/// (Debian's default).
fn sys_uid_max() -> u32 {
    std::fs::read_to_string("/etc/login.defs")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some("SYS_UID_MAX"))
                    .then(|| words.next()?.parse().ok())
                    .flatten()
            })
        })
        .unwrap_or(999)
}

/// `gkvm-node.toml(5)`, in roff.
pub(crate) fn page(version: &str) -> String {
    let mut out = format!(
        ".TH GKVM-NODE.TOML 5 \"\" \"gkvm {version}\" \"gkvm manual\"\n\
         .SH NAME\n\
         gkvm-node.toml \\- the configuration of a gkvm node\n\
         .SH SYNOPSIS\n\
         {DEFAULT_PATH}\n\
         .SH DESCRIPTION\n\
         What belongs to the node rather than to an instance: where gkvm keeps its \
         files, which programs it runs, the keys and certificates of migrations. \
         \\fBgkvm\\fR reads {DEFAULT_PATH} when it exists, or the file given by \
         \\fB--node-config\\fR or \\fBGKVM_NODE_CONFIG\\fR; flags and environment \
         variables override it. The file is TOML; every key is optional, and an \
         unknown key is an error naming it (\\fBgkvm verify\\fR reports it).\n\
         .PP\n\
         It chooses programs that run as root, so it must belong to root (or the user \
         running gkvm) and be writable by nobody else, as must every program it names \
         and the directories above them.\n\
         .SH KEYS\n"
    );
    for (key, example, what) in KEYS {
        out.push_str(&format!(
            ".TP\n.B {key}\n{}\n.br\nExample: {key} = {}\n",
            crate::hvparams_doc::roff(what),
            crate::hvparams_doc::roff(example)
        ));
    }
    out.push_str(".SH EXAMPLE\n.nf\n");
    for (key, example, _) in KEYS.iter().take(4) {
        out.push_str(&format!("{key} = {}\n", crate::hvparams_doc::roff(example)));
    }
    out.push_str(
        ".fi\n.SH SEE ALSO\n\\fBgkvm\\fR(1), \\fBgkvm-verify\\fR(1), \\fBgkvm-hvparams\\fR(7)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_lists_exactly_the_files_keys_and_each_example_parses() {
        let fields = serde_json::to_value(NodeConfig::default()).unwrap();
        let mut fields: Vec<&String> = fields.as_object().unwrap().keys().collect();
        fields.sort();
        let mut listed: Vec<String> = KEYS.iter().map(|(k, _, _)| (*k).to_owned()).collect();
        listed.sort();
        assert_eq!(fields.into_iter().cloned().collect::<Vec<_>>(), listed);
        for (key, example, _) in KEYS {
            let c: Result<NodeConfig, _> = toml::from_str(&format!("{key} = {example}"));
            assert!(c.is_ok(), "{key} = {example}");
        }
        let page = page("0");
        for (key, _, _) in KEYS {
            assert!(page.contains(&format!(".B {key}\n")), "{key}");
        }
    }

    fn parse(text: &str) -> Result<NodeConfig, String> {
        let c: NodeConfig = toml::from_str(text).map_err(|e| one_line(&e))?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn bad_keys_are_named() {
        let e = parse("run_dri = \"/x\"").unwrap_err();
        assert!(e.contains("run_dri"), "{e}");
        let e = parse("run_dir = 3").unwrap_err();
        assert!(e.contains("run_dir") || e.contains("string"), "{e}");
        let e = parse("kvm_path = \"qemu\"").unwrap_err();
        assert!(e.starts_with("kvm_path:"), "{e}");
        let e = parse("uid_pool = \"10-2\"").unwrap_err();
        assert!(e.starts_with("uid_pool:"), "{e}");
        let e = parse("tap_template = \"tap\"").unwrap_err();
        assert!(e.starts_with("tap_template:"), "{e}");
        let e = parse("nic_up_script = \"/nonexistent/ifup\"").unwrap_err();
        assert!(e.starts_with("nic_up_script:"), "{e}");
        // Programs that run as root: not a directory, not writable by
        // others, not owned by somebody else, not in a directory others
        // can write.
        let dir = std::env::temp_dir().join(format!("gkvm-nodecfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = dir.join("ifup");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = |p: &Path| format!("nic_up_script = \"{}\"", p.display());
        parse(&cfg(&script)).unwrap();
        let e = parse(&cfg(&dir)).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = parse(&cfg(&script)).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&script, Some(65534), None).unwrap();
        let e = parse(&cfg(&script)).unwrap_err();
        assert!(e.contains("owned by uid 65534"), "{e}");
        std::os::unix::fs::chown(&script, Some(0), None).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = parse(&cfg(&script)).unwrap_err();
        assert!(
            e.contains("writable by others") && e.contains(dir.to_str().unwrap()),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let e = parse("kvm_path = \"/nonexistent/qemu\"").unwrap_err();
        assert!(e.starts_with("kvm_path:"), "{e}");
        let e = parse("tap_template = \"-x%d\"").unwrap_err();
        assert!(e.starts_with("tap_template:"), "{e}");
        let e = parse("tap_template = \"a b%d\"").unwrap_err();
        assert!(e.starts_with("tap_template:"), "{e}");
        let e = parse("uid_pool = \"1-20999\"").unwrap_err();
        assert!(e.contains("system uids"), "{e}");
        let c = parse("uid_pool = \"20000-20999\"\nrun_dir = \"/run/x\"").unwrap();
        assert_eq!(c.uid_pool().unwrap().unwrap().last(), 20999);
    }
}
