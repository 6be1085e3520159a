//! What the CLI reads: the node's configuration, input files, and an
//! instance definition from `--file` and flags.

use std::path::{Path, PathBuf};

use hv_kvm::{Config, InstanceSpec, KvmHypervisor, RunDir};

use crate::{Cli, Failure, SpecArgs};

/// The node's hypervisor: flags and environment, then the node
/// configuration file, then the defaults.
pub(crate) fn hypervisor(cli: &Cli) -> Result<KvmHypervisor, Failure> {
    hypervisor_of(&NodeOptions {
        run_dir: cli.run_dir.clone(),
        node_config: cli.node_config.clone(),
        kvm_path: cli.kvm_path.clone(),
        migration_key: cli.migration_key.clone(),
    })
}

/// What a call says of the node (flags, or their `GKVM_*` variables).
#[derive(Clone, Debug, Default)]
pub(crate) struct NodeOptions {
    /// `--run-dir`.
    pub(crate) run_dir: Option<PathBuf>,
    /// `--node-config`.
    pub(crate) node_config: Option<PathBuf>,
    /// `--kvm-path`.
    pub(crate) kvm_path: Option<PathBuf>,
    /// `--migration-key`.
    pub(crate) migration_key: Option<PathBuf>,
}

/// [`hypervisor`] from the node options alone.
pub(crate) fn hypervisor_of(opts: &NodeOptions) -> Result<KvmHypervisor, Failure> {
    let node = crate::node_config::load(opts.node_config.as_deref())?;
    let run_dir = opts
        .run_dir
        .clone()
        .or_else(|| node.run_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR));
    let mut config = Config::new(RunDir::new(run_dir));
    config.kvm_path = opts.kvm_path.clone().or_else(|| node.kvm_path.clone());
    config.migration_key =
        migration_key(opts.migration_key.as_ref().or(node.migration_key.as_ref()))?;
    // The node's default run dir is tmpfs: its QEMU logs go where logs
    // outlive a reboot, as libvirt's do (/var/log/libvirt/qemu). A run
    // dir given elsewhere keeps them beside it, under log/.
    config.log_dir = node.log_dir.clone().or_else(|| {
        (config.run_dir.root() == Path::new(DEFAULT_RUN_DIR))
            .then(|| PathBuf::from(DEFAULT_LOG_DIR))
    });
    if let Some(d) = &node.state_dir {
        config.state_dir = d.clone();
    }
    if let Some(d) = &node.ovmf_dir {
        config.ovmf_dir = d.clone();
    }
    if let Some(p) = &node.swtpm_path {
        config.swtpm_path = p.clone();
    }
    config.migration_tls_dir = node.migration_tls_dir.clone();
    config.nic_script = node.nic_up_script.clone();
    config.nic_down_script = node.nic_down_script.clone();
    config.nic_communication_script = node.nic_communication_script.clone();
    config.uid_pool = node.uid_pool()?;
    if let Some(t) = &node.tap_template {
        config.tap_template = t.clone();
    }
    if let Some(p) = &node.spice_cacert {
        config.build_env.spice_cacert = p.clone();
    }
    if let Some(p) = &node.spice_cert {
        config.build_env.spice_cert = p.clone();
    }
    Ok(KvmHypervisor::new(config))
}

/// The run directory when neither a flag nor the node configuration
/// names one.
const DEFAULT_RUN_DIR: &str = "/run/gkvm";

/// Where QEMU's logs go with the default run directory, when the node
/// configuration names no log_dir.
const DEFAULT_LOG_DIR: &str = "/var/log/gkvm";

/// Where the nodes' shared migration key is looked for by default.
const DEFAULT_MIGRATION_KEY: &str = "/etc/gkvm/migration.key";

/// The migration key: `--migration-key`, else the default file if it
/// exists. A key others can read is no secret, and is refused.
fn migration_key(given: Option<&PathBuf>) -> Result<Option<Vec<u8>>, Failure> {
    let path = match given {
        Some(p) => p.clone(),
        None if Path::new(DEFAULT_MIGRATION_KEY).exists() => PathBuf::from(DEFAULT_MIGRATION_KEY),
        None => return Ok(None),
    };
    let fail = |e: String| Failure::from(format!("migration key {}: {e}", path.display()));
    let file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    let mode = std::os::unix::fs::MetadataExt::mode(&meta);
    // Whoever owns the key can read it, and rewrite it: root or this user.
    crate::node_config::owned_by_root_or_me(&meta).map_err(|e| fail(format!("{e}; chown it")))?;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "mode {:04o} lets others read it; chmod 600 it",
            mode & 0o7777
        )));
    }
    let key = hv_kvm::read_open_capped(file, &path, 4096).map_err(|e| fail(e.report()))?;
    let key: Vec<u8> = key.trim_ascii().to_vec();
    if key.len() < 16 {
        return Err(fail("shorter than 16 bytes".into()));
    }
    Ok(Some(key))
}

/// `--kvm-path`, else the node's default QEMU.
pub(crate) fn default_qemu(cli: &Cli) -> Result<PathBuf, Failure> {
    Ok(hypervisor(cli)?.default_kvm_path())
}

/// Largest input file read (instance definitions, migration info,
/// captured help text are a few KiB to a few hundred).
const MAX_INPUT_FILE: u64 = 4 << 20;

