//! One function per subcommand: read the input, send the facade one
//! typed request, hand the answer to `render`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hv_kvm::{
    Capabilities, Definition, KvmHypervisor, MigrationMode, Request, Response, StartMode, StopMode,
};

use crate::input::{
    default_qemu, hypervisor, load_instance, read_file, spec_from_args, split_host_port, usage,
};
use crate::render::{self, Operation};
use crate::{console, demo, Cli, CliResult, Command, Failure, SpecArgs, StartArgs};

/// Sends one request; a response of another kind is a bug, reported as
/// such rather than a panic.
async fn call(hv: &KvmHypervisor, request: Request) -> Result<Response, Failure> {
    Ok(hv.handle(request).await?)
}

fn unexpected(r: &Response) -> Failure {
    Failure::new(1, "internal", format!("unexpected answer {r:?}"))
}

/// Runs the subcommand.
pub(crate) async fn run(cli: Cli) -> CliResult {
    tracing::debug!(run_dir = ?cli.run_dir, version = env!("CARGO_PKG_VERSION"), "gkvm: {}", cli.command.describe());
    let c = &cli;
    match &cli.command {
        Command::Caps {
            help_text,
            machine_text,
            device_text,
        } => caps(c, help_text, machine_text, device_text).await,
        Command::Argv { instance } => argv(c, instance).await,
        Command::Start(args) => start(c, args).await,
        Command::Stop {
            name,
            force,
            timeout,
        } => stop(c, name, *force, *timeout).await,
        Command::Reboot { name, file } => {
            let config = match file {
                Some(f) => Some(load_instance(f)?.hvparams),
                None => None,
            };
            simple(
                c,
                Request::Reboot {
                    instance: name.clone(),
                    config,
                },
            )
            .await
        }
        Command::Save { name, file } => {
            let report = hypervisor(c)?.save(name, file, |_| {}).await?;
            render::saved(c.json, &report)
        }
        Command::Restore { file } => {
            let report = hypervisor(c)?.restore(file).await?;
            render::started(c.json, &report)
        }
        Command::Resume { name } => {
            simple(
                c,
                Request::Resume {
                    instance: name.clone(),
                },
            )
            .await
        }
        Command::Cleanup { name } => {
            known(c, &hypervisor(c)?, name)?;
            simple(
                c,
                Request::Cleanup {
                    instance: name.clone(),
                },
            )
            .await
        }
        Command::RemoveState { name } => {
            known(c, &hypervisor(c)?, name)?;
            simple(
                c,
                Request::RemoveState {
                    instance: name.clone(),
                },
            )
            .await
        }
        Command::ReleaseToGaneti { names, all } => release_to_ganeti(c, names, *all).await,
        Command::List {
            all,
            output,
            no_headers,
            separator,
            units,
        } => {
            let style = render::TableStyle {
                columns: columns(output.as_deref(), *all)?,
                no_headers: *no_headers,
                separator: separator.clone(),
                units: *units,
            };
            list(c, *all, &style).await
        }
        Command::Define {
            spec,
            autostart,
            no_autostart,
        } => define(c, spec, *autostart, *no_autostart).await,
        Command::Undefine { name, remove_state } => {
            let hv = hypervisor(c)?;
            if c.idempotent && !hv.is_known(name)? {
                return render::done(c.json, Operation::new(name, "undefine"), "was not defined");
            }
            hv.undefine(name, *remove_state).await?;
            render::done(c.json, Operation::new(name, "undefine"), "undefined")
        }
        Command::Autostart { name, disable } => {
            hypervisor(c)?.set_autostart(name, !disable).await?;
            let what = if *disable {
                "will not start at boot"
            } else {
                "will start at boot"
            };
            render::done(c.json, Operation::new(name, "autostart"), what)
        }
        Command::GuestsStart => {
            let hv = hypervisor(c)?;
            let waiting = Some("starting the autostart instances".into());
            guests(c, while_spinning(c, waiting, hv.start_guests()).await?)
        }
        Command::GuestsStop { timeout, save } => {
            let action = if *save {
                hv_kvm::ShutdownAction::Save
            } else {
                hv_kvm::ShutdownAction::Stop
            };
            let hv = hypervisor(c)?;
            let waiting = Some(format!(
                "stopping every instance (each powers off within {timeout} s, or is killed)"
            ));
            let stopping = hv.shutdown_guests(action, Duration::from_secs(*timeout));
            guests(c, while_spinning(c, waiting, stopping).await?)
        }
        Command::Info { names } => info(c, names).await,
        Command::Stats {
            names,
            prometheus,
            listen,
            pss,
        } => {
            let options = hv_kvm::StatsOptions::default().with_pss(*pss);
            match listen {
                Some(addr) => {
                    crate::exporter::serve(hypervisor(c)?, names.clone(), options, *addr).await
                }
                None => stats(c, names, options, *prometheus).await,
            }
        }
        Command::Balloon { name, mib } => balloon(c, name, *mib).await,
        Command::NicAdd { name, nic, dry_run } => nic_add(c, name, nic, *dry_run).await,
        Command::NicRemove { name, id } => nic_remove(c, name, id).await,
        Command::NicModify {
            name,
            id,
            nic: text,
        } => {
            let nic = nic_option(text, name)?;
            // Without a MAC of its own (`bridge=br1`), the NIC keeps its.
            let keep_mac = !is_json(text)
                && !text
                    .split(',')
                    .any(|kv| kv.trim_start().starts_with("mac="));
            let request = Request::NicModify {
                instance: name.clone(),
                id: id.clone(),
                nic,
                keep_mac,
            };
            call(&hypervisor(c)?, request).await?;
            let op = Operation::new(name, "nic-modify").with_device(id, None);
            render::done(c.json, op, &format!("NIC {id} modified"))
        }
        Command::DiskAdd {
            name,
            disk,
            dry_run,
        } => disk_add(c, name, disk, *dry_run).await,
        Command::DiskRemove { name, id } => {
            let request = Request::DiskRemove {
                instance: name.clone(),
                id: id.clone(),
            };
            call(&hypervisor(c)?, request).await?;
            let op = Operation::new(name, "disk-remove").with_device(id, None);
            render::done(c.json, op, &format!("disk {id} removed"))
        }
        Command::DiskGrow { name, id, size } => disk_grow(c, name, id, size).await,
        Command::IoLimits {
            name,
            group,
            limits,
        } => io_limits(c, name, group, limits).await,
        Command::SetLimits { name, limits } => set_limits(c, name, limits).await,
        Command::HotplugSupported { name } => {
            let request = Request::HotplugSupported {
                instance: name.clone(),
            };
            call(&hypervisor(c)?, request).await?;
            let op = Operation::new(name, "hotplug-supported");
            render::done(c.json, op, &format!("{name}: devices can be hot-plugged"))
        }
        Command::NodeInfo => node_info(c).await,
        Command::Console { name } => attach_console(c, name).await,
        Command::ConsoleInfo { name } => console_info(c, name).await,
        Command::Verify { hvparams } => verify(c, hvparams).await,
        Command::PowercycleNode { confirm, dry_run } => powercycle(c, *confirm, *dry_run).await,
        Command::MigrationInfo { name, for_ganeti } => migration_info(c, name, *for_ganeti).await,
        Command::Accept {
            info,
            listen,
            timeout,
            hvparams,
            no_wait,
            current,
            trust_unsealed,
        } => {
            let opts = AcceptOpts {
                timeout: *timeout,
                no_wait: *no_wait,
                current: current.as_deref(),
                trust_unsealed: *trust_unsealed,
            };
            accept(c, info, listen, hvparams, opts).await
        }
        Command::Migrate {
            name,
            to,
            non_live,
            no_finalize,
        } => migrate(c, name, to, *non_live, *no_finalize).await,
        Command::FinalizeMigration {
            name,
            source,
            failed,
            ..
        } => {
            let outcome = if *failed {
                hv_kvm::MigrationOutcome::Failed
            } else {
                hv_kvm::MigrationOutcome::Completed
            };
            let request = if *source {
                Request::FinalizeSource {
                    instance: name.clone(),
                    outcome,
                }
            } else {
                Request::FinalizeDestination {
                    instance: name.clone(),
                    outcome,
                }
            };
            call(&hypervisor(c)?, request).await?;
            let op = Operation::new(name, "finalize-migration");
            render::done(c.json, op, "migration finalized")
        }
        Command::MigrationStatus { name } => migration_status(c, name).await,
        Command::MigrateCancel { name } => {
            simple(
                c,
                Request::CancelMigration {
                    instance: name.clone(),
                },
            )
            .await
        }
        Command::Api {
            file,
            schema,
            reference,
        } => {
            if *reference {
                let text =
                    crate::api_doc::reference().map_err(|e| Failure::new(1, "internal", e))?;
                return std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
                    .map_err(Failure::output);
            }
            api(c, file.as_deref(), *schema).await
        }
        Command::Demo { guest_dir, kvm } => run_demo(c, guest_dir.as_deref(), *kvm).await,
        Command::Manpages { dir } => crate::manpages::write_all(dir),
        Command::Completions { shell } => completions(*shell),
        // Handled before the runtime starts (the server forks).
        Command::Serve { .. } => Err(Failure::new(
            2,
            "usage",
            "serve runs on its own, not inside another command".to_owned(),
        )),
    }
}

