//! `gkvm`: run and manage KVM virtual machines on this node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod console;
mod demo;
use hv_kvm::{Capabilities, Config, InstanceSpec, KvmHypervisor, RunDir};

const EXAMPLES: &str = "\
Examples:
  gkvm demo                         boot, inspect, balloon, migrate and stop a tiny guest
  gkvm start web1 --memory 512 --vcpus 2 --disk /dev/vg/web1 --nic bridge=br0 -H kernel_path=/boot/vmlinuz
  gkvm start --file web1.json --paused
  gkvm list                         running instances, as a table
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
    /// The node's run directory.
    #[arg(long, global = true, env = "GKVM_RUN_DIR", default_value = "/run/gkvm")]
    run_dir: PathBuf,
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
    /// Stop an instance: ACPI power button and wait, or --force to kill.
    Stop {
        /// The instance.
        name: String,
        /// Kill QEMU instead of pressing the power button.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Reboot an instance (reset in place, or restart with reboot_behavior=exit).
    Reboot {
        /// The instance.
        name: String,
    },
    /// Resume a paused instance.
    Resume {
        /// The instance.
        name: String,
    },
    /// Remove what a stopped instance left behind.
    Cleanup {
        /// The instance.
        name: String,
    },
    /// List running instances.
    List,
    /// Show instances (all when no name is given).
    Info {
        /// Instances to show.
        names: Vec<String>,
    },
    /// Set an instance's memory through the balloon.
    Balloon {
        /// The instance.
        name: String,
        /// Target memory in MiB.
        mib: u64,
    },
    /// Show the node's memory, CPUs and QEMU version.
    NodeInfo,
    /// Attach this terminal to an instance's serial console (^] detaches).
    Console {
        /// The instance.
        name: String,
    },
    /// Show how to reach an instance's console.
    ConsoleInfo {
        /// The instance.
        name: String,
    },
    /// Check the node: QEMU, /dev/kvm, /dev/net/tun, the run directory.
    Verify,
    /// Print what a migration target needs (the source's runtime, JSON).
    MigrationInfo {
        /// The instance.
        name: String,
    },
    /// Receive an instance: start it waiting for the migration, wait until
    /// it has landed, then resume it (or clean up if it failed).
    Accept {
        /// The source's migration info (or an instance definition), JSON.
        info: PathBuf,
        /// Address and port to listen on (never 0.0.0.0 unless you say so).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// Seconds to wait for the migration.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// This node's value of a node-local hvparam (kvm_extra,
        /// security_model, ...) that the incoming instance may have
        /// (repeatable); any other value in the file is refused.
        #[arg(short = 'H', long = "hvparam", value_name = "KEY=VALUE")]
        hvparams: Vec<String>,
    },
    /// Live-migrate an instance to a node where `gkvm accept` waits.
    Migrate {
        /// The instance.
        name: String,
        /// The target, as given to its `gkvm accept --listen`.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Pause the guest for the whole transfer.
        #[arg(long)]
        non_live: bool,
    },
    /// Show the migration of an instance now.
    MigrationStatus {
        /// The instance.
        name: String,
    },
    /// Cancel the running migration of an instance (it keeps running here).
    MigrateCancel {
        /// The instance.
        name: String,
    },
    /// Boot a built-in tiny instance and show what gkvm does, step by step.
    Demo {
        /// The test guest (scripts/build-test-guest).
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Run the Linux guest on KVM instead of TCG.
        #[arg(long)]
        kvm: bool,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, ...
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (gkvm.1 and one per subcommand) into DIR.
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
            Command::Start(a) => ("start", a.name.as_deref()),
            Command::Stop { name, .. } => ("stop", Some(name)),
            Command::Reboot { name } => ("reboot", Some(name)),
            Command::Resume { name } => ("resume", Some(name)),
            Command::Cleanup { name } => ("cleanup", Some(name)),
            Command::Balloon { name, .. } => ("balloon", Some(name)),
            Command::Migrate { name, .. } => ("migrate", Some(name)),
            Command::MigrateCancel { name } => ("migrate-cancel", Some(name)),
            Command::Accept { .. } => ("accept", None),
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
struct StartArgs {
    /// Instance name (or give --file).
    name: Option<String>,
    /// Instance definition (JSON); flags given beside it override its fields.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// Virtual CPUs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// A disk: PATH or PATH:ro (repeatable).
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    disks: Vec<String>,
    /// A NIC: bridge=BR | routed=TABLE | ovs=SWITCH, with ,mac=..,ip=.. (repeatable).
    #[arg(long = "nic", value_name = "MODE=LINK[,mac=M][,ip=A]")]
    nics: Vec<String>,
    /// A hypervisor parameter, as Ganeti's -H kvm:key=value (repeatable).
    #[arg(short = 'H', long = "hvparam", value_name = "KEY=VALUE")]
    hvparams: Vec<String>,
    /// Tags (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// VNC/SPICE TCP port.
    #[arg(long)]
    port: Option<u16>,
    /// Leave the vCPUs stopped.
    #[arg(long)]
    paused: bool,
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
            ..Failure::new(1, e.kind(), e.to_string())
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
fn report_failure(mut f: Failure, succeeded: &str, json: bool) -> ExitCode {
    match f.output.take() {
        // The reader went away (`gkvm list | head -1`): end quietly.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
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
    ExitCode::from(f.code)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let level = if cli.quiet {
        "error"
    } else {
        ["warn", "info", "debug", "trace"][usize::from(cli.verbose.min(3))]
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GKVM_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_target(false)
        // Escape codes only for a person at a terminal: never in a
        // redirected file, and never when NO_COLOR is set (no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("gkvm: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let what = cli.command.describe();
    let json = cli.json;
    let result = runtime.block_on(async {
        let interrupted = interrupted();
        tokio::select! {
            r = run(cli) => r.map(|()| None),
            signal = interrupted => Ok(Some(signal)),
        }
    });
    // The operation's future is dropped by now: its guards have rolled
    // back whatever it had half done.
    let result = result.and_then(|signal| {
        use std::io::Write as _;
        std::io::stdout().flush().map_err(Failure::output)?;
        Ok(signal)
    });
    match result {
        Ok(None) => ExitCode::SUCCESS,
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
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::args().any(|a| a == "--json");
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let code = e.exit_code();
        let _ = e.print();
        return ExitCode::from(u8::try_from(code).unwrap_or(2));
    }
    let message = e.kind().as_str().map_or_else(
        || e.to_string().lines().next().unwrap_or("").to_owned(),
        |k| {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or(k);
            first.trim_start_matches("error: ").to_owned()
        },
    );
    report_failure(Failure::new(2, "usage", message), "", true)
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

fn hypervisor(cli: &Cli) -> Result<KvmHypervisor, Failure> {
    let mut config = Config::new(RunDir::new(&cli.run_dir));
    config.kvm_path = cli.kvm_path.clone();
    config.migration_key = migration_key(cli)?;
    Ok(KvmHypervisor::new(config))
}

/// Where the nodes' shared migration key is looked for by default.
const DEFAULT_MIGRATION_KEY: &str = "/etc/gkvm/migration.key";

/// The migration key: `--migration-key`, else the default file if it
/// exists. A key others can read is no secret, and is refused.
fn migration_key(cli: &Cli) -> Result<Option<Vec<u8>>, Failure> {
    let path = match &cli.migration_key {
        Some(p) => p.clone(),
        None if Path::new(DEFAULT_MIGRATION_KEY).exists() => PathBuf::from(DEFAULT_MIGRATION_KEY),
        None => return Ok(None),
    };
    let fail = |e: String| Failure::from(format!("migration key {}: {e}", path.display()));
    let file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
    let mode =
        std::os::unix::fs::MetadataExt::mode(&file.metadata().map_err(|e| fail(e.to_string()))?);
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "mode {:04o} lets others read it; chmod 600 it",
            mode & 0o7777
        )));
    }
    let key = hv_kvm::read_open_capped(file, &path, 4096).map_err(|e| fail(e.to_string()))?;
    let key: Vec<u8> = key.trim_ascii().to_vec();
    if key.len() < 16 {
        return Err(fail("shorter than 16 bytes".into()));
    }
    Ok(Some(key))
}

/// `--kvm-path`, else the node's default QEMU.
fn default_qemu(cli: &Cli) -> Result<PathBuf, Failure> {
    Ok(hypervisor(cli)?.default_kvm_path())
}

/// Largest input file read (instance definitions, migration info,
/// captured help text are a few KiB to a few hundred).
const MAX_INPUT_FILE: u64 = 4 << 20;

fn read_file(path: &Path, what: &str) -> Result<String, Failure> {
    let fail = |e: String| {
        Failure::new(
            1,
            "input",
            format!("cannot read {what} {}: {e}", path.display()),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let data =
        hv_kvm::read_open_capped(file, path, MAX_INPUT_FILE).map_err(|e| fail(e.to_string()))?;
    String::from_utf8(data).map_err(|_| fail("not UTF-8 text".into()))
}

fn load_instance(path: &Path) -> Result<InstanceSpec, Failure> {
    let text = read_file(path, "instance file")?;
    serde_json::from_str(&text).map_err(|e| {
        Failure::new(
            1,
            "params",
            format!("{}: not a valid instance definition: {e}", path.display()),
        )
    })
}

fn print_json<T: serde::Serialize>(value: &T) -> CliResult {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

async fn run(cli: Cli) -> CliResult {
    tracing::debug!(run_dir = %cli.run_dir.display(), version = env!("CARGO_PKG_VERSION"), "gkvm: {}", cli.command.describe());
    match &cli.command {
        Command::Caps {
            help_text,
            machine_text,
            device_text,
        } => {
            let caps = match help_text {
                Some(h) => {
                    let opt = |p: &Option<PathBuf>, what| {
                        p.as_deref().map(|p| read_file(p, what)).transpose()
                    };
                    Capabilities::from_help(
                        &read_file(h, "help text")?,
                        &opt(machine_text, "machine list")?.unwrap_or_default(),
                        &opt(device_text, "device list")?.unwrap_or_default(),
                    )?
                }
                None => (*hypervisor(&cli)?.capabilities(&default_qemu(&cli)?).await?).clone(),
            };
            if cli.json {
                print_json(&caps)
            } else {
                print_caps(&caps)
            }
        }
        Command::Argv { instance } => {
            let spec = load_instance(instance)?;
            let plan = hypervisor(&cli)?.plan(&spec).await?;
            if cli.json {
                print_json(&plan)
            } else {
                outln!("{}", shell_join(&plan.argv))?;
                Ok(())
            }
        }
        Command::Start(args) => {
            let spec = spec_from_args(args)?;
            let report = hypervisor(&cli)?.start(&spec, args.paused).await?;
            if cli.json {
                print_json(&report)
            } else {
                outln!(
                    "started {} (pid {}, machine {}{}{})",
                    report.name,
                    report.pid,
                    report.machine,
                    if report.taps.is_empty() {
                        String::new()
                    } else {
                        format!(", NICs on {}", report.taps.join(" "))
                    },
                    if report.paused { ", paused" } else { "" }
                )?;
                Ok(())
            }
        }
        Command::Stop {
            name,
            force,
            timeout,
        } => {
            let outcome = hypervisor(&cli)?
                .stop(name, *force, std::time::Duration::from_secs(*timeout))
                .await?;
            if cli.json {
                print_json(&Operation {
                    outcome: Some(outcome.clone()),
                    ..Operation::new(name, "stop")
                })
            } else {
                let what = match outcome {
                    hv_kvm::StopOutcome::PoweredOff => "powered off",
                    hv_kvm::StopOutcome::Killed => "killed",
                    hv_kvm::StopOutcome::NotRunning => "was not running",
                    _ => "stopped",
                };
                outln!("{name} {what}")?;
                Ok(())
            }
        }
        Command::Reboot { name } => {
            hypervisor(&cli)?.reboot(name).await?;
            done(&cli, Operation::new(name, "reboot"), "rebooted")
        }
        Command::Resume { name } => {
            hypervisor(&cli)?.resume(name).await?;
            done(&cli, Operation::new(name, "resume"), "resumed")
        }
        Command::Cleanup { name } => {
            hypervisor(&cli)?.cleanup(name).await?;
            done(&cli, Operation::new(name, "cleanup"), "cleaned up")
        }
        Command::List => {
            let all = hypervisor(&cli)?.info_all().await?;
            if cli.json {
                print_json(&all)
            } else {
                print_info_table(&all)
            }
        }
        Command::Info { names } => {
            let hv = hypervisor(&cli)?;
            let infos = if names.is_empty() {
                hv.info_all().await?
            } else {
                let mut v = Vec::new();
                for n in names {
                    v.push(hv.info(n).await?);
                }
                v
            };
            if cli.json {
                // Always a list, however many were asked for.
                print_json(&infos)
            } else {
                print_info_table(&infos)
            }
        }
        Command::Balloon { name, mib } => {
            hypervisor(&cli)?.balloon(name, *mib).await?;
            done(
                &cli,
                Operation {
                    target_mib: Some(*mib),
                    ..Operation::new(name, "balloon")
                },
                &format!("balloon target set to {}", human_mib(*mib)),
            )
        }
        Command::NodeInfo => {
            let n = hypervisor(&cli)?.node_info().await?;
            if cli.json {
                return print_json(&n);
            }
            outln!("{:<14}{}", "memory total", human_mib(n.memory_total_mib))?;
            outln!("{:<14}{}", "memory free", human_mib(n.memory_free_mib))?;
            outln!("{:<14}{}", "memory node", human_mib(n.memory_dom0_mib))?;
            outln!(
                "{:<14}{} ({} sockets, {} NUMA nodes)",
                "CPUs",
                n.cpu_total,
                n.cpu_sockets,
                n.cpu_nodes
            )?;
            match n.hv_version {
                Some((a, b, c)) => outln!("{:<14}{a}.{b}.{c}", "QEMU"),
                None => outln!("{:<14}not found", "QEMU"),
            }
        }
        Command::Console { name } => {
            let socket = match hypervisor(&cli)?.console(name)? {
                hv_kvm::ConsoleInfo::Serial { socket, .. } => socket,
                other => {
                    return Err(Failure::from(format!(
                        "instance {name} has no serial console ({other:?}); see gkvm console-info"
                    )))
                }
            };
            let owned = name.clone();
            let ended = tokio::task::spawn_blocking(move || console::attach(&owned, &socket))
                .await
                .map_err(Failure::from)?
                .map_err(|e| Failure::new(1, "console", format!("console of {name}: {e}")))?;
            match ended {
                console::Ended::Detached => errln!("\r\ndetached"),
                console::Ended::Closed => errln!("\r\nconsole closed: the instance stopped"),
                console::Ended::Signalled => errln!("\r\nconsole closed by a signal"),
            }
            Ok(())
        }
        Command::ConsoleInfo { name } => {
            let c = hypervisor(&cli)?.console(name)?;
            if cli.json {
                return print_json(&c);
            }
            match c {
                hv_kvm::ConsoleInfo::Serial {
                    socket, command, ..
                } => {
                    outln!(
                        "serial console on {}\nattach with: {}",
                        socket.display(),
                        shell_join(&command)
                    )
                }
                hv_kvm::ConsoleInfo::Vnc {
                    host,
                    port,
                    display,
                    ..
                } => {
                    outln!("VNC on {host}:{port} (display :{display})")
                }
                hv_kvm::ConsoleInfo::Spice { host, port, .. } => outln!("SPICE on {host}:{port}"),
                hv_kvm::ConsoleInfo::Message { message, .. } => outln!("{message}"),
                other => outln!("{}", serde_json::to_string(&other)?),
            }
        }
        Command::Verify => {
            let report = hypervisor(&cli)?.verify().await;
            if cli.json {
                print_json(&report)?;
            } else if report.problems.is_empty() {
                outln!("node OK")?;
            } else {
                for p in &report.problems {
                    outln!("problem: {p}")?;
                }
            }
            if report.problems.is_empty() {
                Ok(())
            } else {
                Err(Failure::from(format!(
                    "{} problem(s) found",
                    report.problems.len()
                )))
            }
        }
        Command::MigrationInfo { name } => {
            outln!("{}", hypervisor(&cli)?.migration_info(name)?)?;
            Ok(())
        }
        Command::Accept {
            info,
            listen,
            timeout,
            hvparams,
        } => {
            let (addr, port) = split_host_port(listen)?;
            let text = read_file(info, "migration info")?;
            let mut hv = hypervisor(&cli)?;
            for h in hvparams {
                let pair = h.strip_prefix("kvm:").unwrap_or(h);
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| usage(format!("-H {h}: expected KEY=VALUE")))?;
                // Checked like an instance's hvparam, then kept as this
                // node's value for the comparison.
                hv_kvm::HvParams::default().set_pair(pair)?;
                hv.config_mut()
                    .node_hvparams
                    .insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
            }
            if !cli.json && !cli.quiet {
                errln!("waiting for the migration on {listen}");
            }
            let report = hv
                .receive(&text, &addr, port, std::time::Duration::from_secs(*timeout))
                .await?;
            done(
                &cli,
                Operation::new(&report.name, "accept"),
                "arrived and is running",
            )
        }
        Command::Migrate { name, to, non_live } => {
            let (host, port) = split_host_port(to)?;
            let hv = hypervisor(&cli)?;
            let json = cli.json;
            let bar = (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            });
            let started = std::time::Instant::now();
            let mut write_error = None;
            let result = hv
                .migrate_to(name, &host, port, !*non_live, |s| {
                    if let Some(b) = &bar {
                        b.set_length(s.total_bytes);
                        b.set_position(s.total_bytes.saturating_sub(s.remaining_bytes));
                        b.set_message(s.status.clone());
                    } else if json && write_error.is_none() {
                        // A closed reader must not stop a migration half way.
                        write_error =
                            outln!("{}", serde_json::to_string(s).unwrap_or_default()).err();
                    }
                })
                .await;
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let status = result?;
            if let Some(e) = write_error {
                return Err(e);
            }
            if !json {
                outln!(
                    "{name} migrated to {to} in {} (QEMU: {} ms, downtime {} ms)",
                    hv_kvm::human_duration(&started.elapsed()),
                    status.total_time_ms.unwrap_or(0),
                    status.downtime_ms.unwrap_or(0)
                )?;
            }
            Ok(())
        }
        Command::MigrationStatus { name } => {
            let s = hypervisor(&cli)?.migration_status(name).await?;
            if cli.json {
                return print_json(&s);
            }
            outln!(
                "{name}: {} {:.0}% ({} of {} MiB sent, {} MiB left)",
                s.status,
                s.progress * 100.0,
                s.transferred_bytes >> 20,
                s.total_bytes >> 20,
                s.remaining_bytes >> 20
            )?;
            Ok(())
        }
        Command::MigrateCancel { name } => {
            hypervisor(&cli)?.cancel_migration(name).await?;
            done(
                &cli,
                Operation::new(name, "migrate-cancel"),
                "migration cancelled",
            )
        }
        Command::Demo { guest_dir, kvm } => {
            let opts = demo::DemoOptions {
                guest_dir: guest_dir.clone().unwrap_or_else(demo::default_guest_dir),
                qemu: default_qemu(&cli)?,
                kvm: *kvm,
            };
            demo::run(opts)
                .await
                .map_err(|message| Failure::from(format!("demo: {message}")))?;
            demo::take_write_error().map_or(Ok(()), |e| Err(Failure::output(e)))
        }
        Command::Manpages { dir } => write_manpages(dir),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error.
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "gkvm", &mut buf);
            use std::io::Write as _;
            std::io::stdout().write_all(&buf).map_err(Failure::output)
        }
    }
}

/// `gkvm.1` and `gkvm-<subcommand>.1`, from the clap definitions.
fn write_manpages(dir: &Path) -> CliResult {
    let write = |cmd: clap::Command, file: String| -> CliResult {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|e| Failure::from(format!("rendering {file}: {e}")))?;
        std::fs::write(dir.join(&file), buf)
            .map_err(|e| Failure::from(format!("writing {}: {e}", dir.join(&file).display())))
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::from(format!("creating {}: {e}", dir.display())))?;
    let top = Cli::command();
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("gkvm-{}", sub.get_name());
        write(sub.clone().name(name.clone()), format!("{name}.1"))?;
    }
    write(top, "gkvm.1".into())
}

