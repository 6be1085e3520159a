//! Definitions that persist on the node, autostart, and the node's boot
//! and shutdown (`guests-start`, `guests-stop`: what gkvm-guests.service
//! runs), through the real `gkvm` binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gkvm_testkit::{require, Env, KillRunDir, Need, ScratchDir};
use serde_json::Value;

/// A node of its own: run dir, state dir (through a node configuration)
/// and QEMU.
struct Node {
    run: PathBuf,
    state: PathBuf,
    config: PathBuf,
    qemu: PathBuf,
    _kill: KillRunDir,
}

impl Node {
    fn new(dir: &Path, env: &Env) -> Node {
        let run = dir.join("run");
        let state = dir.join("state");
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nlog_dir = \"{}\"\n",
                state.display(),
                dir.join("log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        Node {
            _kill: KillRunDir(run.clone()),
            run,
            state,
            config,
            qemu: env.qemu.clone(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_as(true, args)
    }

    /// Runs a command for a person (no `--json`); its stdout.
    fn text(&self, args: &[&str]) -> String {
        let out = self.run_as(false, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn run_as(&self, json: bool, args: &[&str]) -> Output {
        self.command(json, args).output().unwrap()
    }

    /// gkvm on this node, with `args`.
    fn command(&self, json: bool, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gkvm"));
        c.arg("--run-dir")
            .arg(&self.run)
            .arg("--node-config")
            .arg(&self.config);
        if !self.qemu.as_os_str().is_empty() {
            c.arg("--kvm-path").arg(&self.qemu);
        }
        if json {
            c.arg("--json");
        }
        c.args(args).stdin(Stdio::null());
        c
    }

    /// Runs a command that must succeed; its stdout as JSON.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Runs a command that must fail; its JSON error and exit code.
    fn error(&self, args: &[&str]) -> (Value, i32) {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (err, out.status.code().unwrap())
    }

    /// `list --all` as name → (state, autostart).
    fn all(&self) -> Vec<(String, String, Value)> {
        self.json(&["list", "--all"])
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_owned(),
                    i["state"].as_str().unwrap().to_owned(),
                    i["autostart"].clone(),
                )
            })
            .collect()
    }

    /// The outcome of each instance in a `guests-*` answer.
    fn outcomes(v: &Value) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["instance"].as_str().unwrap().to_owned(),
                    o["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

fn pair(name: &str, outcome: &str) -> (String, String) {
    (name.to_owned(), outcome.to_owned())
}

#[test]
fn defined_instances_start_by_name_and_again_after_the_nodes_shutdown() {
    let Some(env) = require("definitions_boot", &[Need::Root, Need::Guest]) else {
        return;
    };
    let guest = env.guest.clone().unwrap();
    let dir = ScratchDir::new("gkvm-defs");
    let node = Node::new(dir.path(), &env);
    let mut args: Vec<String> = ["define", "defboot1", "--memory", "128", "--autostart"]
        .map(String::from)
        .to_vec();
    for (k, v) in guest.hvparams() {
        args.push("-H".into());
        args.push(format!("{k}={v}"));
    }
    // The guest agent answering says the guest is up (and listens to its
    // power button).
    args.extend(["-H".into(), "use_guest_agent=true".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let def = node.json(&args);
    assert_eq!(def["autostart"], true, "{def}");
    assert_eq!(def["instance"]["memory"], 128, "{def}");
    // A guest-less one without ACPI (a stop kills it at once), not at boot.
    let flag = gkvm_testkit::guestless_kvm_flag();
    node.json(&[
        "define",
        "defboot2",
        "--memory",
        "64",
        "-H",
        flag,
        "-H",
        "acpi=false",
    ]);
    assert_eq!(
        node.all(),
        vec![
            ("defboot1".into(), "shut-off".into(), Value::Bool(true)),
            ("defboot2".into(), "shut-off".into(), Value::Bool(false)),
        ]
    );
    // For a person, and for a script (Ganeti's gnt-instance list options).
    let table = node.text(&["list", "--all"]);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(table.contains("AUTOSTART"), "{table}");
    assert_eq!(
        node.text(&[
            "list",
            "--all",
            "-o",
            "name,autostart,memory",
            "--no-headers",
            "--separator",
            ":",
            "--units",
            "m",
        ]),
        "defboot1:yes:128\ndefboot2:no:64\n"
    );
    let plus = node.text(&["list", "-a", "-o", "+reason", "--units", "g"]);
    assert!(plus.lines().next().unwrap().ends_with("REASON"), "{plus}");
    assert!(plus.contains("0.1"), "{plus}");
    let (e, code) = node.error(&["list", "-o", "name,colour"]);
    assert_eq!((e["kind"].as_str(), code), (Some("usage"), 2), "{e}");
    assert!(e["message"].as_str().unwrap().contains("colour"), "{e}");
    let file = node.state.join("definitions/defboot1.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // By name, from the definition; a flag overrides it for this start.
    let started = node.json(&["start", "defboot2", "--memory", "96"]);
    assert_eq!(started["name"], "defboot2");
    let listed = node.json(&["list", "--all"]);
    let two = &listed.as_array().unwrap()[1];
    assert_eq!(
        (&two["state"], &two["memory_mib"]),
        (&"running".into(), &96.into())
    );
    // The definition itself is unchanged by a start's flags.
    assert_eq!(node.json(&["list", "--all"])[1]["autostart"], false);

    // The node boots: the autostart instance starts, the other runs on.
    let booted = node.json(&["guests-start"]);
    assert_eq!(Node::outcomes(&booted), vec![pair("defboot1", "started")]);
    wait_for_agent(&node, "defboot1");

    // The node shuts down: the guest powers off by its button, the one
    // without ACPI is killed.
    let down = node.json(&["guests-stop", "--timeout", "90"]);
    assert_eq!(
        Node::outcomes(&down),
        vec![pair("defboot1", "powered_off"), pair("defboot2", "killed")]
    );
    assert!(gkvm_testkit::qemus_in(&node.run).is_empty());
    assert_eq!(
        node.all(),
        vec![
            ("defboot1".into(), "shut-off".into(), Value::Bool(true)),
            ("defboot2".into(), "shut-off".into(), Value::Bool(false)),
        ]
    );

    // And boots again: the autostart instance runs again, the other not.
    let booted = node.json(&["guests-start"]);
    assert_eq!(Node::outcomes(&booted), vec![pair("defboot1", "started")]);
    let states: Vec<(String, String)> = node.all().into_iter().map(|(n, s, _)| (n, s)).collect();
    assert_eq!(
        states,
        vec![pair("defboot1", "running"), pair("defboot2", "shut-off")]
    );
    // A second boot call finds it running.
    let again = node.json(&["guests-start"]);
    assert_eq!(
        Node::outcomes(&again),
        vec![pair("defboot1", "already_running")]
    );

    // Autostart off: the next boot leaves it.
    node.json(&["stop", "defboot1", "--force"]);
    node.json(&["autostart", "defboot1", "--disable"]);
    assert_eq!(Node::outcomes(&node.json(&["guests-start"])), vec![]);
    // Undefined, it is gone from the node's list.
    node.json(&["undefine", "defboot1"]);
    node.json(&["undefine", "defboot2"]);
    assert!(node.all().is_empty());
    assert!(!file.exists());
}

/// Waits until the guest agent of `name` answers (the guest is up).
fn wait_for_agent(node: &Node, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = node.json(&["info", name]);
        if info[0]["guest_agent"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "no guest agent: {info}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_managed_save_is_restored_by_the_next_start_and_not_thrown_away_by_undefine() {
    let Some(env) = require("definitions_managed_save", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-defs");
    let node = Node::new(dir.path(), &env);
    let flag = gkvm_testkit::guestless_kvm_flag();
    node.json(&["define", "defsave1", "--memory", "64", "-H", flag]);
    let first = node.json(&["start", "defsave1"]);
    // Not defined: stopped at shutdown, whatever the action.
    node.json(&[
        "start",
        "defsave2",
        "--memory",
        "64",
        "-H",
        flag,
        "-H",
        "acpi=false",
    ]);

    let down = node.json(&["guests-stop", "--save", "--timeout", "5"]);
    assert_eq!(
        Node::outcomes(&down),
        vec![pair("defsave1", "saved"), pair("defsave2", "killed")]
    );
    let saved = node.state.join("saved/defsave1.save");
    assert!(saved.is_file());
    let listed = node.json(&["list", "--all"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["state"], "shut-off");
    assert!(listed[0]["reason"]
        .as_str()
        .unwrap()
        .contains("managed save"));

    // Undefining would throw the saved guest away: refused, unless asked.
    let (e, code) = node.error(&["undefine", "defsave1"]);
    assert_eq!((e["kind"].as_str(), code), (Some("state"), 1), "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("managed save"),
        "{e}"
    );
    // A start that would change it is refused; one by name restores it.
    let (e, code) = node.error(&["start", "defsave1", "--memory", "128"]);
    assert_eq!((e["kind"].as_str(), code), (Some("usage"), 2), "{e}");
    let booted = node.json(&["guests-start"]);
    assert_eq!(Node::outcomes(&booted), vec![pair("defsave1", "restored")]);
    assert!(!saved.exists(), "the managed save is used once");
    let info = node.json(&["info", "defsave1"]);
    assert_eq!(info[0]["state"], "running");
    assert_ne!(info[0]["pid"], first["pid"]);

    // Undefined while it runs: it runs on; with its state removed, only
    // once it is stopped.
    let (e, _) = node.error(&["undefine", "defsave1", "--remove-state"]);
    assert_eq!(e["kind"], "state", "{e}");
    node.json(&["undefine", "defsave1"]);
    assert_eq!(node.json(&["info", "defsave1"])[0]["state"], "running");
    let (e, code) = node.error(&["autostart", "defsave1"]);
    assert_eq!((e["kind"].as_str(), code), (Some("not_defined"), 1), "{e}");
    node.json(&["stop", "defsave1", "--force"]);
}

#[test]
fn definitions_are_validated_and_a_tampered_one_is_an_error_naming_its_file() {
    let Some(env) = require("definitions_tampered", &[]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-defs");
    let node = Node::new(dir.path(), &env);
    // Validated before anything is written.
    let (e, code) = node.error(&["define", "deftamp1", "-H", "no_such_param=1"]);
    assert_eq!((e["kind"].as_str(), code), (Some("params"), 2), "{e}");
    let (e, _) = node.error(&["define", "bad/name"]);
    assert!(e["message"].as_str().unwrap().contains("bad/name"), "{e}");
    let (e, _) = node.error(&["define", "deftamp1", "--memory", "0"]);
    assert_eq!(e["kind"], "params", "{e}");
    assert!(!node.state.join("definitions/deftamp1.json").exists());

    node.json(&["define", "deftamp1", "--memory", "64"]);
    // Redefined with a flag: the rest of the definition is kept.
    node.json(&["define", "deftamp1", "--vcpus", "2", "--autostart"]);
    let def = node.json(&["define", "deftamp1"]);
    assert_eq!(
        (
            &def["instance"]["memory"],
            &def["instance"]["vcpus"],
            &def["autostart"]
        ),
        (&64.into(), &2.into(), &true.into())
    );
    let file = node.state.join("definitions/deftamp1.json");
    let good = std::fs::read(&file).unwrap();
    let expect_error = |what: &str, needle: &str| {
        let (e, code) = node.error(&["list", "--all"]);
        assert_eq!(
            (e["kind"].as_str(), code),
            (Some("definition"), 1),
            "{what}: {e}"
        );
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(file.to_str().unwrap()), "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
        let (e, _) = node.error(&["start", "deftamp1"]);
        assert_eq!(e["kind"], "definition", "{what}: {e}");
        // `verify` lists it among the node's problems.
        let out = node.run(&["verify"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            report["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().contains(file.to_str().unwrap())),
            "{what}: {report}"
        );
        assert!(gkvm_testkit::qemus_in(&node.run).is_empty());
    };
    std::fs::write(&file, b"{\"version\": 1, \"autostart\": tr").unwrap();
    expect_error("garbage", "not a definition");
    // The good file with one thing changed.
    let changed = |from: &str, to: &str| {
        let text = String::from_utf8(good.clone()).unwrap();
        std::fs::write(&file, text.replace(from, to)).unwrap();
    };
    changed("\"deftamp1\"", "\"other\"");
    expect_error("another name", "\"other\"");
    changed("\"version\": 1", "\"version\": 7");
    expect_error("a later version", "version 7");
    std::fs::write(&file, &good).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    expect_error("writable by others", "mode 0666");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(dir.path().join("node.toml"), &file).unwrap();
    expect_error("a symlink", "regular file");
    // A broken definition can still be undefined: the link goes, not what
    // it points to.
    node.json(&["undefine", "deftamp1"]);
    assert!(file.symlink_metadata().is_err());
    assert!(dir.path().join("node.toml").is_file());
    // Unknown names are errors, whatever the command.
    for args in [vec!["undefine", "deftamp1"], vec!["autostart", "deftamp1"]] {
        let (e, _) = node.error(&args);
        assert_eq!(e["kind"], "not_defined", "{args:?}: {e}");
        assert_eq!(e["instance"], "deftamp1", "{args:?}: {e}");
    }
    assert!(node.all().is_empty());
}

/// What bash completes for `line` (its last word being completed), with
/// gkvm's completion script loaded and this node in the environment.
fn bash_completes(node: &Node, line: &str) -> Vec<String> {
    let script = node.text(&["completions", "bash"]);
    let words: Vec<&str> = line.split(' ').collect();
    let exe = Path::new(env!("CARGO_BIN_EXE_gkvm"));
    let test = format!(
        "{script}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE='{line}'\nCOMP_POINT={point}\n\
         _clap_complete_gkvm gkvm '{last}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        words = words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
        cword = words.len() - 1,
        point = line.len(),
        last = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&test)
        .env(
            "PATH",
            format!(
                "{}:{}",
                exe.parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("GKVM_RUN_DIR", &node.run)
        .env("GKVM_NODE_CONFIG", &node.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    got.sort();
    got
}

#[test]
fn bash_completes_the_nodes_instance_names_and_hvparam_keys() {
    let Some(env) = require("definitions_completion", &[Need::Root]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-defs");
    let node = Node::new(dir.path(), &env);
    node.json(&["define", "defcompa", "--memory", "64"]);
    node.json(&["define", "defcompb", "--memory", "64"]);
    node.json(&["define", "other1", "--memory", "64"]);
    assert_eq!(
        bash_completes(&node, "gkvm start defc"),
        vec!["defcompa", "defcompb"]
    );
    // An empty word: the names, and the command's options.
    let all = bash_completes(&node, "gkvm undefine ");
    for name in ["defcompa", "defcompb", "other1", "--remove-state"] {
        assert!(all.iter().any(|c| c == name), "{name}: {all:?}");
    }
    assert_eq!(
        bash_completes(&node, "gkvm start web1 -H kernel_p"),
        vec!["kernel_path="]
    );
    assert_eq!(
        bash_completes(&node, "gkvm guests-st"),
        vec!["guests-start", "guests-stop"]
    );
}

#[test]
fn two_boots_racing_start_each_autostart_instance_once() {
    let Some(env) = require("definitions_racing_boots", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-defs");
    let node = Node::new(dir.path(), &env);
    let flag = gkvm_testkit::guestless_kvm_flag();
    let names = ["defrace1", "defrace2", "defrace3"];
    for n in names {
        node.json(&[
            "define",
            n,
            "--memory",
            "64",
            "-H",
            flag,
            "-H",
            "acpi=false",
            "--autostart",
        ]);
    }
    // Two gkvm-guests (or an administrator's guests-start beside the
    // unit's): every instance starts once, and neither fails for it.
    let spawn = || {
        node.command(true, &["guests-start"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let mut seen: Vec<(String, String)> = Vec::new();
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen.extend(Node::outcomes(
            &serde_json::from_slice(&out.stdout).unwrap(),
        ));
    }
    for n in names {
        let started = seen
            .iter()
            .filter(|(i, o)| i == n && o == "started")
            .count();
        let already = seen
            .iter()
            .filter(|(i, o)| i == n && o == "already_running")
            .count();
        assert_eq!((started, already), (1, 1), "{n}: {seen:?}");
    }
    assert_eq!(gkvm_testkit::qemus_in(&node.run).len(), names.len());
    let down = node.json(&["guests-stop", "--timeout", "5"]);
    assert_eq!(Node::outcomes(&down).len(), names.len());
    assert!(gkvm_testkit::qemus_in(&node.run).is_empty());
}