/// An API request from its JSON text; a usage failure when it is none.
pub(crate) fn api_request(text: &str) -> Result<Request, Failure> {
    Request::from_json(text)
        .map_err(|e| Failure::new(2, "usage", format!("not an API request: {e}")))
}

/// `gkvm api`: one typed request, answered by [`hv_kvm::Reply`] lines on
/// stdout (each flushed as it comes: a migration's progress streams).
async fn api(cli: &Cli, file: Option<&Path>, schema: bool) -> CliResult {
    use hv_kvm::Reply;
    use std::io::Write as _;
    let emit = |reply: &Reply| -> CliResult {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, reply)?;
        out.write_all(b"\n").map_err(Failure::output)?;
        out.flush().map_err(Failure::output)
    };
    if schema {
        let text = serde_json::to_string_pretty(&hv_kvm::api_schema())?;
        let mut out = std::io::stdout().lock();
        return writeln!(out, "{text}").map_err(Failure::output);
    }
    let text = match file {
        Some(f) => crate::input::read_file(f, "API request")?,
        None => crate::input::read_stdin("API request")?,
    };
    let ready = api_request(&text).and_then(|r| Ok((r, hypervisor(cli)?)));
    let (request, hv) = match ready {
        Ok(ready) => ready,
        Err(failure) => {
            emit(&Reply::Error(failure.reply()))?;
            return Err(failure);
        }
    };
    let mut progress_failed = None;
    let mut progress = |status: &hv_kvm::MigrationStatus| {
        if let Err(f) = emit(&Reply::Progress(status.clone())) {
            progress_failed.get_or_insert(f);
        }
    };
    let answer = hv.handle_with_progress(request, &mut progress).await;
    if let Some(f) = progress_failed {
        return Err(f);
    }
    match answer {
        Ok(response) => emit(&Reply::Response(response)),
        Err(e) => {
            emit(&Reply::Error(hv_kvm::ErrorReply::from(&e)))?;
            Err(Failure::from(e))
        }
    }
}

