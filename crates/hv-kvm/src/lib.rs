//! A KVM hypervisor driver for one node: the facade cluster software drives.
//!
//! `hv-kvm` does what Ganeti's KVM driver does — start QEMU from a typed
//! instance definition with TAP NICs, talk to it over QMP, report on it,
//! balloon, stop, reboot, pin vCPUs, migrate — by assembling four crates
//! that are useful alone: [`gkvm_tap`] (TAP devices), [`gkvm_qmp`] (QMP),
//! [`kvm_cmdline`] (hvparams, capabilities, argv) and [`kvm_runtime`]
//! (state on disk). Inputs and answers are serde types: their JSON is the
//! interface for cluster software.
//!
//! QEMU's capabilities are probed once per binary identity and cached on
//! disk, so a warm start forks nothing but QEMU itself.
#![deny(missing_docs)]

mod cgroup;
mod cpu;
mod definitions;
mod error;
mod events;
mod ganeti_runtime;
mod guard;
mod guest_agent;
mod helper;
mod hotplug;
mod lifecycle;
mod media;
mod migration;
mod nic;
mod ops;
pub mod probe;
mod process;
mod qemu_log;
mod query;
mod save;
mod start;
mod state;
mod stats;
pub mod trust;
mod types;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use definitions::{Definition, GuestOutcome, ShutdownAction};
pub use error::{report, Error, Result};
pub use hotplug::HotplugDevice;
pub use kvm_cmdline::Error as CmdlineError;
pub use kvm_cmdline::{
    parse_size_bytes, tap_template_problem, Capabilities, DeviceAddress, DiskMode, DiskSpec,
    HvParams, InstanceSpec, IoLimits, MacAddr, NicMode, NicSpec, Uuid, GKVM_HVPARAMS,
};
pub use kvm_runtime::fsutil::read_open_capped;
pub use kvm_runtime::human_duration;
pub use kvm_runtime::RunDir;
pub use kvm_runtime::UidPool;
pub use lifecycle::StopOutcome;
pub use migration::{parse_migration_info, CurrentConfig, MigrationStatus};
pub use nic::{is_instance_communication_tap, nic_script_env};
pub use ops::{
    api_schema, ErrorReply, MigrationMode, MigrationOutcome, Progress, Reply, Request, Response,
    StartMode, StopMode,
};
pub use save::{SaveHeader, SaveReport};
use serde::{Deserialize, Serialize};
pub use stats::{DiskStats, GuestMemoryStats, InstanceStats, NicStats, StatsOptions, VcpuStats};
pub use types::{
    ConsoleInfo, HelperInfo, InstanceInfo, InstanceState, MigrationState, NodeInfo, PowercyclePlan,
    StartReport, VerifyReport,
};