/// What an operation without a report of its own did, for `--json`
/// (schemas/v1/operation.json).
#[derive(serde::Serialize)]
struct Operation {
    /// The instance.
    instance: String,
    /// The subcommand: `stop`, `reboot`, `resume`, `cleanup`, `balloon`,
    /// `accept`, `migrate-cancel`.
    operation: &'static str,
    /// How a stop ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<hv_kvm::StopOutcome>,
    /// A balloon's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    target_mib: Option<u64>,
}

impl Operation {
    fn new(instance: &str, operation: &'static str) -> Operation {
        Operation {
            instance: instance.to_owned(),
            operation,
            outcome: None,
            target_mib: None,
        }
    }
}

/// Reports an operation: a typed object with `--json`, else
/// `<instance> <what>`.
fn done(cli: &Cli, op: Operation, what: &str) -> CliResult {
    if cli.json {
        print_json(&op)
    } else {
        outln!("{} {what}", op.instance)
    }
}

/// `HOST:PORT` or `[V6]:PORT`.
fn split_host_port(s: &str) -> Result<(String, u16), Failure> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| usage(format!("{s:?}: expected HOST:PORT")))?;
    let port = port
        .parse()
        .ok()
        .filter(|&p: &u16| p != 0)
        .ok_or_else(|| usage(format!("{s:?}: {port:?} is not a port (1-65535)")))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