async fn node_info(cli: &Cli) -> CliResult {
    render::node(cli.json, &hypervisor(cli)?.node_info().await?)
}

async fn console_info(cli: &Cli, name: &str) -> CliResult {
    render::console_info(cli.json, &hypervisor(cli)?.console(name)?)
}

/// `gkvm powercycle-node`: only with `--confirm` (or `--dry-run`).
async fn powercycle(cli: &Cli, confirm: bool, dry_run: bool) -> CliResult {
    if !confirm && !dry_run {
        return Err(usage(
            "power-cycling reboots this node at once, without stopping its instances; \
             pass --confirm to do it, or --dry-run to see how"
                .into(),
        ));
    }
    let plan = hypervisor(cli)?.powercycle_node(dry_run)?;
    render::powercycle(cli.json, &plan)
}

/// `gkvm verify`: a bad node configuration is one of the problems found
/// (naming its key), not a failure to verify.
async fn verify(cli: &Cli, hvparams: &[String]) -> CliResult {
    let mut report = match hypervisor(cli) {
        Ok(hv) => hv.verify().await,
        Err(e) => hv_kvm::VerifyReport::with_problems(vec![e.message]),
    };
    if !hvparams.is_empty() {
        let pairs: Vec<&str> = hvparams.iter().map(String::as_str).collect();
        match hv_kvm::HvParams::from_pairs(&pairs).and_then(|hv| {
            hv.check_syntax()?;
            Ok(hv)
        }) {
            Ok(hv) => {
                report.warnings = hv
                    .assess()
                    .into_iter()
                    .map(|w| format!("{}: {}", w.key, w.message))
                    .collect();
                // Against this node too (Ganeti's ValidateParameters).
                if let Ok(node) = hypervisor(cli) {
                    let request = Request::ValidateParams { hvparams: hv };
                    if let Err(e) = node.handle(request).await {
                        report.add_param_problem(e.param(), e.report());
                    }
                }
            }
            Err(e) => report.add_param_problem(e.key(), e.to_string()),
        }
    }
    render::verify(cli.json, &report)
}

