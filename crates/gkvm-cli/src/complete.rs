//! Shell completion that knows the node: instance names (running, or
//! defined here) and hypervisor parameter keys are asked of `gkvm` itself
//! at the moment of completion (clap_complete's dynamic completion). The
//! script a shell loads (`gkvm completions bash|zsh|fish`, shipped in the
//! Debian package) only calls `COMPLETE=SHELL gkvm -- WORDS...`.

use std::ffi::OsStr;

use clap::CommandFactory;
use clap_complete::engine::{ArgValueCandidates, ArgValueCompleter, CompletionCandidate};

use crate::input::{hypervisor_of, NodeOptions};
use crate::Cli;

/// The variable that asks for completions.
const VAR: &str = "COMPLETE";

/// Answers a completion request and exits, when the shell made one; else
/// returns at once.
pub(crate) fn answer() {
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .var(VAR)
        .complete();
}

/// The script that registers gkvm's completion with `shell`, calling
/// `gkvm` from `PATH`.
pub(crate) fn registration(shell: clap_complete::Shell) -> Result<Vec<u8>, String> {
    use clap_complete::env::{Bash, Elvish, EnvCompleter, Fish, Powershell, Zsh};
    let completer: &dyn EnvCompleter = match shell {
        clap_complete::Shell::Bash => &Bash,
        clap_complete::Shell::Zsh => &Zsh,
        clap_complete::Shell::Fish => &Fish,
        clap_complete::Shell::Elvish => &Elvish,
        clap_complete::Shell::PowerShell => &Powershell,
        other => return Err(format!("no completion for {other}")),
    };
    let mut buf = Vec::new();
    completer
        .write_registration(VAR, "gkvm", "gkvm", "gkvm", &mut buf)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Instance names of this node: running, or defined.
pub(crate) fn instances() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        // The node of the environment (a flag on the command line being
        // completed is not parsed yet).
        let opts = NodeOptions {
            run_dir: std::env::var_os("GKVM_RUN_DIR").map(Into::into),
            node_config: std::env::var_os("GKVM_NODE_CONFIG").map(Into::into),
            ..NodeOptions::default()
        };
        let Ok(hv) = hypervisor_of(&opts) else {
            return Vec::new();
        };
        let mut names = hv.list().unwrap_or_default();
        names.extend(
            hv.definitions()
                .unwrap_or_default()
                .into_iter()
                .map(|d| d.instance.name),
        );
        names.sort();
        names.dedup();
        names.into_iter().map(CompletionCandidate::new).collect()
    })
}

/// `-H KEY=VALUE`: the keys, each with its `=`.
pub(crate) fn hvparams() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| {
        let current = current.to_string_lossy();
        if current.contains('=') {
            return Vec::new();
        }
        let current = current.strip_prefix("kvm:").unwrap_or(&current);
        hv_kvm::HvParams::keys()
            .into_iter()
            .filter(|k| k.starts_with(current))
            .map(|k| CompletionCandidate::new(format!("{k}=")))
            .collect()
    })
}