fn usage(message: String) -> Failure {
    Failure::new(2, "usage", message)
}

/// Memory of an instance given by flags alone, without `--memory`.
const DEFAULT_MEMORY_MIB: u64 = 512;

/// An instance from `--file` and/or flags.
fn spec_from_args(a: &StartArgs) -> Result<InstanceSpec, Failure> {
    let mut spec = match (&a.file, &a.name) {
        (Some(f), _) => load_instance(f)?,
        (None, Some(n)) => InstanceSpec::new(n.clone(), DEFAULT_MEMORY_MIB),
        (None, None) => return Err(usage("start needs an instance name or --file".into())),
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
            .set_pair(h.strip_prefix("kvm:").unwrap_or(h))?;
    }
    Ok(spec)
}

fn human_mib(mib: u64) -> String {
    if mib >= 10 * 1024 {
        format!("{}.{} GiB", mib / 1024, (mib % 1024) * 10 / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        // Whole seconds from here on; a float beyond u64 saturates.
        let whole = std::time::Duration::try_from_secs_f64(s.clamp(0.0, 1e12))
            .unwrap_or_default()
            .as_secs();
        if whole < 3600 {
            format!("{}m{:02}s", whole / 60, whole % 60)
        } else {
            format!("{}h{:02}m", whole / 3600, whole % 3600 / 60)
        }
    }
}

fn print_info_table(infos: &[hv_kvm::InstanceInfo]) -> CliResult {
    let rows: Vec<[String; 6]> = infos
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.state.clone(),
                i.pid.to_string(),
                human_mib(i.memory_mib),
                i.vcpus.to_string(),
                human_secs(i.cpu_time_secs),
            ]
        })
        .collect();
    let header = ["NAME", "STATE", "PID", "MEMORY", "VCPUS", "CPU TIME"].map(String::from);
    let mut width = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

fn print_caps(c: &Capabilities) -> CliResult {
    let features = serde_json::to_value(&c.features).unwrap_or_default();
    let (on, off): (Vec<_>, Vec<_>) = features
        .as_object()
        .map(|m| m.iter().partition(|(_, v)| v.as_bool() == Some(true)))
        .unwrap_or_default();
    let names = |v: Vec<(&String, &serde_json::Value)>| {
        v.into_iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let aliases: Vec<String> = c
        .machines
        .iter()
        .filter_map(|m| m.alias_of.as_ref().map(|a| format!("{} → {a}", m.name)))
        .collect();
    outln!("{:<16}{}", "QEMU", c.version.text)?;
    outln!("{:<16}{}", "banner", c.version.banner)?;
    outln!(
        "{:<16}{}",
        "default machine",
        c.default_machine.as_deref().unwrap_or("-")
    )?;
    outln!(
        "{:<16}{} ({})",
        "machines",
        c.machines.len(),
        aliases.join(", ")
    )?;
    outln!("{:<16}{}", "devices", c.devices.len())?;
    outln!("{:<16}{}", "features", names(on))?;
    outln!("{:<16}{}", "lacks", names(off))
}

/// Joins argv for a POSIX shell, quoting what needs it.
fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