async fn migration_info(cli: &Cli, name: &str, for_ganeti: bool) -> CliResult {
    let text = hypervisor(cli)?
        .migration_info_settled(name, for_ganeti)
        .await?;
    outln!("{text}")
}

async fn migration_status(cli: &Cli, name: &str) -> CliResult {
    let status = hypervisor(cli)?.migration_status(name).await?;
    render::migration_status(cli.json, name, &status)
}

/// `gkvm release-to-ganeti`: each instance in turn; the first failure
/// ends it (those before it were handed over).
async fn release_to_ganeti(cli: &Cli, names: &[String], all: bool) -> CliResult {
    let hv = hypervisor(cli)?;
    let names = if all {
        hv.list()?
    } else if names.is_empty() {
        return Err(usage("name the instances, or give --all".into()));
    } else {
        names.to_vec()
    };
    for name in &names {
        let request = Request::ReleaseToGaneti {
            instance: name.clone(),
        };
        call(&hv, request).await?;
        render::done(
            cli.json,
            Operation::new(name, "release-to-ganeti"),
            "handed over to Ganeti's own KVM driver",
        )?;
    }
    Ok(())
}

/// An operation that reports nothing but its success.
async fn simple(cli: &Cli, request: Request) -> CliResult {
    let (name, operation, what) = match &request {
        Request::Reboot { instance, .. } => (instance.clone(), "reboot", "rebooted"),
        Request::Resume { instance } => (instance.clone(), "resume", "resumed"),
        Request::Cleanup { instance } => (instance.clone(), "cleanup", "cleaned up"),
        Request::RemoveState { instance } => (instance.clone(), "remove-state", "state removed"),
        Request::CancelMigration { instance } => {
            (instance.clone(), "migrate-cancel", "migration cancelled")
        }
        other => {
            return Err(Failure::new(
                1,
                "internal",
                format!("{other:?} is not simple"),
            ))
        }
    };
    call(&hypervisor(cli)?, request).await?;
    render::done(cli.json, Operation::new(&name, operation), what)
}

async fn caps(
    cli: &Cli,
    help_text: &Option<PathBuf>,
    machine_text: &Option<PathBuf>,
    device_text: &Option<PathBuf>,
) -> CliResult {
    let Some(h) = help_text else {
        let caps = hypervisor(cli)?.capabilities(&default_qemu(cli)?).await?;
        return render::caps(cli.json, &caps);
    };
    let opt = |p: &Option<PathBuf>, what| p.as_deref().map(|p| read_file(p, what)).transpose();
    let caps = Capabilities::from_help(
        &read_file(h, "help text")?,
        &opt(machine_text, "machine list")?.unwrap_or_default(),
        &opt(device_text, "device list")?.unwrap_or_default(),
    )?;
    render::caps(cli.json, &caps)
}

async fn argv(cli: &Cli, instance: &Path) -> CliResult {
    let spec = load_instance(instance)?;
    render::plan(cli.json, &hypervisor(cli)?.plan(&spec).await?)
}

async fn start(cli: &Cli, args: &StartArgs) -> CliResult {
    let mode = if args.paused {
        StartMode::Paused
    } else {
        StartMode::Running
    };
    let hv = hypervisor(cli)?;
    let defined = definition_of(&hv, &args.spec)?;
    if args.dry_run {
        let spec = spec_from_args(&args.spec, defined.map(|d| d.instance))?;
        return render::plan(cli.json, &hv.plan(&spec).await?);
    }
    let waiting = Some(format!(
        "{}: starting QEMU",
        args.spec.name.as_deref().unwrap_or("the instance")
    ));
    let report = while_spinning(cli, waiting, start_resolved(&hv, args, defined, mode)).await;
    render::started(cli.json, &report?)
}

/// `start` once its definition is known: from a managed save or the
/// definition, or from the file and flags.
async fn start_resolved(
    hv: &KvmHypervisor,
    args: &StartArgs,
    defined: Option<Definition>,
    mode: StartMode,
) -> Result<hv_kvm::StartReport, Failure> {
    Ok(match (&args.spec.name, defined) {
        (Some(name), Some(_)) if !args.spec.changes_spec() => {
            hv.start_defined(name, mode).await?
        }
        (Some(name), Some(d)) if d.saved => {
            return Err(usage(format!(
                "{name} has a managed save, which its start restores as it was: start it without flags that change it"
            )))
        }
        (_, defined) => {
            let spec = spec_from_args(&args.spec, defined.map(|d| d.instance))?;
            hv.start(&spec, mode).await?
        }
    })
}