/// How a node's hypervisor is set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The run directory (`/run/gkvm`, or Ganeti's layout).
    pub run_dir: RunDir,
    /// A QEMU binary to use instead of each instance's `kvm_path`.
    pub kvm_path: Option<PathBuf>,
    /// Where capability probes are cached (default: `<run dir>/caps`).
    pub caps_cache_dir: Option<PathBuf>,
    /// How long an operation waits for another one on the same instance.
    pub lock_timeout: Duration,
    /// Default timeout of one QMP command.
    pub qmp_timeout: Duration,
    /// Node-wide inputs of the argv (SPICE certificates).
    pub build_env: kvm_cmdline::BuildEnv,
    /// The NIC up script (Ganeti's `kvm-ifup`, 3.1's `kvm-nic-setup`): run
    /// with the TAP name and Ganeti's environment, `ACTION=up`. Without
    /// one, gkvm configures each NIC natively (see [`nic_script_env`] for
    /// the environment and the `nic` module for what native means per mode).
    pub nic_script: Option<PathBuf>,
    /// The NIC down script (Ganeti 3.1's `kvm-ifdown`): run with the TAP
    /// name, the same environment and `ACTION=down` when a TAP goes away
    /// (stop, migration away, failed start). Without one, gkvm undoes
    /// natively what the kernel keeps (routing rules, Open vSwitch ports).
    pub nic_down_script: Option<PathBuf>,
    /// What configures a Ganeti 3.1 instance-communication NIC (a routed
    /// NIC whose TAP is `gnt.com.N`, Ganeti's `is_instance_communication_tap`)
    /// when there is no NIC up script: Ganeti's `/etc/ganeti/kvm-ifup-os`
    /// (the TAP's address 169.254.169.254, a host route, the node's
    /// dnsmasq), run as its `kvm-ifup` runs it. Without one, such a NIC's
    /// TAP is only brought up (it has no routing table to join).
    pub nic_communication_script: Option<PathBuf>,
    /// The uid pool for `security_model=pool`.
    pub uid_pool: Option<kvm_runtime::UidPool>,
    /// Kernel name template for TAP interfaces.
    pub tap_template: String,
    /// How long QEMU may take to initialize.
    pub start_timeout: Duration,
    /// Per-instance bound of `info_all`.
    pub info_timeout: Duration,
    /// Where each instance's QEMU log (`NAME.log`, 0600) is kept: QEMU's
    /// messages after it daemonized, and why it failed or died (default:
    /// `log/` under the run directory).
    pub log_dir: Option<PathBuf>,
    /// The node's migration TLS credentials (a directory with
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
    /// `client-cert.pem`, `client-key.pem`). With it, every migration to
    /// and from this node is encrypted and both peers' certificates are
    /// verified; a peer without TLS is refused.
    pub migration_tls_dir: Option<PathBuf>,
    /// How long an unplug waits for the guest to release the device.
    pub unplug_timeout: Duration,
    /// Where a node power-cycle writes `b` (the kernel's
    /// `/proc/sysrq-trigger`; tests point it at a file).
    pub sysrq_trigger: PathBuf,
    /// What a power-cycle runs when the sysrq trigger cannot be written
    /// (Ganeti 3.1's `reboot -n -f`).
    pub reboot_command: Vec<String>,
    /// The key shared by the nodes to seal migration info (HMAC-SHA256).
    /// With a key, `migration_info` seals and accepting refuses anything
    /// not sealed with it.
    pub migration_key: Option<Vec<u8>>,
    /// Whether to accept migration info that no shared key vouches for
    /// (this node has no `migration_key`). Off by default: the file says
    /// which disks and files the destination's QEMU opens as root, so one
    /// that passed through untrusted hands must not be taken; turn it on
    /// where the info travels over a channel that is already authenticated
    /// (Ganeti's node daemons), or where both ends are this node.
    pub trust_unsealed_migration_info: bool,
    /// Where per-instance state that outlives a run lives (a UEFI
    /// instance's variable store, `instances/NAME/nvram.fd`): not the run
    /// directory, which is tmpfs. Removed only by
    /// [`KvmHypervisor::remove_state`].
    pub state_dir: PathBuf,
    /// Where OVMF's images are (Debian's `ovmf`: `OVMF_CODE_4M.fd`,
    /// `OVMF_VARS_4M.fd`, and `.secboot`/`.ms` for Secure Boot).
    pub ovmf_dir: PathBuf,
    /// The TPM emulator (`tpm=tpm2`; Debian's `swtpm`), looked up in
    /// `PATH` when not absolute.
    pub swtpm_path: PathBuf,
    /// This node's values of node-local hvparams (see
    /// [`trust::NODE_LOCAL_HVPARAMS`]) that differ from the defaults: an
    /// incoming instance must have the same.
    pub node_hvparams: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// The defaults for a run directory.
    pub fn new(run_dir: RunDir) -> Config {
        Config {
            run_dir,
            kvm_path: None,
            caps_cache_dir: None,
            lock_timeout: Duration::from_secs(30),
            qmp_timeout: Duration::from_secs(10),
            build_env: kvm_cmdline::BuildEnv::default(),
            nic_script: None,
            nic_down_script: None,
            nic_communication_script: None,
            state_dir: PathBuf::from("/var/lib/gkvm"),
            ovmf_dir: PathBuf::from("/usr/share/OVMF"),
            swtpm_path: PathBuf::from("swtpm"),
            uid_pool: None,
            tap_template: "gkvm%d".into(),
            start_timeout: Duration::from_secs(60),
            info_timeout: Duration::from_secs(3),
            migration_key: None,
            trust_unsealed_migration_info: false,
            log_dir: None,
            migration_tls_dir: None,
            unplug_timeout: Duration::from_secs(30),
            sysrq_trigger: PathBuf::from("/proc/sysrq-trigger"),
            reboot_command: vec!["reboot".into(), "-n".into(), "-f".into()],
            node_hvparams: serde_json::Map::new(),
        }
    }
}

/// What a start of an instance would run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct LaunchPlan {
    /// The instance.
    pub instance: String,
    /// The full command line.
    pub argv: Vec<String>,
    /// The concrete machine type.
    pub machine: String,
    /// The QEMU version it was built for.
    pub qemu_version: String,
    /// Values that work but are rarely what one wants (Ganeti 3.1's
    /// parameter assessment), as `key: why`.
    pub warnings: Vec<String>,
}

/// The hypervisor of one node.
#[derive(Debug)]
pub struct KvmHypervisor {
    config: Config,
    caps: probe::CapsCache,
}

impl KvmHypervisor {
    /// A hypervisor over `config`.
    pub fn new(config: Config) -> KvmHypervisor {
        let dir = caps_dir(&config);
        KvmHypervisor {
            caps: probe::CapsCache::new(Some(dir)),
            config,
        }
    }

