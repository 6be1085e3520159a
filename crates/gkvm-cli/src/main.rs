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

/// `--kvm-path`, else the node's default QEMU.
fn default_qemu(cli: &Cli) -> PathBuf {
    hypervisor(cli).default_kvm_path()
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
        Command::Start(args) => {
            let spec = spec_from_args(args)?;
            let report = hypervisor(&cli).start(&spec, args.paused).await?;
            if cli.json {
                print_json(&report)
            } else {
                println!(
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
                );
                Ok(())
            }
        }
        Command::Stop {
            name,
            force,
            timeout,
        } => {
            let outcome = hypervisor(&cli)
                .stop(name, *force, std::time::Duration::from_secs(*timeout))
                .await?;
            if cli.json {
                print_json(&serde_json::json!({"name": name, "outcome": outcome}))
            } else {
                let what = match outcome {
                    hv_kvm::StopOutcome::PoweredOff => "powered off",
                    hv_kvm::StopOutcome::Killed => "killed",
                    hv_kvm::StopOutcome::NotRunning => "was not running",
                };
                println!("{name} {what}");
                Ok(())
            }
        }
        Command::Reboot { name } => {
            hypervisor(&cli).reboot(name).await?;
            done(&cli, name, "rebooted")
        }
        Command::Resume { name } => {
            hypervisor(&cli).resume(name).await?;
            done(&cli, name, "resumed")
        }
        Command::Cleanup { name } => {
            hypervisor(&cli).cleanup(name).await?;
            done(&cli, name, "cleaned up")
        }
        Command::List => {
            let all = hypervisor(&cli).info_all().await?;
            if cli.json {
                print_json(&all)
            } else {
                print_info_table(&all);
                Ok(())
            }
        }
        Command::Info { names } => {
            let hv = hypervisor(&cli);
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
                if names.len() == 1 {
                    print_json(&infos[0])
                } else {
                    print_json(&infos)
                }
            } else {
                print_info_table(&infos);
                Ok(())
            }
        }
        Command::Balloon { name, mib } => {
            hypervisor(&cli).balloon(name, *mib).await?;
            done(
                &cli,
                name,
                &format!("balloon target set to {}", human_mib(*mib)),
            )
        }
        Command::NodeInfo => {
            let n = hypervisor(&cli).node_info().await?;
            if cli.json {
                return print_json(&n);
            }
            println!("{:<14}{}", "memory total", human_mib(n.memory_total_mib));
            println!("{:<14}{}", "memory free", human_mib(n.memory_free_mib));
            println!("{:<14}{}", "memory node", human_mib(n.memory_dom0_mib));
            println!(
                "{:<14}{} ({} sockets, {} NUMA nodes)",
                "CPUs", n.cpu_total, n.cpu_sockets, n.cpu_nodes
            );
            match n.hv_version {
                Some((a, b, c)) => println!("{:<14}{a}.{b}.{c}", "QEMU"),
                None => println!("{:<14}not found", "QEMU"),
            }
            Ok(())
        }
        Command::Console { name } => {
            let socket = match hypervisor(&cli).console(name)? {
                hv_kvm::ConsoleInfo::Serial { socket, .. } => socket,
                other => {
                    return Err(Failure {
                        code: 1,
                        message: format!(
                        "instance {name} has no serial console ({other:?}); see gkvm console-info"
                    ),
                    })
                }
            };
            let name = name.clone();
            let ended = tokio::task::spawn_blocking(move || console::attach(&name, &socket))
                .await
                .map_err(|e| Failure {
                    code: 1,
                    message: e.to_string(),
                })??;
            match ended {
                console::Ended::Detached => eprintln!("\r\ndetached"),
                console::Ended::Closed => eprintln!("\r\nconsole closed: the instance stopped"),
                console::Ended::Signalled => eprintln!("\r\nconsole closed by a signal"),
            }
            Ok(())
        }
        Command::ConsoleInfo { name } => {
            let c = hypervisor(&cli).console(name)?;
            if cli.json {
                return print_json(&c);
            }
            match c {
                hv_kvm::ConsoleInfo::Serial {
                    socket, command, ..
                } => {
                    println!(
                        "serial console on {}
attach with: {}",
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
                    println!("VNC on {host}:{port} (display :{display})")
                }
                hv_kvm::ConsoleInfo::Spice { host, port, .. } => println!("SPICE on {host}:{port}"),
                hv_kvm::ConsoleInfo::Message { message, .. } => println!("{message}"),
            }
            Ok(())
        }
        Command::Verify => {
            let report = hypervisor(&cli).verify().await;
            if cli.json {
                print_json(&report)?;
            } else if report.problems.is_empty() {
                println!("node OK");
            } else {
                for p in &report.problems {
                    println!("problem: {p}");
                }
            }
            if report.problems.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    message: format!("{} problem(s) found", report.problems.len()),
                })
            }
        }
        Command::MigrationInfo { name } => {
            println!("{}", hypervisor(&cli).migration_info(name)?);
            Ok(())
        }
        Command::Accept {
            info,
            listen,
            timeout,
        } => {
            let (addr, port) = split_host_port(listen)?;
            let text = read_file(info, "migration info")?;
            let hv = hypervisor(&cli);
            let report = hv.accept_instance(&text, &addr, port).await?;
            let name = report.name.clone();
            if !cli.json {
                eprintln!("{name}: waiting for the migration on {listen}");
            }
            match hv
                .wait_incoming(&name, std::time::Duration::from_secs(*timeout))
                .await
            {
                Ok(()) => {
                    hv.finalize_migration_dst(&name, true).await?;
                    done(&cli, &name, "arrived and is running")
                }
                Err(e) => {
                    if let Err(clean) = hv.finalize_migration_dst(&name, false).await {
                        eprintln!("gkvm: warning: cleaning up {name}: {clean}");
                    }
                    Err(e.into())
                }
            }
        }
        Command::Migrate { name, to, non_live } => {
            let (host, port) = split_host_port(to)?;
            let hv = hypervisor(&cli);
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
            let result = hv
                .migrate(name, &host, port, !*non_live, |s| {
                    if let Some(b) = &bar {
                        b.set_length(s.total_bytes);
                        b.set_position(s.total_bytes.saturating_sub(s.remaining_bytes));
                        b.set_message(s.status.clone());
                    } else if json {
                        println!("{}", serde_json::to_string(s).unwrap_or_default());
                    }
                })
                .await;
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            match result {
                Ok(status) => {
                    hv.finalize_migration_source(name, true).await?;
                    if !json {
                        println!(
                            "{name} migrated to {to} in {:.0} ms (QEMU: {} ms, downtime {} ms)",
                            started.elapsed().as_secs_f64() * 1000.0,
                            status.total_time_ms.unwrap_or(0),
                            status.downtime_ms.unwrap_or(0)
                        );
                    }
                    Ok(())
                }
                Err(e) => {
                    if let Err(resume) = hv.finalize_migration_source(name, false).await {
                        eprintln!("gkvm: warning: resuming {name}: {resume}");
                    }
                    Err(e.into())
                }
            }
        }
        Command::MigrationStatus { name } => {
            let s = hypervisor(&cli).migration_status(name).await?;
            if cli.json {
                return print_json(&s);
            }
            println!(
                "{name}: {} {:.0}% ({} of {} MiB sent, {} MiB left)",
                s.status,
                s.progress * 100.0,
                s.transferred_bytes >> 20,
                s.total_bytes >> 20,
                s.remaining_bytes >> 20
            );
            Ok(())
        }
        Command::MigrateCancel { name } => {
            hypervisor(&cli).cancel_migration(name).await?;
            done(&cli, name, "migration cancelled")
        }
        Command::Demo { guest_dir, kvm } => {
            let opts = demo::DemoOptions {
                guest_dir: guest_dir.clone().unwrap_or_else(demo::default_guest_dir),
                qemu: default_qemu(&cli),
                kvm: *kvm,
            };
            demo::run(opts).await.map_err(|message| Failure {
                code: 1,
                message: format!("demo: {message}"),
            })
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "gkvm", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn done(cli: &Cli, name: &str, what: &str) -> CliResult {
    if cli.json {
        print_json(&serde_json::json!({"name": name, "result": what}))
    } else {
        println!("{name} {what}");
        Ok(())
    }
}

/// `HOST:PORT` or `[V6]:PORT`.
fn split_host_port(s: &str) -> Result<(String, u16), Failure> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| usage(format!("{s:?}: expected HOST:PORT")))?;
    let port = port
        .parse()
        .map_err(|_| usage(format!("{s:?}: {port:?} is not a port")))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