/// Refuses a name this node does not know (a typo), unless `--idempotent`.
fn known(cli: &Cli, hv: &KvmHypervisor, name: &str) -> CliResult {
    if cli.idempotent || hv.is_known(name)? {
        return Ok(());
    }
    Err(Failure {
        instance: Some(name.to_owned()),
        ..Failure::new(
            1,
            "unknown_instance",
            format!(
                "instance {name} is not known on this node: not running, not defined, nothing left of it (--idempotent accepts that)"
            ),
        )
    })
}

/// The definition on this node of the instance the flags name, when
/// they name one without `--file`.
fn definition_of(hv: &KvmHypervisor, args: &SpecArgs) -> Result<Option<Definition>, Failure> {
    let (None, Some(name)) = (&args.file, &args.name) else {
        return Ok(None);
    };
    match hv.definition(name) {
        Ok(d) => Ok(Some(d)),
        Err(hv_kvm::Error::NotDefined { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn define(cli: &Cli, args: &SpecArgs, autostart: bool, no_autostart: bool) -> CliResult {
    let hv = hypervisor(cli)?;
    let defined = definition_of(&hv, args)?;
    let spec = spec_from_args(args, defined.map(|d| d.instance))?;
    let autostart = match (autostart, no_autostart) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    render::defined(cli.json, &hv.define(&spec, autostart).await?)
}

/// `guests-start`, `guests-stop`: what became of each instance; fails
/// (exit 1) when one failed.
fn guests(cli: &Cli, outcomes: Vec<hv_kvm::GuestOutcome>) -> CliResult {
    render::guests(cli.json, &outcomes)?;
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.outcome == "failed")
        .map(|o| o.instance.as_str())
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(Failure::new(
        1,
        "guests",
        format!(
            "{} of {} failed: {}",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        ),
    ))
}

async fn stop(cli: &Cli, name: &str, force: bool, timeout: u64) -> CliResult {
    let mode = if force {
        StopMode::Force
    } else {
        StopMode::Acpi {
            timeout: Duration::from_secs(timeout),
        }
    };
    let hv = hypervisor(cli)?;
    known(cli, &hv, name)?;
    let waiting =
        (!force).then(|| format!("{name}: waiting for the guest to power off (up to {timeout} s)"));
    let outcome = while_spinning(cli, waiting, hv.stop(name, mode)).await;
    render::stopped(cli.json, name, &outcome?)
}

/// A spinner with `message` on stderr while an operation waits, on a
/// terminal only (not with --json or --quiet).
fn spinner(cli: &Cli, message: String) -> Option<indicatif::ProgressBar> {
    (!cli.json && !cli.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(message);
        s.enable_steady_tick(Duration::from_millis(120));
        s
    })
}

/// Awaits `work` with a spinner saying `message` (none when `None`, or
/// not on a terminal), cleared when it ends.
async fn while_spinning<T>(
    cli: &Cli,
    message: Option<String>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let waiting = message.and_then(|m| spinner(cli, m));
    let out = work.await;
    if let Some(s) = waiting {
        s.finish_and_clear();
    }
    out
}

async fn info(cli: &Cli, names: &[String]) -> CliResult {
    render::infos(cli.json, &hypervisor(cli)?.info_many(names).await?)
}

async fn stats(
    cli: &Cli,
    names: &[String],
    options: hv_kvm::StatsOptions,
    prometheus: bool,
) -> CliResult {
    let stats = hypervisor(cli)?.stats_with(names, options).await?;
    if prometheus {
        return render::stats_prometheus(&stats);
    }
    render::stats(cli.json, &stats)
}

async fn list(cli: &Cli, all: bool, style: &render::TableStyle) -> CliResult {
    render::list(cli.json, &hypervisor(cli)?.overview_with(all).await?, style)
}

/// `list -o FIELDS`: the columns asked for (`+FIELDS` adds them to the
/// default ones); none given: the default ones, with AUTOSTART for
/// `--all`.
fn columns(output: Option<&str>, all: bool) -> Result<Vec<render::Column>, Failure> {
    use clap::ValueEnum;
    use render::Column;
    let mut columns = Vec::new();
    let fields = match output {
        None if all => return Ok([&Column::DEFAULT[..], &[Column::Autostart]].concat()),
        None => return Ok(Vec::new()),
        Some(o) => match o.strip_prefix('+') {
            Some(extra) => {
                columns.extend(Column::DEFAULT);
                extra
            }
            None => o,
        },
    };
    for field in fields.split(',').map(str::trim) {
        let c = Column::from_str(&field.replace('_', "-"), true).map_err(|_| {
            let known: Vec<String> = Column::value_variants()
                .iter()
                .filter_map(|c| c.to_possible_value().map(|v| v.get_name().to_owned()))
                .collect();
            usage(format!(
                "-o: unknown field {field:?} (known: {})",
                known.join(", ")
            ))
        })?;
        columns.push(c);
    }
    Ok(columns)
}

async fn balloon(cli: &Cli, name: &str, mib: u64) -> CliResult {
    let request = Request::Balloon {
        instance: name.to_owned(),
        mib,
    };
    call(&hypervisor(cli)?, request).await?;
    let op = Operation::new(name, "balloon").with_target_mib(mib);
    let what = format!("balloon target set to {}", render::human_mib(mib));
    render::done(cli.json, op, &what)
}

async fn nic_add(cli: &Cli, name: &str, text: &str, dry_run: bool) -> CliResult {
    let mut nic = nic_option(text, name)?;
    if !is_json(text)
        && !text
            .split(',')
            .any(|kv| kv.trim_start().starts_with("mac="))
    {
        // Made up: 24 random bits under QEMU's prefix (the instance's own
        // NICs' flag-made MACs come from its name, and a hot-added NIC
        // must not repeat one; the facade refuses a duplicate anyway).
        let mut b = [0u8; 3];
        // SAFETY: getrandom(2) writes at most 3 bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != 3 {
            return Err(usage("no random bytes for a MAC; give mac=".into()));
        }
        nic.mac = hv_kvm::MacAddr::new([0x52, 0x54, 0x00, b[0], b[1], b[2]]);
    }
    let hv = hypervisor(cli)?;
    let nic = if dry_run {
        hv.nic_add_plan(name, nic).await?
    } else {
        hv.nic_add(name, nic).await?
    };
    let (id, slot) = placed(nic.address.as_ref());
    let what = format!("NIC {id} ({})", nic.mac);
    added(cli, name, "nic-add", &id, slot, &what, dry_run)
}

/// A device's id and PCI slot, as placed.
fn placed(address: Option<&hv_kvm::DeviceAddress>) -> (String, Option<u8>) {
    address
        .map(|a| (a.id.clone(), a.pci_slot))
        .unwrap_or_default()
}

/// What a hot plug (or its dry run) says.
fn added(
    cli: &Cli,
    name: &str,
    operation: &'static str,
    id: &str,
    slot: Option<u8>,
    what: &str,
    dry_run: bool,
) -> CliResult {
    let verb = if dry_run { "would be added" } else { "added" };
    let text = match slot {
        Some(s) => format!("{what} {verb} at PCI slot {s:#04x}"),
        None => format!("{what} {verb}"),
    };
    let op = Operation::new(name, operation)
        .with_device(id, slot)
        .dry_run(dry_run);
    render::done(cli.json, op, &text)
}

async fn nic_remove(cli: &Cli, name: &str, id: &str) -> CliResult {
    let request = Request::NicRemove {
        instance: name.to_owned(),
        id: id.to_owned(),
    };
    call(&hypervisor(cli)?, request).await?;
    let op = Operation::new(name, "nic-remove").with_device(id, None);
    render::done(cli.json, op, &format!("NIC {id} removed"))
}

/// Whether a --nic or --disk value is a JSON object.
fn is_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// A --nic value: the text form, or a NIC of the JSON definition.
fn nic_option(text: &str, instance: &str) -> Result<hv_kvm::NicSpec, Failure> {
    if is_json(text) {
        return serde_json::from_str(text).map_err(|e| usage(format!("--nic (JSON): {e}")));
    }
    hv_kvm::NicSpec::parse_option(text, instance, 0).map_err(|e| usage(e.to_string()))
}

async fn disk_add(cli: &Cli, name: &str, text: &str, dry_run: bool) -> CliResult {
    let disk: hv_kvm::DiskSpec = if is_json(text) {
        serde_json::from_str(text).map_err(|e| usage(format!("--disk (JSON): {e}")))?
    } else {
        text.parse()
            .map_err(|e: hv_kvm::CmdlineError| usage(e.to_string()))?
    };
    let hv = hypervisor(cli)?;
    let disk = if dry_run {
        hv.disk_add_plan(name, disk).await?
    } else {
        hv.disk_add(name, disk).await?
    };
    let (id, slot) = placed(disk.address.as_ref());
    added(
        cli,
        name,
        "disk-add",
        &id,
        slot,
        &format!("disk {id}"),
        dry_run,
    )
}

async fn disk_grow(cli: &Cli, name: &str, id: &str, size: &str) -> CliResult {
    let bytes = parse_size(size).ok_or_else(|| {
        usage(format!(
            "{size:?} is not a size (bytes, or a number with K, M, G or T)"
        ))
    })?;
    let request = Request::DiskGrow {
        instance: name.to_owned(),
        id: id.to_owned(),
        bytes,
    };
    call(&hypervisor(cli)?, request).await?;
    let op = Operation::new(name, "disk-grow").with_device(id, None);
    render::done(cli.json, op, &format!("disk {id} grown to {bytes} bytes"))
}

async fn set_limits(cli: &Cli, name: &str, given: &[String]) -> CliResult {
    let mut limits = std::collections::BTreeMap::new();
    for pair in given {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            usage(format!(
                "{pair:?} is not KEY=VALUE (e.g. cgroup_cpu_quota=150)"
            ))
        })?;
        limits.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    if limits.is_empty() {
        return Err(usage("no limit given (e.g. cgroup_cpu_quota=150)".into()));
    }
    let request = Request::SetLimits {
        instance: name.to_owned(),
        limits,
    };
    call(&hypervisor(cli)?, request).await?;
    render::done(
        cli.json,
        Operation::new(name, "set-limits"),
        &format!("{name}: limits set"),
    )
}