    /// Where capability probes are cached.
    pub fn caps_cache_dir(&self) -> PathBuf {
        caps_dir(&self.config)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The configuration, to adjust before use.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// The capability cache (for figures such as probes run).
    pub fn caps_cache(&self) -> &probe::CapsCache {
        &self.caps
    }

    /// The QEMU binary an instance uses: the configured override, else its
    /// `kvm_path`.
    pub fn kvm_path_for(&self, spec: &InstanceSpec) -> PathBuf {
        self.config
            .kvm_path
            .clone()
            .unwrap_or_else(|| spec.hvparams.kvm_path.clone())
    }

    /// Checks hypervisor parameters against this node (Ganeti's
    /// `ValidateParameters`): syntax first, then the QEMU they name (or
    /// the node's) and what it supports, users, addresses and files.
    pub async fn validate_params(&self, hvparams: &HvParams) -> Result<()> {
        let params = Error::NodeParams;
        hvparams.check_syntax().map_err(params)?;
        let mut hv = hvparams.clone();
        if let Some(p) = &self.config.kvm_path {
            hv.kvm_path = p.clone();
        }
        // The QEMU they name is theirs to get right: a binary that is not
        // there or does not answer is a kvm_path problem.
        let kvm_path = |reason: String| {
            Error::NodeParams(kvm_cmdline::Error::Host {
                key: "kvm_path".into(),
                reason,
            })
        };
        if !hv.kvm_path.is_file() {
            return Err(kvm_path(format!("{} is not a file", hv.kvm_path.display())));
        }
        let caps = self
            .capabilities(&hv.kvm_path)
            .await
            .map_err(|e| kvm_path(e.report()))?;
        hv.validate_host(&lifecycle::RealHost, &caps)
            .map_err(params)
    }

    /// The capabilities of a QEMU binary (cached per binary identity).
    pub async fn capabilities(&self, kvm_path: &std::path::Path) -> Result<Arc<Capabilities>> {
        self.caps.get(kvm_path).await
    }

    /// The command line a start of `spec` would run on this node, without
    /// starting anything (NIC descriptors numbered from 3, as a fresh
    /// process would get them).
    pub async fn plan(&self, spec: &InstanceSpec) -> Result<LaunchPlan> {
        let params = |e| Error::Params {
            instance: spec.name.clone(),
            source: e,
        };
        spec.validate().map_err(params)?;
        spec.hvparams.check_syntax().map_err(params)?;
        let kvm_path = self.kvm_path_for(spec);
        let caps = self.capabilities(&kvm_path).await?;
        let mut spec = spec.clone();
        spec.hvparams.kvm_path = kvm_path;
        spec.shape_new(&caps).map_err(params)?;
        let env = media::build_env_for(&self.config.build_env, &spec.hvparams);
        let cmd = kvm_cmdline::build(&spec, &caps, &env).map_err(params)?;
        let paths = self
            .config
            .run_dir
            .instance(&spec.name)
            .map_err(|e| Error::Runtime {
                instance: spec.name.clone(),
                source: e,
            })?;
        let virtio = nic::is_virtio(&spec, &caps);
        let queues = i32::from(nic::queues(&spec, virtio));
        let vhost = kvm_cmdline::uses_vhost(&spec.hvparams);
        let mut next_fd = 3;
        let mut take = |n: i32| {
            next_fd += n;
            (next_fd - n..next_fd).collect::<Vec<i32>>()
        };
        let nics = spec
            .nics
            .iter()
            .map(|_| kvm_cmdline::NicBackend {
                tap_fds: take(queues),
                vhost_fds: if vhost { take(queues) } else { Vec::new() },
            })
            .collect();
        let launch = kvm_cmdline::Launch {
            node: node_paths(
                &paths,
                Some(self.instance_log(&spec.name)),
                self.firmware_files(&spec),
            ),
            paused: true,
            daemonize: true,
            incoming: None,
            nics,
            pool_user: None,
            migration_tls: self.config.migration_tls_dir.clone(),
        };
        let argv = cmd.launch_argv(&spec, &caps, &launch).map_err(params)?;
        Ok(LaunchPlan {
            instance: spec.name.clone(),
            argv,
            machine: cmd.machine,
            qemu_version: caps.version.text.clone(),
            warnings: spec
                .hvparams
                .assess()
                .into_iter()
                .map(|w| format!("{}: {}", w.key, w.message))
                .collect(),
        })
    }
}

fn caps_dir(config: &Config) -> PathBuf {
    config
        .caps_cache_dir
        .clone()
        .unwrap_or_else(|| config.run_dir.root().join("caps"))
}

/// The node paths of an instance, as the argv builder wants them.
pub(crate) fn node_paths(
    p: &kvm_runtime::InstancePaths,
    log: Option<PathBuf>,
    firmware: Option<kvm_cmdline::FirmwareFiles>,
) -> kvm_cmdline::NodePaths {
    kvm_cmdline::NodePaths {
        log,
        firmware,
        pidfile: p.pid.clone(),
        qmp: p.qmp.clone(),
        qmp_watch: Some(p.qmp_watch.clone()),
        serial: p.serial.clone(),
        guest_agent: p.guest_agent.clone(),
        chroot: p.chroot.clone(),
        keymap: p.keymap.clone(),
        events: Some(p.events.clone()),
        tpm: Some(p.tpm.clone()),
    }
}

/// Whether a process is alive (a zombie is dead).
pub fn process_alive(pid: i32) -> bool {
    !kvm_runtime::is_zombie_or_gone(pid)
}

/// Whether `/dev/vhost-net` can be opened.
pub fn vhost_net_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(crate::nic::VHOST_NET)
        .is_ok()
}

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
