//! `gkvm`: run and manage KVM virtual machines on this node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that returns write errors instead of panicking (a closed
/// pipe, a full disk).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err(Failure::output)
    }};
}

/// `eprintln!` that never panics (stderr may be closed too).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod api_doc;
mod commands;
mod complete;
mod console;
mod demo;
mod demo_guest;
mod exporter;
mod hvparams_doc;
mod input;
mod manpages;
mod node_config;
mod render;
mod serve;

pub(crate) const EXAMPLES: &str = "\
Examples:
  gkvm demo                         boot, inspect, balloon, migrate and stop a tiny guest
  gkvm start web1 --memory 512 --vcpus 2 --disk /dev/vg/web1 --nic bridge=br0 -H kernel_path=/boot/vmlinuz
  gkvm start --file web1.json --paused
  gkvm define web1 --memory 1G --disk /srv/web1.img --nic bridge=br0 --autostart
  gkvm start web1                   from its definition (gkvm list --all shows it)
  gkvm autostart web1 --disable
  gkvm undefine web1
  gkvm list                         running instances, as a table
  gkvm list --all -o name,state,memory --no-headers --separator :
  gkvm stats --prometheus --listen 127.0.0.1:9177
  gkvm nic-add web1 --nic bridge=br1
  gkvm disk-add web1 --disk /dev/vg/web1-data
  gkvm disk-grow web1 1 40G
  gkvm set-limits web1 cgroup_cpu_quota=150 cgroup_memory_max=2048
  gkvm save web1 /var/lib/gkvm/web1.save
  gkvm restore /var/lib/gkvm/web1.save
  gkvm guests-stop --save --timeout 300   what gkvm-guests.service runs at shutdown
  gkvm guests-start                 ... and at boot
  gkvm info web1 --json
  gkvm balloon web1 384
  gkvm console web1                 serial console; ^] detaches
  gkvm stop web1                    ACPI power button, waits up to 120 s
  gkvm stop web1 --force
  gkvm migration-info web1 > web1.mig; scp web1.mig node2:
  node2# gkvm accept web1.mig --listen 192.0.2.2:8102
  gkvm migrate web1 --to 192.0.2.2:8102
  gkvm caps                         what the installed QEMU supports
  gkvm caps --json --kvm-path /usr/bin/qemu-system-x86_64
  gkvm caps --help-text help.txt --machine-text machines.txt --device-text devices.txt
  gkvm argv web1.json               the QEMU command line a start would run
  gkvm completions bash > /etc/bash_completion.d/gkvm";