async fn io_limits(cli: &Cli, name: &str, group: &str, given: &[String]) -> CliResult {
    let mut limits = hv_kvm::IoLimits::default();
    for pair in given {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| usage(format!("{pair:?} is not KEY=VALUE (e.g. bps-total=10M)")))?;
        limits.set(k, v).map_err(usage)?;
    }
    let request = Request::SetIoLimits {
        instance: name.to_owned(),
        group: group.to_owned(),
        limits,
    };
    call(&hypervisor(cli)?, request).await?;
    let op = Operation::new(name, "io-limits");
    render::done(cli.json, op, &format!("{name}: throttle group {group} set"))
}

/// `1073741824`, `1G`, `512M`, `2T`, `64K` (powers of 1024).
fn parse_size(text: &str) -> Option<u64> {
    hv_kvm::parse_size_bytes(text).ok()
}

async fn attach_console(cli: &Cli, name: &str) -> CliResult {
    let socket = match hypervisor(cli)?.console(name)? {
        hv_kvm::ConsoleInfo::Serial { socket, .. } => socket,
        other => {
            return Err(Failure::from(format!(
                "instance {name} has no serial console ({other:?}); see gkvm console-info"
            )))
        }
    };
    let owned = name.to_owned();
    let ended = tokio::task::spawn_blocking(move || console::attach(&owned, &socket))
        .await?
        .map_err(|e| Failure::new(1, "console", format!("console of {name}: {e}")))?;
    match ended {
        console::Ended::Detached => errln!("\r\ndetached"),
        console::Ended::Closed => errln!("\r\nconsole closed: the instance stopped"),
        console::Ended::Signalled => errln!("\r\nconsole closed by a signal"),
    }
    Ok(())
}