pub(crate) fn read_file(path: &Path, what: &str) -> Result<String, Failure> {
    let fail = |e: String| {
        Failure::new(
            1,
            "input",
            format!("cannot read {what} {}: {e}", path.display()),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let data =
        hv_kvm::read_open_capped(file, path, MAX_INPUT_FILE).map_err(|e| fail(e.report()))?;
    String::from_utf8(data).map_err(|_| fail("not UTF-8 text".into()))
}

/// Standard input as text, at most [`MAX_INPUT_FILE`] bytes (a pipe, a
/// file or the server's memory file).
pub(crate) fn read_stdin(what: &str) -> Result<String, Failure> {
    use std::io::Read as _;
    let fail = |e: String| Failure::new(1, "input", format!("cannot read {what} from stdin: {e}"));
    let mut data = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_INPUT_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| fail(e.to_string()))?;
    if data.len() as u64 > MAX_INPUT_FILE {
        return Err(fail(format!("larger than {MAX_INPUT_FILE} bytes")));
    }
    String::from_utf8(data).map_err(|_| fail("not UTF-8 text".into()))
}

pub(crate) fn load_instance(path: &Path) -> Result<InstanceSpec, Failure> {
    parse_instance(path, &read_file(path, "instance file")?)
}

/// A `-H` the command line got wrong: a usage error (exit 2, as a bad
/// `--nic` or `--memory`), of kind `params` (it names the parameter).
pub(crate) fn bad_hvparam(e: hv_kvm::CmdlineError) -> Failure {
    Failure::new(2, "params", e.to_string())
}

/// The instance definition `text` read from `path`.
fn parse_instance(path: &Path, text: &str) -> Result<InstanceSpec, Failure> {
    serde_json::from_str(text).map_err(|e| {
        Failure::new(
            1,
            "params",
            format!("{}: not a valid instance definition: {e}", path.display()),
        )
    })
}

/// `accept --current FILE`: the instance's definition on this node. Its
/// disks are this node's only when the file lists them (a `"disks"` key,
/// even empty): a definition without one leaves them to the migration
/// info.
pub(crate) fn load_current(path: &Path) -> Result<hv_kvm::CurrentConfig, Failure> {
    let text = read_file(path, "instance file")?;
    let spec = parse_instance(path, &text)?;
    let lists_disks = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .is_some_and(|v| v.get("disks").is_some());
    Ok(hv_kvm::CurrentConfig {
        hvparams: spec.hvparams,
        disks: lists_disks.then_some(spec.disks),
    })
}

/// `HOST:PORT`, `HOST`, `[V6]:PORT`, `[V6]` or a bare IPv6 address; no
/// port means the instance's `migration_port`.
pub(crate) fn split_host_port(s: &str) -> Result<(String, Option<u16>), Failure> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| usage(format!("{s:?}: no closing ]")))?;
        match tail {
            "" => (h, None),
            t => (
                h,
                Some(
                    t.strip_prefix(':')
                        .ok_or_else(|| usage(format!("{s:?}: expected [ADDRESS]:PORT")))?,
                ),
            ),
        }
    } else {
        match s.matches(':').count() {
            1 => s
                .split_once(':')
                .map(|(h, p)| (h, Some(p)))
                .unwrap_or((s, None)),
            _ => (s, None),
        }
    };
    if host.is_empty() {
        return Err(usage(format!("{s:?}: no host")));
    }
    let port = port
        .map(|p| {
            p.parse()
                .ok()
                .filter(|&n: &u16| n != 0)
                .ok_or_else(|| usage(format!("{s:?}: {p:?} is not a port (1-65535)")))
        })
        .transpose()?;
    Ok((host.to_owned(), port))
}

pub(crate) fn usage(message: String) -> Failure {
    Failure::new(2, "usage", message)
}

/// Memory of an instance given by flags alone, without `--memory`.
const DEFAULT_MEMORY_MIB: u64 = 512;

/// An instance from `--file` and/or flags; `defined` is the instance's
/// definition on this node, the base when there is no `--file`.
pub(crate) fn spec_from_args(
    a: &SpecArgs,
    defined: Option<InstanceSpec>,
) -> Result<InstanceSpec, Failure> {
    let mut spec = match (&a.file, &a.name, defined) {
        (Some(f), _, _) => load_instance(f)?,
        (None, Some(_), Some(d)) => d,
        (None, Some(n), None) => InstanceSpec::new(n.clone(), DEFAULT_MEMORY_MIB),
        (None, None, _) => return Err(usage("an instance name or --file is needed".into())),
    };
    if let Some(n) = &a.name {
        spec.name = n.clone();
    }
    if let Some(m) = a.memory {
        spec.memory = m;
    }
    if let Some(v) = a.vcpus {
        spec.vcpus = v;
    }
    if let Some(p) = a.port {
        spec.network_port = Some(p);
    }
    spec.tags.extend(a.tags.iter().cloned());
    for d in &a.disks {
        spec.disks.push(
            d.parse()
                .map_err(|e: hv_kvm::CmdlineError| usage(e.to_string()))?,
        );
    }
    for (i, n) in a.nics.iter().enumerate() {
        spec.nics.push(
            hv_kvm::NicSpec::parse_option(n, &spec.name, i).map_err(|e| usage(e.to_string()))?,
        );
    }
    for h in &a.hvparams {
        spec.hvparams
            .set_pair(h.strip_prefix("kvm:").unwrap_or(h))
            .map_err(bad_hvparam)?;
    }
    Ok(spec)
}