fn usage(message: String) -> Failure {
    Failure { code: 2, message }
}

/// An instance from `--file` and/or flags.
fn spec_from_args(a: &StartArgs) -> Result<InstanceSpec, Failure> {
    let mut spec = match (&a.file, &a.name) {
        (Some(f), _) => load_instance(f)?,
        (None, Some(n)) => InstanceSpec::new(n.clone(), 0),
        (None, None) => return Err(usage("start needs an instance name or --file".into())),
    };
    if let Some(n) = &a.name {
        spec.name = n.clone();
    }
    if let Some(m) = a.memory {
        spec.memory = m;
    }
    if spec.memory == 0 {
        spec.memory = 512;
    }
    if let Some(v) = a.vcpus {
        spec.vcpus = v;
    }
    if let Some(p) = a.port {
        spec.network_port = Some(p);
    }
    spec.tags.extend(a.tags.iter().cloned());
    for d in &a.disks {
        let (path, mode) = match d.strip_suffix(":ro") {
            Some(p) => (p, hv_kvm::DiskMode::ReadOnly),
            None => (
                d.strip_suffix(":rw").unwrap_or(d),
                hv_kvm::DiskMode::ReadWrite,
            ),
        };
        spec.disks.push(hv_kvm::DiskSpec {
            path: path.into(),
            mode,
            template: None,
        });
    }
    for (i, n) in a.nics.iter().enumerate() {
        spec.nics.push(parse_nic(n, &spec.name, i)?);
    }
    for h in &a.hvparams {
        spec.hvparams
            .set_pair(h.strip_prefix("kvm:").unwrap_or(h))?;
    }
    Ok(spec)
}