/// This node's value of each `-H` hvparam, for the trust check of the
/// incoming instance.
fn node_hvparams(hv: &mut KvmHypervisor, hvparams: &[String]) -> CliResult {
    for h in hvparams {
        let pair = h.strip_prefix("kvm:").unwrap_or(h);
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| usage(format!("-H {h}: expected KEY=VALUE")))?;
        // Checked like an instance's hvparam, then kept as this node's value.
        hv_kvm::HvParams::default()
            .set_pair(pair)
            .map_err(crate::input::bad_hvparam)?;
        hv.config_mut()
            .node_hvparams
            .insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    Ok(())
}

/// `accept`'s choices beyond where to listen.
struct AcceptOpts<'a> {
    timeout: u64,
    no_wait: bool,
    current: Option<&'a Path>,
    trust_unsealed: bool,
}

async fn accept(
    cli: &Cli,
    info: &Path,
    listen: &str,
    hvparams: &[String],
    opts: AcceptOpts<'_>,
) -> CliResult {
    let (address, port) = split_host_port(listen)?;
    let info = read_file(info, "migration info")?;
    let mut hv = hypervisor(cli)?;
    node_hvparams(&mut hv, hvparams)?;
    if opts.trust_unsealed {
        hv.config_mut().trust_unsealed_migration_info = true;
    }
    let port = hv.port_for_info(&info, port)?;
    let timeout = opts.timeout;
    let config = match opts.current {
        Some(f) => Some(crate::input::load_current(f)?),
        None => None,
    };
    if opts.no_wait {
        let request = Request::AwaitMigration {
            info,
            address,
            port: Some(port),
            config,
        };
        return match call(&hv, request).await? {
            Response::Started(report) => render::done(
                cli.json,
                Operation::new(&report.name, "accept"),
                "waits for its migration",
            ),
            other => Err(unexpected(&other)),
        };
    }
    // Said once QEMU listens there (a script may start the migration on
    // reading it), not before.
    let announce = !cli.json && !cli.quiet;
    let listen_at = render::host_port(&address, port);
    let json = cli.json;
    let host = address.clone();
    let mut listening = |_: &hv_kvm::MigrationStatus| {
        if json {
            // A closed reader must not stop the migration.
            let _ = render::listening_line(&host, port);
        } else if announce {
            errln!("waiting for the migration on {listen_at}");
        }
    };
    let request = Request::Receive {
        info,
        address,
        port: Some(port),
        timeout: Duration::from_secs(timeout),
        config,
    };
    match hv.handle_with_progress(request, &mut listening).await? {
        Response::Started(report) => render::done(
            cli.json,
            Operation::new(&report.name, "accept"),
            "arrived and is running",
        ),
        other => Err(unexpected(&other)),
    }
}

