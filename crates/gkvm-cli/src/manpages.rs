//! The manual pages (`gkvm manpages DIR`, run by `scripts/build-deb`):
//! gkvm(1) and a page per subcommand rendered from the command line's own
//! definition (clap_mangen), each with EXIT STATUS, ENVIRONMENT, FILES,
//! EXAMPLES (the `--help` examples of that subcommand) and SEE ALSO;
//! gkvm-hvparams(7) and gkvm-node.toml(5) from the code's own tables.

use std::path::Path;

use clap::CommandFactory;

use crate::hvparams_doc::roff;
use crate::{Cli, CliResult, Failure, EXAMPLES};

/// What every page says of exit codes, the environment and files.
const COMMON: &str = r#".SH EXIT STATUS
.TP
.B 0
It did what was asked (an idempotent call whose goal already held too).
.TP
.B 1
The operation failed, or an instance name is unknown on this node; one line on stderr names the instance, parameter or path (a JSON object with \fB--json\fR, whose \fBkind\fR says which class of error).
.TP
.B 2
The command line is wrong: an unknown option, a missing argument, a malformed \fB-H\fR, \fB--nic\fR or size.
.TP
.B 129, 130, 143
Interrupted by SIGHUP, SIGINT or SIGTERM; what it had started was rolled back first.
.SH ENVIRONMENT
.TP
.B GKVM_RUN_DIR, GKVM_NODE_CONFIG, GKVM_KVM_PATH, GKVM_MIGRATION_KEY
As \fB--run-dir\fR, \fB--node-config\fR, \fB--kvm-path\fR and \fB--migration-key\fR.
.TP
.B GKVM_LOG
Logging directives (as RUST_LOG), instead of \fB-v\fR/\fB-q\fR.
.TP
.B NO_COLOR
When set, no colours on stderr (there are none unless stderr is a terminal).
.TP
.B COMPLETE
Set by the shell's completion script (\fBgkvm completions\fR): gkvm answers with completions.
.SH FILES
.TP
.I /etc/gkvm/node.toml
The node's configuration, \fBgkvm-node.toml\fR(5).
.TP
.I /run/gkvm
The run directory: pid files, QMP and console sockets, runtime records, locks.
.TP
.I /var/lib/gkvm
The state directory: \fIdefinitions/NAME.json\fR (\fBgkvm define\fR), \fIsaved/NAME.save\fR (managed saves), \fIinstances/NAME/\fR (UEFI variables, TPM state), \fIdemo-guest/\fR.
.TP
.I /var/log/gkvm
QEMU's log of each instance (\fINAME.log\fR, the previous one \fINAME.log.1\fR), with the default run directory.
.TP
.I /etc/gkvm/migration.key
The key the nodes share to seal migration info.
.TP
.I /usr/lib/systemd/system/gkvm-guests.service, /etc/default/gkvm-guests
The node's boot and shutdown: \fBgkvm guests-start\fR, \fBgkvm guests-stop\fR.
"#;

/// Examples of the subcommands beyond those of `--help` (every page has
/// some: a test checks).
const MORE_EXAMPLES: &[(&str, &[&str])] = &[
    ("define", &["gkvm define web1 --vcpus 4                changes one field, keeps the rest", "gkvm define --file web1.json --no-autostart"]),
    ("start", &["gkvm start web1 --dry-run                   the command line it would run"]),
    ("stop", &["gkvm stop web1 --timeout 0                  press the button and return", "gkvm stop web1 --idempotent                 no error when web1 is unknown here"]),
    ("reboot", &["gkvm reboot web1", "gkvm reboot web1 --file web1.json           restart with reboot_behavior=exit, keymap etc. from the file"]),
    ("resume", &["gkvm start web1 --paused && gkvm resume web1"]),
    ("cleanup", &["gkvm cleanup web1                           after its guest powered off (state shutdown)"]),
    ("remove-state", &["gkvm remove-state web1                      its UEFI variables and TPM state go"]),
    ("release-to-ganeti", &["gkvm release-to-ganeti --all"]),
    ("info", &["gkvm info", "gkvm info web1 --json"]),
    ("stats", &["gkvm stats", "gkvm stats web1 --pss --json"]),
    ("balloon", &["gkvm balloon web1 1G"]),
    ("nic-add", &["gkvm nic-add web1 --nic routed=100,ip=192.0.2.10 --dry-run"]),
    ("nic-modify", &["gkvm nic-modify web1 nic1 --nic bridge=br2"]),
    ("nic-remove", &["gkvm nic-remove web1 nic1"]),
    ("disk-add", &["gkvm disk-add web1 --disk /srv/web1-data.img:ro --dry-run"]),
    ("disk-remove", &["gkvm disk-remove web1 disk1"]),
    ("io-limits", &["gkvm io-limits web1 db bps-read=10M iops-total=500"]),
    ("hotplug-supported", &["gkvm hotplug-supported web1 && gkvm nic-add web1 --nic bridge=br1"]),
    ("node-info", &["gkvm node-info --json"]),
    ("console", &["gkvm console web1                           ^] detaches"]),
    ("console-info", &["gkvm console-info web1"]),
    ("verify", &["gkvm verify", "gkvm verify -H vnc_bind_address=0.0.0.0 -H kvm_path=/usr/bin/qemu-system-x86_64"]),
    ("powercycle-node", &["gkvm powercycle-node --dry-run"]),
    ("migration-info", &["gkvm migration-info web1 > web1.mig", "gkvm migration-info web1 --for-ganeti"]),
    ("finalize-migration", &["gkvm finalize-migration web1 --source", "gkvm finalize-migration web1 --destination --failed"]),
    ("migration-status", &["gkvm migration-status web1 --json"]),
    ("migrate-cancel", &["gkvm migrate-cancel web1"]),
    ("demo", &["gkvm demo", "gkvm demo --kvm                             on hardware where KVM runs Linux guests"]),
    ("completions", &["source <(gkvm completions bash)", "gkvm completions fish > ~/.config/fish/completions/gkvm.fish"]),
    ("api", &["echo '{\"op\": \"list\"}' | gkvm api", "gkvm api --schema > api.json"]),
    ("serve", &["gkvm serve --socket /run/gkvm/api.sock --detach"]),
    ("help", &["gkvm help migrate                           as gkvm migrate --help"]),
    ("guests-start", &["systemctl start gkvm-guests                 what the node's boot runs"]),
    ("guests-stop", &["GKVM_GUESTS_STOP_ARGS=\"--save --timeout 300\"   in /etc/default/gkvm-guests"]),
];