/// `bridge=br0,mac=52:54:00:..,ip=..` and friends; a MAC is made up when
/// none is given (locally administered, stable for the name and index).
fn parse_nic(text: &str, instance: &str, index: usize) -> Result<hv_kvm::NicSpec, Failure> {
    let mut nic = hv_kvm::NicSpec {
        mac: String::new(),
        ip: None,
        mode: hv_kvm::NicMode::Bridged,
        link: String::new(),
        network: None,
    };
    for part in text.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| usage(format!("--nic {text}: expected key=value, got {part:?}")))?;
        match k {
            "bridge" => (nic.mode, nic.link) = (hv_kvm::NicMode::Bridged, v.into()),
            "routed" => (nic.mode, nic.link) = (hv_kvm::NicMode::Routed, v.into()),
            "ovs" | "openvswitch" => {
                (nic.mode, nic.link) = (hv_kvm::NicMode::Openvswitch, v.into())
            }
            "mac" => nic.mac = v.into(),
            "ip" => nic.ip = Some(v.into()),
            other => {
                return Err(usage(format!(
                    "--nic {text}: unknown key {other:?} (bridge, routed, ovs, mac, ip)"
                )))
            }
        }
    }
    if nic.mac.is_empty() {
        let mut h: u32 = 2166136261;
        for b in instance.bytes().chain([index as u8]) {
            h = (h ^ u32::from(b)).wrapping_mul(16777619);
        }
        nic.mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            h >> 16 & 0xff,
            h >> 8 & 0xff,
            h & 0xff
        );
    }
    Ok(nic)
}

fn human_mib(mib: u64) -> String {
    if mib >= 10 * 1024 {
        format!("{:.1} GiB", mib as f64 / 1024.0)
    } else {
        format!("{mib} MiB")
    }
}

fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn print_info_table(infos: &[hv_kvm::InstanceInfo]) {
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
        println!("{}", line.join("  ").trim_end());
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