/// A progress bar on a terminal; nothing otherwise.
fn progress_bar(json: bool) -> Option<indicatif::ProgressBar> {
    (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    })
}

async fn migrate(cli: &Cli, name: &str, to: &str, non_live: bool, no_finalize: bool) -> CliResult {
    let (target, port) = split_host_port(to)?;
    let hv = hypervisor(cli)?;
    let json = cli.json;
    let bar = progress_bar(json);
    let started = std::time::Instant::now();
    let mut write_error = None;
    let mut progress = |s: &hv_kvm::MigrationStatus| {
        if let Some(b) = &bar {
            b.set_length(s.total_bytes);
            b.set_position(s.total_bytes.saturating_sub(s.remaining_bytes));
            b.set_message(s.status.to_string());
        } else if json && write_error.is_none() {
            // A closed reader must not stop a migration half way.
            write_error = render::migration_progress_line(s).err();
        }
    };
    let mode = if non_live {
        MigrationMode::Offline
    } else {
        MigrationMode::Live
    };
    let request = if no_finalize {
        Request::MigrateUnfinalized {
            instance: name.to_owned(),
            target,
            port,
            mode,
        }
    } else {
        Request::Migrate {
            instance: name.to_owned(),
            target,
            port,
            mode,
        }
    };
    let result = hv.handle_with_progress(request, &mut progress).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let status = match result? {
        Response::Migration(status) => status,
        other => return Err(unexpected(&other)),
    };
    if let Some(e) = write_error {
        return Err(e);
    }
    render::migrated(json, name, to, started.elapsed(), &status)
}

async fn run_demo(cli: &Cli, guest_dir: Option<&Path>, kvm: bool) -> CliResult {
    // A guest given, else the source tree's test guest, else one made of
    // this host's kernel (an installed system). GKVM_DEMO_HOST_ROOT (for
    // tests) is where the host's /boot, /lib/modules and busybox are.
    let host_root = std::env::var_os("GKVM_DEMO_HOST_ROOT").map(PathBuf::from);
    let guest_dir = match (guest_dir, &host_root) {
        (Some(d), _) => d.to_owned(),
        (None, None) if demo::source_tree_guest_dir().is_some() => {
            demo::source_tree_guest_dir().unwrap_or_default()
        }
        (None, root) => {
            let cache = hypervisor(cli)?.config().state_dir.join("demo-guest");
            let root = root.clone().unwrap_or_else(|| PathBuf::from("/"));
            crate::demo_guest::make(&root, &cache)
                .map_err(|m| Failure::from(format!("demo: {m}")))?
        }
    };
    let opts = demo::DemoOptions {
        guest_dir,
        qemu: default_qemu(cli)?,
        kvm,
    };
    demo::run(opts)
        .await
        .map_err(|message| Failure::from(format!("demo: {message}")))?;
    demo::take_write_error().map_or(Ok(()), |e| Err(Failure::output(e)))
}

fn completions(shell: clap_complete::Shell) -> CliResult {
    let buf = crate::complete::registration(shell).map_err(usage)?;
    use std::io::Write as _;
    std::io::stdout().write_all(&buf).map_err(Failure::output)
}