/// Writes every page into `dir`.
pub(crate) fn write_all(dir: &Path) -> CliResult {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::from(format!("creating {}: {e}", dir.display())))?;
    let write = |file: &str, text: &[u8]| -> CliResult {
        std::fs::write(dir.join(file), text)
            .map_err(|e| Failure::from(format!("writing {}: {e}", dir.join(file).display())))
    };
    // Built first: each subcommand then has the global flags (`--json`)
    // its own arguments refer to, as it has when gkvm runs.
    let mut top = Cli::command();
    top.build();
    let version = env!("CARGO_PKG_VERSION");
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("gkvm-{}", sub.get_name());
        let mut page = render(sub.clone().name(name.clone()))?;
        page.push_str(COMMON);
        page.push_str(&examples(sub.get_name()));
        page.push_str(
            ".SH SEE ALSO\n\\fBgkvm\\fR(1), \\fBgkvm-hvparams\\fR(7), \\fBgkvm-node.toml\\fR(5)\n",
        );
        write(&format!("{name}.1"), page.as_bytes())?;
    }
    write(
        "gkvm-hvparams.7",
        crate::hvparams_doc::page(version).as_bytes(),
    )?;
    write(
        "gkvm-node.toml.5",
        crate::node_config::page(version).as_bytes(),
    )?;
    let subs: Vec<String> = top
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| format!("\\fBgkvm-{}\\fR(1)", s.get_name()))
        .collect();
    // The examples of `--help` as the page's EXAMPLES, not as clap's
    // untitled extra section.
    let mut page = render(top.after_help(clap::builder::Resettable::Reset))?;
    page.push_str(COMMON);
    page.push_str(&example_section(
        EXAMPLES
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty()),
    ));
    page.push_str(&format!(
        ".SH SEE ALSO\n{}, \\fBgkvm-hvparams\\fR(7), \\fBgkvm-node.toml\\fR(5)\n",
        subs.join(", ")
    ));
    write("gkvm.1", page.as_bytes())
}

fn render(cmd: clap::Command) -> Result<String, Failure> {
    let name = cmd.get_name().to_owned();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut buf)
        .map_err(|e| Failure::from(format!("rendering {name}: {e}")))?;
    String::from_utf8(buf).map_err(|e| Failure::from(format!("rendering {name}: {e}")))
}

/// The `--help` examples of subcommand `sub`, as an EXAMPLES section
/// (nothing when it has none).
fn examples(sub: &str) -> String {
    let more = MORE_EXAMPLES
        .iter()
        .filter(|(s, _)| *s == sub)
        .flat_map(|(_, lines)| lines.iter().copied());
    let lines: Vec<&str> = EXAMPLES
        .lines()
        .map(str::trim)
        .filter(|l| {
            let command = l.split_once("# ").map_or(*l, |(_, c)| c);
            command.starts_with(&format!("gkvm {sub} ")) || command == format!("gkvm {sub}")
        })
        .chain(more)
        .collect();
    example_section(lines.into_iter())
}

/// An EXAMPLES section of these lines (nothing for none).
fn example_section<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let mut body = String::new();
    for l in lines {
        // Options' dashes are minus signs, to be typed as such.
        body.push_str(&roff(l).replace('-', "\\-"));
        body.push('\n');
    }
    if body.is_empty() {
        return body;
    }
    format!(".SH EXAMPLES\n.nf\n{body}.fi\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_those_of_the_subcommand() {
        let e = examples("stop");
        assert!(e.contains("gkvm stop web1"), "{e}");
        assert!(!e.contains("gkvm start"), "{e}");
        assert!(examples("accept").contains("node2#"));
        assert!(examples("manpages").is_empty());
    }

    #[test]
    fn every_subcommand_has_examples() {
        // Built, as the pages are: with clap's own `help`.
        let mut top = Cli::command();
        top.build();
        for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
            assert!(!examples(sub.get_name()).is_empty(), "{}", sub.get_name());
        }
        for (sub, _) in MORE_EXAMPLES {
            assert!(top.find_subcommand(sub).is_some(), "{sub}");
        }
    }
}