#[derive(Parser)]
#[command(name = "gkvm", version, about = "Run and manage KVM virtual machines", after_help = EXAMPLES)]
struct Cli {
    /// The node's run directory [default: the node configuration's
    /// run_dir, else /run/gkvm].
    #[arg(long, global = true, env = "GKVM_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// The node's configuration file (TOML: run dir, default QEMU, NIC
    /// scripts, uid pool, certificates) [default: /etc/gkvm/node.toml when
    /// it exists].
    #[arg(long, global = true, env = "GKVM_NODE_CONFIG", value_name = "FILE")]
    node_config: Option<PathBuf>,
    /// QEMU binary to use instead of the instance's kvm_path.
    #[arg(long, global = true, env = "GKVM_KVM_PATH")]
    kvm_path: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// More logging on stderr (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// A name this node does not know is not an error where the goal
    /// holds anyway (stop, cleanup, remove-state, undefine): for scripts
    /// and cluster software that repeat an operation. Without it, such a
    /// name is an error (a typo), as in virsh.
    #[arg(long, global = true)]
    idempotent: bool,
    /// The key the nodes share to seal migration info (default
    /// /etc/gkvm/migration.key when it exists; mode 0600).
    #[arg(long, global = true, env = "GKVM_MIGRATION_KEY", value_name = "FILE")]
    migration_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a QEMU binary supports (probed, or parsed from captured text).
    Caps {
        /// Parse this captured `--help` output instead of running QEMU.
        #[arg(long, value_name = "FILE")]
        help_text: Option<PathBuf>,
        /// Captured `-machine ?` output (with --help-text).
        #[arg(long, value_name = "FILE", requires = "help_text")]
        machine_text: Option<PathBuf>,
        /// Captured `-device ?` output (with --help-text).
        #[arg(long, value_name = "FILE", requires = "help_text")]
        device_text: Option<PathBuf>,
    },
    /// Print the QEMU command line that starting an instance would run (dry run).
    Argv {
        /// The instance definition (JSON).
        instance: PathBuf,
    },
    /// Start an instance (from a JSON file, or from flags).
    Start(StartArgs),
    /// Define an instance on this node (or change its definition): it then
    /// starts by name, shows in `list --all`, and may start at boot.
    ///
    /// The definition is kept in the node's state_dir
    /// (/var/lib/gkvm/definitions/NAME.json), validated before it is
    /// written. Flags given for a defined instance change its definition.
    Define {
        #[command(flatten)]
        spec: SpecArgs,
        /// Start it when the node boots (`gkvm guests-start`, run by
        /// gkvm-guests.service).
        #[arg(long, conflicts_with = "no_autostart")]
        autostart: bool,
        /// Do not start it at boot.
        #[arg(long)]
        no_autostart: bool,
    },
    /// Remove an instance's definition (a running instance runs on).
    Undefine {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// Also remove its managed save and what it keeps between runs
        /// (UEFI variables, TPM state); refused while it runs.
        #[arg(long)]
        remove_state: bool,
    },
    /// Start a defined instance when the node boots, or with --disable no
    /// longer.
    Autostart {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// The node's boot (gkvm-guests.service): restore every managed save
    /// and start every autostart instance that is not running.
    GuestsStart,
    /// The node's shutdown (gkvm-guests.service): stop every running
    /// instance at once (ACPI power button; killed after --timeout), or
    /// with --save save the defined ones for their next start.
    GuestsStop {
        /// Seconds each guest may take to power off before it is killed.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Save defined instances (state_dir/saved/NAME.save) instead of
        /// stopping them; their next start restores them.
        #[arg(long)]
        save: bool,
    },
    /// Stop an instance: ACPI power button and wait, or --force to kill.
    Stop {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// Kill QEMU instead of pressing the power button.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off (0: press the button and return).
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Reboot an instance (reset in place, or restart with reboot_behavior=exit).
    Reboot {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The instance's current definition (JSON): a restart
        /// (reboot_behavior=exit) takes keymap, password files, chroot and
        /// security settings from it, everything else from the running
        /// instance.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Save a running instance into FILE and stop it.
    ///
    /// `restore` brings it back where it was. FILE must not exist; it is
    /// made 0600 and only ever complete: a save that fails or is
    /// interrupted leaves no file and the guest running.
    Save {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The file to make.
        file: PathBuf,
    },
    /// Bring back an instance saved with `save`.
    ///
    /// The same devices (TAPs made anew), the guest running on from where
    /// it was. The file is kept; a partial, changed or foreign file is
    /// refused.
    Restore {
        /// The saved instance's file.
        file: PathBuf,
    },
    /// Resume a paused instance.
    Resume {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Remove what a stopped instance left behind.
    Cleanup {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Remove what an instance keeps on this node between runs (its UEFI
    /// variable store and its TPM's state, under the node's state_dir);
    /// refused while it runs.
    RemoveState {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Hand running instances over to Ganeti 3.1's own KVM driver without
    /// restarting them (a node rolled back from gkvm): their runtime files
    /// in the driver's format, gkvm's own files removed.
    ReleaseToGaneti {
        /// The instances (or give --all).
        names: Vec<String>,
        /// Every running instance of the run directory.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// List running instances from the node's records, without asking
    /// each QEMU (`info` asks: paused, balloon size, live vCPUs).
    List {
        /// Also the instances defined on this node that are not running
        /// (state shut-off), with an AUTOSTART column.
        #[arg(long, short = 'a')]
        all: bool,
        /// The columns, comma-separated (name, state, pid, memory, vcpus,
        /// cpu-time, autostart, reason); with a leading +, added to the
        /// default ones.
        #[arg(short = 'o', long = "output", value_name = "FIELDS")]
        output: Option<String>,
        /// No header line.
        #[arg(long)]
        no_headers: bool,
        /// Join fields with SEP instead of aligning them (for scripts).
        #[arg(long, value_name = "SEP")]
        separator: Option<String>,
        /// Memory in m (MiB), g (GiB) or t (TiB) as plain numbers, or h
        /// (whatever reads best, with its unit; the default).
        #[arg(long, value_enum)]
        units: Option<render::Units>,
    },
    /// Show instances (all when no name is given).
    Info {
        /// Instances to show.
        #[arg(add = complete::instances())]
        names: Vec<String>,
    },
    /// Per-instance counters (all running when no name is given): vCPU
    /// times, QEMU's resident memory, block and NIC counters, balloon.
    Stats {
        /// Instances to show.
        #[arg(add = complete::instances())]
        names: Vec<String>,
        /// In Prometheus's text format (node_exporter's textfile
        /// collector), not JSON or a table.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
        /// With --prometheus: serve them over HTTP at ADDR:PORT
        /// (`GET /metrics`, read afresh at each scrape) until stopped,
        /// instead of printing them once. Opt-in; bind to an address
        /// only your Prometheus reaches (e.g. 127.0.0.1:9177).
        #[arg(long, value_name = "ADDR:PORT", requires = "prometheus")]
        listen: Option<std::net::SocketAddr>,
        /// Also QEMU's proportional memory (PSS). The kernel walks QEMU's
        /// page tables for it: about 0.35 ms per instance, where the rest
        /// of an instance's counters cost microseconds.
        #[arg(long)]
        pss: bool,
    },
    /// Set an instance's memory through the balloon.
    Balloon {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// Target memory: MiB, or with a suffix (512M, 1G).
        #[arg(value_parser = mib_arg)]
        mib: u64,
    },
    /// Plug a NIC into a running instance (at a free PCI slot; the guest
    /// sees it at once).
    NicAdd {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The NIC, as start's --nic: bridge=BR | routed=TABLE,ip=A |
        /// ovs=SWITCH | ext=LINK, with ,mac=..,vlan=.. (a MAC is made up
        /// when none is given); or a NIC of the JSON instance definition
        /// (`{"mac": .., "mode": .., "link": .., "uuid": ..}`).
        #[arg(long, value_name = "MODE=LINK[,mac=M][,ip=A][,vlan=V]")]
        nic: String,
        /// Check it and say where it would go (device id, PCI slot);
        /// change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move a running NIC to another bridge, routing table or switch (or
    /// change its IP or VLAN) without the guest noticing.
    NicModify {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The NIC's device id or index.
        id: String,
        /// The new connection, as --nic, text or JSON (its MAC is kept).
        #[arg(long, value_name = "MODE=LINK[,ip=A][,vlan=V]")]
        nic: String,
    },
    /// Unplug a NIC from a running instance (by the device id nic-add
    /// printed, or its index).
    NicRemove {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The NIC's device id or index.
        id: String,
    },
    /// Plug a disk into a running instance (virtio or SCSI, as its
    /// disk_type says).
    DiskAdd {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The disk, as start's --disk: PATH, PATH:ro or a storage URI; or a
        /// disk of the JSON instance definition (`{"path": .., "mode":
        /// "ro", "uuid": ..}`).
        #[arg(long, value_name = "PATH[:ro]")]
        disk: String,
        /// Check it and say where it would go (device id, PCI slot);
        /// change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Unplug a disk from a running instance (by the device id disk-add
    /// printed, or its index).
    DiskRemove {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The disk's device id or index.
        id: String,
    },
    /// Grow a disk of a running instance (a file image grows with it; grow
    /// a block device first).
    DiskGrow {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The disk's device id or index.
        id: String,
        /// The new size: bytes, or with K, M, G or T (powers of 1024).
        size: String,
    },
    /// Change a running instance's cgroup limits, live (a restart and a
    /// migration keep them; 0 lifts one).
    SetLimits {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// Limits as KEY=VALUE: cgroup_cpu_quota (percent of a CPU),
        /// cgroup_cpu_weight, cgroup_memory_max and cgroup_memory_high
        /// (MiB), cgroup_pids_max, cgroup_io_weight.
        limits: Vec<String>,
    },
    /// Set the block I/O limits of a throttle group of a running instance,
    /// live (its disks are throttled anew at once; a restart and a
    /// migration keep them). Limits not given are lifted.
    IoLimits {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The throttle group (of the instance's io_limits).
        group: String,
        /// Limits as KEY=VALUE: iops-total, iops-read, iops-write,
        /// bps-total, bps-read, bps-write (sizes take K, M, G, T),
        /// iops-total-max, bps-total-max (bursts) and their -max-length
        /// (seconds).
        limits: Vec<String>,
    },
    /// Check that devices can be hot-plugged into a running instance
    /// (exit 0), or say why not.
    HotplugSupported {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Show the node's memory, CPUs and QEMU version.
    NodeInfo,
    /// Attach this terminal to an instance's serial console (^] detaches).
    Console {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Show how to reach an instance's console.
    ConsoleInfo {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Check the node: its configuration file, QEMU, /dev/kvm,
    /// /dev/net/tun, the run directory; with -H, also assess those
    /// hvparams (Ganeti 3.1's warnings).
    Verify {
        /// Hypervisor parameters to check and assess, as Ganeti's -H
        /// kvm:key=value (repeatable).
        #[arg(short = 'H', long = "hvparam", value_name = "KEY=VALUE", add = complete::hvparams())]
        hvparams: Vec<String>,
    },
    /// Power-cycle this node at once, without stopping its instances
    /// (fencing, as Ganeti's `gnt-node powercycle`): sync, sysrq `b`, else
    /// `reboot -n -f`.
    PowercycleNode {
        /// Yes: reboot this node now.
        #[arg(long, conflicts_with = "dry_run")]
        confirm: bool,
        /// Only show what would be written where.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print what a migration target needs (the source's runtime, JSON).
    MigrationInfo {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// In a form Ganeti 3.1's own KVM driver accepts too (Ganeti's
        /// runtime list, gkvm's info inside it), for a cluster whose
        /// nodes switch to gkvm one by one; not sealed.
        #[arg(long)]
        for_ganeti: bool,
    },
    /// Receive an instance: start it waiting for the migration, wait until
    /// it has landed, then resume it (or clean up if it failed).
    Accept {
        /// The source's migration info (or an instance definition), JSON.
        info: PathBuf,
        /// Address and port to listen on (never 0.0.0.0 unless you say so);
        /// without a port, the instance's migration_port hvparam.
        #[arg(long, value_name = "ADDR[:PORT]")]
        listen: String,
        /// Seconds to wait for the migration.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// This node's value of a node-local hvparam (kvm_extra,
        /// security_model, ...) that the incoming instance may have
        /// (repeatable); any other value in the file is refused.
        #[arg(short = 'H', long = "hvparam", value_name = "KEY=VALUE", add = complete::hvparams())]
        hvparams: Vec<String>,
        /// Return once QEMU listens (Ganeti's AcceptInstance); then
        /// `finalize-migration NAME --destination`.
        #[arg(long)]
        no_wait: bool,
        /// This node's definition of the instance (JSON, as `start
        /// --file`): what may change on a move (keymap, password files,
        /// chroot, security) comes from it, and, when it lists disks,
        /// each disk's path on this node (the file then chooses no host
        /// file QEMU opens).
        #[arg(long, value_name = "FILE")]
        current: Option<PathBuf>,
        /// Accept a file no migration key vouches for (this node has no
        /// migration_key). The file says which disks and files QEMU opens
        /// here as root: say so only where it came over a channel you
        /// trust.
        #[arg(long)]
        trust_unsealed: bool,
    },
    /// Live-migrate an instance to a node where `gkvm accept` waits.
    Migrate {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// The target, as given to its `gkvm accept --listen`; without a
        /// port, the instance's migration_port hvparam.
        #[arg(long, value_name = "HOST[:PORT]")]
        to: String,
        /// Pause the guest for the whole transfer.
        #[arg(long)]
        non_live: bool,
        /// Leave the source for `finalize-migration NAME --source` (Ganeti's
        /// MigrateInstance): it stays, never to run again if the
        /// migration completed.
        #[arg(long)]
        no_finalize: bool,
    },
    /// Ganeti's last migration step, on either side: the source is stopped
    /// (completed) or runs again (failed); the destination runs (completed)
    /// or is removed (failed).
    FinalizeMigration {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
        /// This is the source.
        #[arg(
            long,
            conflicts_with = "destination",
            required_unless_present = "destination"
        )]
        source: bool,
        /// This is the destination.
        #[arg(long)]
        destination: bool,
        /// The migration failed (default: it completed).
        #[arg(long)]
        failed: bool,
    },
    /// Show the migration of an instance now.
    MigrationStatus {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Cancel the running migration of an instance (it keeps running here).
    MigrateCancel {
        /// The instance.
        #[arg(add = complete::instances())]
        name: String,
    },
    /// Boot a built-in tiny instance and show what gkvm does, step by step.
    ///
    /// Its guest: the source tree's test guest (scripts/build-test-guest)
    /// when there is one, else one made of this host's own kernel (/boot,
    /// /lib/modules) and Debian's busybox-static, kept in the node's
    /// state_dir (demo-guest/).
    Demo {
        /// A guest directory (a kernel and an initramfs, as
        /// scripts/build-test-guest makes).
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Run the Linux guest on KVM instead of TCG.
        #[arg(long)]
        kvm: bool,
    },
    /// Print the script that gives a shell gkvm's completions: commands,
    /// options, instance names of this node and hvparam keys, asked of
    /// `gkvm` (on PATH) at each completion.
    Completions {
        /// bash, zsh, fish, ...
        shell: clap_complete::Shell,
    },
    /// Carry out one request of gkvm's typed API (JSON, schema
    /// schemas/v1/api.json) read from FILE or stdin; the answer is JSON
    /// Lines on stdout: progress lines, then one response or error.
    Api {
        /// The request (default: stdin).
        file: Option<PathBuf>,
        /// Print the API's JSON Schema instead.
        #[arg(long, conflicts_with = "file")]
        schema: bool,
        /// Print the API reference (Markdown, docs/API.md) instead.
        #[arg(long, conflicts_with_all = ["file", "schema"])]
        reference: bool,
    },
    /// Answer gkvm commands over a Unix socket, each in a forked child
    /// (no process start per call: for cluster software that calls often)
    Serve {
        /// The socket (0600; a lock file beside it keeps one server per socket).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Exit after this many seconds without a call (default: never).
        #[arg(long, value_name = "SECS")]
        idle_exit: Option<u64>,
        /// Return once the socket listens; the server goes on in the background.
        #[arg(long)]
        detach: bool,
    },
    /// Write the manual pages (gkvm.1, one per subcommand,
    /// gkvm-hvparams.7 and gkvm-node.toml.5) into DIR.
    #[command(hide = true)]
    Manpages {
        /// Where to write them.
        dir: PathBuf,
    },
}

impl Command {
    /// What the command does, for "X succeeded, but..." and "X interrupted".
    fn describe(&self) -> String {
        let (verb, name): (&str, Option<&str>) = match self {
            Command::Start(a) => ("start", a.spec.name.as_deref()),
            Command::Define { spec, .. } => ("define", spec.name.as_deref()),
            Command::Undefine { name, .. } => ("undefine", Some(name)),
            Command::Autostart { name, .. } => ("autostart", Some(name)),
            Command::GuestsStart => ("guests-start", None),
            Command::GuestsStop { .. } => ("guests-stop", None),
            Command::Stop { name, .. } => ("stop", Some(name)),
            Command::Reboot { name, .. } => ("reboot", Some(name)),
            Command::Resume { name } => ("resume", Some(name)),
            Command::Cleanup { name } => ("cleanup", Some(name)),
            Command::RemoveState { name } => ("remove-state", Some(name)),
            Command::Balloon { name, .. } => ("balloon", Some(name)),
            Command::Migrate { name, .. } => ("migrate", Some(name)),
            Command::NicAdd { name, .. } => ("nic-add", Some(name)),
            Command::NicModify { name, .. } => ("nic-modify", Some(name)),
            Command::DiskAdd { name, .. } => ("disk-add", Some(name)),
            Command::DiskRemove { name, .. } => ("disk-remove", Some(name)),
            Command::DiskGrow { name, .. } => ("disk-grow", Some(name)),
            Command::IoLimits { name, .. } => ("io-limits", Some(name)),
            Command::SetLimits { name, .. } => ("set-limits", Some(name)),
            Command::NicRemove { name, .. } => ("nic-remove", Some(name)),
            Command::MigrateCancel { name } => ("migrate-cancel", Some(name)),
            Command::Accept { .. } => ("accept", None),
            Command::FinalizeMigration { name, .. } => ("finalize-migration", Some(name)),
            Command::Demo { .. } => ("demo", None),
            _ => ("the command", None),
        };
        match name {
            Some(n) => format!("{verb} of {}", escape_controls(n)),
            None => verb.to_owned(),
        }
    }
}

#[derive(clap::Args)]
struct SpecArgs {
    /// Instance name (or give --file).
    #[arg(add = complete::instances())]
    name: Option<String>,
    /// Instance definition (JSON); flags given beside it override its
    /// fields. Without it, a NAME defined on this node (`gkvm define`)
    /// starts from its definition.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Memory: MiB, or with a suffix (512M, 1G).
    #[arg(long, value_parser = mib_arg)]
    memory: Option<u64>,
    /// Virtual CPUs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// A disk: PATH or PATH:ro, or a storage URI QEMU opens itself
    /// (nbd://HOST:PORT/EXPORT with the port optional, rbd:POOL/IMAGE, gluster://,
    /// iscsi://) (repeatable).
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    disks: Vec<String>,
    /// A NIC: bridge=BR | routed=TABLE | ovs=SWITCH | ext=LINK, with
    /// ,mac=..,ip=..,vlan=.. (repeatable).
    #[arg(long = "nic", value_name = "MODE=LINK[,mac=M][,ip=A][,vlan=V]")]
    nics: Vec<String>,
    /// A hypervisor parameter, as Ganeti's -H kvm:key=value (repeatable).
    #[arg(short = 'H', long = "hvparam", value_name = "KEY=VALUE", add = complete::hvparams())]
    hvparams: Vec<String>,
    /// Tags (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// VNC/SPICE TCP port.
    #[arg(long)]
    port: Option<u16>,
}

impl SpecArgs {
    /// Whether any flag says something of the instance (beyond its name).
    fn changes_spec(&self) -> bool {
        self.file.is_some()
            || self.memory.is_some()
            || self.vcpus.is_some()
            || self.port.is_some()
            || !self.disks.is_empty()
            || !self.nics.is_empty()
            || !self.hvparams.is_empty()
            || !self.tags.is_empty()
    }
}

#[derive(clap::Args)]
struct StartArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Leave the vCPUs stopped.
    #[arg(long)]
    paused: bool,
    /// Check the instance against this node's QEMU and print the command
    /// line the start would run (as `gkvm argv`); start nothing.
    #[arg(long)]
    dry_run: bool,
}

/// A failure: exit code 1 (operation) or 2 (usage), one line on stderr
/// (a JSON object with `--json`).
struct Failure {
    code: u8,
    /// Machine-readable kind (`hv_kvm::Error::kind`, or `usage`, ...).
    kind: &'static str,
    /// The instance concerned, when there is one.
    instance: Option<String>,
    message: String,
    /// Writing the output failed (the operation itself may have succeeded).
    output: Option<std::io::Error>,
}

impl Failure {
    /// The failure as the API tells it (an `error` reply line).
    fn reply(&self) -> hv_kvm::ErrorReply {
        hv_kvm::ErrorReply {
            kind: self.kind.to_owned(),
            instance: self.instance.clone(),
            message: self.message.clone(),
        }
    }

    fn new(code: u8, kind: &'static str, message: String) -> Failure {
        Failure {
            code,
            kind,
            instance: None,
            message,
            output: None,
        }
    }

    fn output(e: std::io::Error) -> Failure {
        Failure {
            output: Some(e),
            ..Failure::new(1, "output", String::new())
        }
    }
}

impl From<hv_kvm::Error> for Failure {
    fn from(e: hv_kvm::Error) -> Failure {
        Failure {
            instance: e.instance().map(str::to_owned),
            ..Failure::new(1, e.kind(), e.report())
        }
    }
}

impl From<hv_kvm::CmdlineError> for Failure {
    fn from(e: hv_kvm::CmdlineError) -> Failure {
        Failure::new(1, "params", e.to_string())
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(1, "failed", message)
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Failure {
        Failure::new(1, "internal", e.to_string())
    }
}

impl From<tokio::task::JoinError> for Failure {
    fn from(e: tokio::task::JoinError) -> Failure {
        Failure::new(1, "internal", e.to_string())
    }
}

type CliResult = Result<(), Failure>;

/// Control characters from names, paths or QEMU are shown escaped, so an
/// error stays one line and cannot rewrite the terminal.
fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The exit of a command that failed: one line on stderr, or with
/// `--json` one JSON object (schemas/v1/error.json).
fn report_failure(mut f: Failure, succeeded: &str, json: bool) -> u8 {
    match f.output.take() {
        // The reader went away (`gkvm list | head -1`): end quietly.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return 0,
        Some(e) => f.message = format!("{succeeded}, but writing its output failed: {e}"),
        None => {}
    }
    if json {
        let obj = serde_json::json!({
            "kind": f.kind,
            "instance": f.instance,
            "message": f.message,
            "exit_code": f.code,
        });
        errln!("{obj}");
    } else {
        errln!("gkvm: error: {}", escape_controls(&f.message));
    }
    f.code
}

fn main() -> ExitCode {
    // A shell asking for completions (COMPLETE=bash gkvm -- ...): answer
    // and exit.
    complete::answer();
    ExitCode::from(run(std::env::args_os().collect(), None))
}

/// What `gkvm serve` prepares in a child before a call comes.
pub(crate) struct Prepared {
    /// The command line parser, built.
    pub(crate) parser: clap::Command,
    /// The runtime the command will run on, if it could be built.
    pub(crate) runtime: Option<tokio::runtime::Runtime>,
    /// The server's run directory and node configuration, which every
    /// call it serves uses.
    pub(crate) pinned: serve::Pinned,
}

impl Cli {
    /// The options that fall back to a variable, from this process's
    /// environment now: a parser built ahead (the server's) read the
    /// variables when it was built, before a call set the caller's.
    fn refresh_env(&mut self, matches: &clap::ArgMatches) {
        use clap::parser::ValueSource;
        for (id, var, field) in [
            ("run_dir", "GKVM_RUN_DIR", &mut self.run_dir),
            ("node_config", "GKVM_NODE_CONFIG", &mut self.node_config),
            ("kvm_path", "GKVM_KVM_PATH", &mut self.kvm_path),
            (
                "migration_key",
                "GKVM_MIGRATION_KEY",
                &mut self.migration_key,
            ),
        ] {
            if matches.value_source(id) != Some(ValueSource::CommandLine) {
                *field = std::env::var_os(var)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from);
            }
        }
    }
}

/// What became of a command line run by [`run_prepared`].
pub(crate) enum Ran {
    /// It ran (or was refused as a usage error): its exit code.
    Exit(u8),
    /// Not run: it names another run directory or node configuration
    /// than the server's (the message says which).
    NotServed(String),
}

/// The runtime of one command.
fn new_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs one gkvm command line (`argv[0]` is the program's name); returns
/// its exit code. `gkvm serve` calls it in each forked child, with the
/// parser it built before forking (building it is most of the cost of
/// parsing a command line) and a runtime built before the call came.
fn run(argv: Vec<std::ffi::OsString>, prepared: Option<Prepared>) -> u8 {
    match run_prepared(argv, prepared) {
        Ran::Exit(code) => code,
        Ran::NotServed(_) => 2,
    }
}

/// [`run`], for the server's children: a command line that names another
/// run directory or node configuration than the server's is not run.
pub(crate) fn run_prepared(argv: Vec<std::ffi::OsString>, prepared: Option<Prepared>) -> Ran {
    use clap::{CommandFactory, FromArgMatches};
    let json_asked = argv.iter().any(|a| a == "--json");
    let served = prepared.is_some();
    let (parser, runtime, pinned) = prepared.map_or((None, None, None), |p| {
        (Some(p.parser), p.runtime, Some(p.pinned))
    });
    let mut parser = parser.unwrap_or_else(Cli::command);
    let parsed = parser.try_get_matches_from_mut(argv).and_then(|m| {
        let mut cli = Cli::from_arg_matches(&m)?;
        if served {
            cli.refresh_env(&m);
        }
        Ok(cli)
    });
    let mut cli = match parsed {
        Ok(cli) => cli,
        Err(e) => return Ran::Exit(usage_error(e.format(&mut parser), json_asked)),
    };
    if served {
        // A served child exits right after this command: freeing the
        // parser's thousands of allocations would only delay the answer.
        std::mem::forget(parser);
    }
    if let Some(pinned) = pinned {
        if let Err(why) = pinned.apply(&mut cli.run_dir, &mut cli.node_config) {
            return Ran::NotServed(why);
        }
    }
    Ran::Exit(run_cli(cli, runtime))
}

/// Runs a parsed command line on `runtime` (a new one when none).
fn run_cli(cli: Cli, runtime: Option<tokio::runtime::Runtime>) -> u8 {
    if let Command::Serve {
        socket,
        idle_exit,
        detach,
    } = &cli.command
    {
        // Before logging and the runtime: the server stays single-threaded
        // so that it can fork.
        let idle = idle_exit.map(std::time::Duration::from_secs);
        let pinned = serve::Pinned {
            run_dir: cli.run_dir.clone(),
            node_config: cli.node_config.clone(),
        };
        return match serve::serve(socket, idle, *detach, pinned) {
            Ok(()) => 0,
            Err(f) => report_failure(f, "serve", cli.json),
        };
    }
    let level = if cli.quiet {
        "error"
    } else {
        ["warn", "info", "debug", "trace"][usize::from(cli.verbose.min(3))]
    };
    // Escape codes only for a person at a terminal: never in a redirected
    // file, and never when NO_COLOR is set (no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    // GKVM_LOG takes directives (an EnvFilter compiles them); the plain
    // level of -v/-q needs no parsing (a cheaper process start).
    match std::env::var("GKVM_LOG") {
        Ok(directives) => subscriber
            .with_env_filter(tracing_subscriber::EnvFilter::new(directives))
            .init(),
        Err(_) => subscriber
            .with_max_level(
                level
                    .parse::<tracing::Level>()
                    .unwrap_or(tracing::Level::WARN),
            )
            .init(),
    }
    // One operation per process: a single thread runs it (its blocking
    // steps go to tokio's blocking pool). Every QMP reply then wakes the
    // operation on the thread that read it, without a cross-thread hop.
    let runtime = match runtime.map_or_else(new_runtime, Ok) {
        Ok(r) => r,
        Err(e) => {
            errln!("gkvm: error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let what = cli.command.describe();
    let json = cli.json;
    let result = runtime.block_on(async {
        let interrupted = interrupted();
        tokio::select! {
            r = commands::run(cli) => r.map(|()| None),
            signal = interrupted => Ok(Some(signal)),
        }
    });
    // The operation's future is dropped by now: its guards have rolled
    // back whatever it had half done. Nothing left on the runtime needs to
    // finish (a QMP reader, an idle blocking thread): do not wait for it.
    runtime.shutdown_background();
    let result = result.and_then(|signal| {
        use std::io::Write as _;
        std::io::stdout().flush().map_err(Failure::output)?;
        Ok(signal)
    });
    match result {
        Ok(None) => 0,
        Ok(Some((signal, code))) => report_failure(
            Failure::new(
                code,
                "interrupted",
                format!("{what} interrupted by {signal}; what it had started was rolled back"),
            ),
            "",
            json,
        ),
        Err(f) => report_failure(f, &format!("{what} succeeded"), json),
    }
}

/// A command line clap refused: its own message, or with `--json` (seen
/// anywhere among the arguments) an error object; help and version are
/// printed as asked.
fn usage_error(e: clap::Error, json: bool) -> u8 {
    use clap::error::ErrorKind;
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let code = e.exit_code();
        let _ = e.print();
        return u8::try_from(code).unwrap_or(2);
    }
    // clap's first paragraph, on one line: what is wrong and what it
    // concerns ("... were not provided: <MIB>"), without the usage.
    let text = e.render().to_string();
    let message = text
        .split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let message = message.trim_start_matches("error: ").to_owned();
    let message = if message.is_empty() {
        e.kind().as_str().unwrap_or("bad command line").to_owned()
    } else {
        message
    };
    report_failure(Failure::new(2, "usage", message), "", true)
}

/// A memory size in MiB: a plain number is MiB (as Ganeti counts),
/// one with a suffix is converted (`512M`, `1G`, `2048K`) and must be
/// whole MiB.
fn mib_arg(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse()
            .map_err(|_| format!("{text:?} is not a size in MiB"));
    }
    let bytes = hv_kvm::parse_size_bytes(t)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{text:?} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

/// Resolves on SIGINT, SIGTERM or SIGHUP with the signal's name and the
/// shell's exit code for it.
async fn interrupted() -> (&'static str, u8) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut streams = Vec::new();
    for (kind, name, code) in [
        (SignalKind::interrupt(), "SIGINT", 130),
        (SignalKind::terminate(), "SIGTERM", 143),
        (SignalKind::hangup(), "SIGHUP", 129),
    ] {
        match signal(kind) {
            Ok(s) => streams.push((s, name, code)),
            Err(e) => errln!("gkvm: warning: cannot handle {name}: {e}"),
        }
    }
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let waits = streams.iter_mut().map(|(s, name, code)| {
        let (name, code) = (*name, *code);
        Box::pin(async move {
            s.recv().await;
            (name, code)
        })
    });
    futures_select_all(waits).await
}

/// The first of several futures to finish.
async fn futures_select_all<F: std::future::Future<Output = T> + Unpin, T>(
    futures: impl IntoIterator<Item = F>,
) -> T {
    let mut futures: Vec<F> = futures.into_iter().collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::mib_arg;

    #[test]
    fn memory_sizes_take_suffixes_and_plain_numbers_are_mib() {
        assert_eq!(mib_arg("512"), Ok(512));
        assert_eq!(mib_arg("512M"), Ok(512));
        assert_eq!(mib_arg("1G"), Ok(1024));
        assert_eq!(mib_arg("2048k"), Ok(2));
        assert!(mib_arg("1536K")
            .unwrap_err()
            .contains("whole number of MiB"));
        assert!(mib_arg("lots").is_err());
        assert!(mib_arg("").is_err());
    }
}
