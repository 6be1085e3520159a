//! `gkvm`: run and manage KVM virtual machines on this node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hv_kvm::{Capabilities, Config, InstanceSpec, KvmHypervisor, RunDir};

const EXAMPLES: &str = "\
Examples:
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
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, ...
        shell: clap_complete::Shell,
    },
}

/// A failure: exit code 1 (operation) or 2 (usage), one line on stderr.
struct Failure {
    code: u8,
    message: String,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure {
            code: 1,
            message: e.to_string(),
        }
    }
}

type CliResult = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gkvm: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("gkvm: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn hypervisor(cli: &Cli) -> KvmHypervisor {
    let mut config = Config::new(RunDir::new(&cli.run_dir));
    config.kvm_path = cli.kvm_path.clone();
    KvmHypervisor::new(config)
}

/// `--kvm-path`, else `/usr/bin/kvm`, else `qemu-system-x86_64` on PATH.
fn default_qemu(cli: &Cli) -> PathBuf {
    if let Some(p) = &cli.kvm_path {
        return p.clone();
    }
    let kvm = PathBuf::from("/usr/bin/kvm");
    if kvm.is_file() {
        return kvm;
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        })
        .unwrap_or(kvm)
}

fn read_file(path: &Path, what: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure {
        code: 1,
        message: format!("cannot read {what} {}: {e}", path.display()),
    })
}

fn load_instance(path: &Path) -> Result<InstanceSpec, Failure> {
    let text = read_file(path, "instance file")?;
    serde_json::from_str(&text).map_err(|e| Failure {
        code: 1,
        message: format!("{}: not a valid instance definition: {e}", path.display()),
    })
}

fn print_json<T: serde::Serialize>(value: &T) -> CliResult {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn run(cli: Cli) -> CliResult {
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
                None => (*hypervisor(&cli).capabilities(&default_qemu(&cli)).await?).clone(),
            };
            if cli.json {
                print_json(&caps)
            } else {
                print_caps(&caps);
                Ok(())
            }
        }
        Command::Argv { instance } => {
            let spec = load_instance(instance)?;
            let plan = hypervisor(&cli).plan(&spec).await?;
            if cli.json {
                print_json(&plan)
            } else {
                println!("{}", shell_join(&plan.argv));
                Ok(())
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "gkvm", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn print_caps(c: &Capabilities) {
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
    println!("{:<16}{}", "QEMU", c.version.text);
    println!("{:<16}{}", "banner", c.version.banner);
    println!(
        "{:<16}{}",
        "default machine",
        c.default_machine.as_deref().unwrap_or("-")
    );
    println!(
        "{:<16}{} ({})",
        "machines",
        c.machines.len(),
        aliases.join(", ")
    );
    println!("{:<16}{}", "devices", c.devices.len());
    println!("{:<16}{}", "features", names(on));
    println!("{:<16}{}", "lacks", names(off));
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
