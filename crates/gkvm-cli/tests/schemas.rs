//! The `--json` contract: real output of real QEMU validated against the
//! schemas in `schemas/v1/`, errors as JSON on stderr with their exit
//! codes, and log colours only on a terminal.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gkvm_testkit::{require, KillRunDir, Need, ScratchDir};
use serde_json::Value;

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../schemas/v1")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&value).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check(name: &str, doc: &Value) {
    let v = schema(name);
    let errors: Vec<String> = v.iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{doc:#}");
    // Version 1 grows by new fields: what a later gkvm adds (here, at the
    // top and in every nested object) still validates for a consumer of
    // this schema.
    let mut newer = doc.clone();
    add_field(&mut newer);
    let errors: Vec<String> = v.iter_errors(&newer).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{name}, with a new field: {errors:?}\n{newer:#}"
    );
}

/// Adds a field no schema knows to every object in `v`.
fn add_field(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for child in map.values_mut() {
                add_field(child);
            }
            map.insert("a_later_field".into(), Value::Bool(true));
        }
        Value::Array(items) => items.iter_mut().for_each(add_field),
        _ => {}
    }
}

struct Node {
    run: PathBuf,
    qemu: PathBuf,
    /// A node configuration (a state dir of the test's own).
    config: Option<PathBuf>,
    _kill: KillRunDir,
}

impl Node {
    fn new(dir: &Path, qemu: &Path) -> Node {
        let run = dir.join("run");
        Node {
            _kill: KillRunDir(run.clone()),
            run,
            qemu: qemu.to_owned(),
            config: None,
        }
    }

    /// A node whose state dir (definitions, managed saves) is in `dir`.
    fn with_state(dir: &Path, qemu: &Path) -> Node {
        let config = dir.join("node.toml");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            &config,
            format!("state_dir = \"{}\"\n", dir.join("state").display()),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        Node {
            config: Some(config),
            ..Node::new(dir, qemu)
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gkvm"));
        c.arg("--run-dir")
            .arg(&self.run)
            .arg("--kvm-path")
            .arg(&self.qemu)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null());
        if let Some(config) = &self.config {
            c.arg("--node-config").arg(config);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
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

    /// Runs a command that must fail; its stderr as JSON (checked against
    /// error.json, and its exit_code against the real one).
    fn error(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err: Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        check("error", &err);
        assert_eq!(
            err["exit_code"].as_i64(),
            out.status.code().map(i64::from),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        err
    }
}

#[test]
fn definition_outputs_match_their_schemas() {
    let Some(env) = require("json_schemas_definitions", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-schemas");
    let a = Node::with_state(dir.path(), &env.qemu);
    let accel = accel();
    let v = a.json(&[
        "define",
        "scdef1",
        "--memory",
        "64",
        "-H",
        &accel,
        "--autostart",
    ]);
    check("definition", &v);
    a.json(&[
        "define",
        "scdef2",
        "--memory",
        "64",
        "-H",
        &accel,
        "-H",
        "acpi=false",
    ]);
    check("instance-list", &a.json(&["list", "--all"]));
    let v = a.json(&["guests-start"]);
    check("guests", &v);
    assert_eq!(v[0]["outcome"], "started", "{v}");
    let v = a.json(&["list", "--all"]);
    check("instance-list", &v);
    assert_eq!(
        (&v[0]["state"], &v[1]["state"]),
        (&"running".into(), &"shut-off".into())
    );
    for (args, op) in [
        (vec!["autostart", "scdef1", "--disable"], "autostart"),
        (vec!["undefine", "scdef2"], "undefine"),
    ] {
        let v = a.json(&args);
        check("operation", &v);
        assert_eq!(v["operation"], op);
    }
    // A save that fails (no room for it: its directory is a file) falls
    // back to a stop, and says so.
    std::fs::write(dir.path().join("state/saved"), b"").unwrap();
    let v = a.json(&["guests-stop", "--save", "--timeout", "1"]);
    check("guests", &v);
    assert_eq!(v[0]["outcome"], "killed", "{v}");
    assert!(
        v[0]["error"]["message"].as_str().unwrap().contains("saved"),
        "{v}"
    );
    let e = a.error(&["undefine", "scdef2"]);
    assert_eq!(e["kind"], "not_defined", "{e}");
}

fn accel() -> String {
    gkvm_testkit::guestless_kvm_flag().to_owned()
}

#[test]
fn every_json_output_matches_its_schema() {
    let Some(env) = require("json_schemas", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-schemas");
    let a = Node::new(&dir.path().join("a"), &env.qemu);
    let b = Node::new(&dir.path().join("b"), &env.qemu);
    let accel = accel();

    check("caps", &a.json(&["caps"]));
    check("powercycle", &a.json(&["powercycle-node", "--dry-run"]));
    let spec = dir.path().join("sc1.json");
    std::fs::write(
        &spec,
        r#"{"name": "sc1", "memory": 64, "hvparams": {"kvm_flag": "disabled"}}"#,
    )
    .unwrap();
    check("argv", &a.json(&["argv", spec.to_str().unwrap()]));

    check(
        "start",
        &a.json(&["start", "sc1", "--memory", "64", "-H", &accel, "--paused"]),
    );
    a.json(&["start", "sc2", "--memory", "64", "-H", &accel]);
    for args in [
        vec!["list"],
        vec!["info"],
        vec!["info", "sc1"],
        vec!["info", "sc1", "sc2"],
    ] {
        let v = a.json(&args);
        check("instance-list", &v);
        assert!(!v.as_array().unwrap().is_empty(), "{args:?}");
    }
    assert_eq!(a.json(&["info", "sc1"])[0]["state"], "paused");
    for (args, op) in [
        (vec!["balloon", "sc1", "32"], "balloon"),
        (vec!["resume", "sc1"], "resume"),
        (vec!["reboot", "sc1"], "reboot"),
    ] {
        let v = a.json(&args);
        check("operation", &v);
        assert_eq!(v["operation"], op);
    }
    // A NIC plugged in: its device id and slot.
    let br = gkvm_testkit::Bridge::new("gkvmscbr0");
    let nic = format!("bridge={},mac=52:54:00:00:73:01", br.0);
    // A dry run says where it would go, and plugs nothing.
    let dry = a.json(&["nic-add", "sc1", "--nic", &nic, "--dry-run"]);
    check("operation", &dry);
    assert_eq!(dry["dry_run"], true, "{dry}");
    let v = a.json(&["nic-add", "sc1", "--nic", &nic]);
    check("operation", &v);
    assert_eq!(v["operation"], "nic-add");
    assert!(v.get("dry_run").is_none(), "{v}");
    assert_eq!(
        (&v["device"], &v["pci_slot"]),
        (&dry["device"], &dry["pci_slot"])
    );
    assert!(v["device"].as_str().unwrap().starts_with("nic"), "{v}");
    assert!(v["pci_slot"].as_u64().unwrap() >= 12, "{v}");
    let e = a.error(&["nic-remove", "sc1", "no-such-nic"]);
    assert_eq!(e["kind"], "hotplug", "{e}");
    for args in [vec!["stats"], vec!["stats", "sc1", "--pss"]] {
        let v = a.json(&args);
        check("stats", &v);
        assert!(!v.as_array().unwrap().is_empty(), "{args:?}");
    }
    let v = a.json(&["stats", "sc1", "--pss"]);
    assert!(v[0]["pss_bytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v[0]["vcpus"].as_array().unwrap().len(), 1, "{v}");
    check("migration-status", &a.json(&["migration-status", "sc1"]));
    check("console-info", &a.json(&["console-info", "sc1"]));
    check("node-info", &a.json(&["node-info"]));
    check("verify", &a.json(&["verify"]));

    // A migration: accept's report, and migrate's JSON Lines.
    let info = dir.path().join("sc2.mig");
    std::fs::write(&info, a.run(&["migration-info", "sc2"]).stdout).unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16 + 77;
    let listen = format!("127.0.0.1:{port}");
    let mut accept = b
        .cmd(&[
            "accept",
            info.to_str().unwrap(),
            "--listen",
            &listen,
            "--trust-unsealed",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first line says QEMU listens: the migration may start at once.
    let mut stdout = std::io::BufReader::new(accept.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    let listening: Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
    check("accept-listening", &listening);
    assert_eq!(listening["address"], listen.as_str());
    let out = a.run(&["migrate", "sc2", "--to", &listen]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    for l in &lines {
        check("migration-status", l);
    }
    assert_eq!(lines.last().unwrap()["status"], "completed");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let accepted = accept.wait_with_output().unwrap();
    assert!(accepted.status.success());
    let v: Value = serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{rest:?}: {e}"));
    check("operation", &v);
    assert_eq!(v["operation"], "accept");

    // Saved and restored: the save's report, then a start's.
    let saved = dir.path().join("sc1.save");
    let saved_s = saved.to_str().unwrap();
    let v = a.json(&["save", "sc1", saved_s]);
    check("save", &v);
    assert_eq!(v["file"], saved_s);
    let e = a.error(&["restore", info.to_str().unwrap()]);
    assert_eq!(e["kind"], "save_file", "{e}");
    let v = a.json(&["restore", saved_s]);
    check("start", &v);
    assert_eq!(
        (v["name"].as_str(), v["paused"].as_bool()),
        (Some("sc1"), Some(false))
    );

    for (node, name) in [(&a, "sc1"), (&b, "sc2")] {
        let v = node.json(&["stop", name, "--force"]);
        check("operation", &v);
        assert_eq!(v["outcome"], "killed");
    }

    // Errors, as JSON on stderr with the exit code they state.
    let e = a.error(&["info", "nosuch"]);
    assert_eq!(
        (e["kind"].as_str(), e["instance"].as_str()),
        (Some("not_running"), Some("nosuch"))
    );
    let e = a.error(&["start", "sc1", "--memory", "lots"]);
    assert_eq!(
        (e["kind"].as_str(), e["exit_code"].as_i64()),
        (Some("usage"), Some(2))
    );
    let e = a.error(&["no-such-command"]);
    assert_eq!(e["kind"], "usage");
    // A missing argument is named, as clap's text names it.
    let e = a.error(&["balloon", "sc1"]);
    assert_eq!(e["kind"], "usage");
    assert!(e["message"].as_str().unwrap().ends_with("<MIB>"), "{e}");
    let e = a.error(&["list", "--nosuch"]);
    assert!(e["message"].as_str().unwrap().contains("--nosuch"), "{e}");
    let e = a.error(&["balloon", "sc1", "0"]);
    assert_eq!(e["kind"], "not_running");
    let e = a.error(&["start", "--file", "/dev/zero"]);
    assert_eq!(e["kind"], "input");
}

/// Runs `gkvm` under a pseudo-terminal (util-linux `script`), so its
/// stderr is a terminal; returns what the terminal showed.
fn on_a_terminal(args: &str, no_color: bool) -> String {
    let gkvm = env!("CARGO_BIN_EXE_gkvm");
    let mut c = Command::new("script");
    c.args(["-qec", &format!("{gkvm} {args}"), "/dev/null"])
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    if no_color {
        c.env("NO_COLOR", "1");
    }
    String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
}

#[test]
fn log_colours_only_on_a_terminal() {
    let dir = ScratchDir::new("gkvm-colour");
    let run = dir.path().join("run");
    let args = format!("--run-dir {} -vv list", run.display());
    let coloured = on_a_terminal(&args, false);
    assert!(
        coloured.contains("DEBUG") || coloured.contains("INFO"),
        "{coloured:?}"
    );
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(&args, true);
    assert!(!plain.contains('\u{1b}'), "NO_COLOR ignored: {plain:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_gkvm"))
        .args(["--run-dir", run.to_str().unwrap(), "-vv", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\u{1b}'),
        "escape codes in a redirected file: {err:?}"
    );
}

/// A graceful stop that waits says so on a terminal (a spinner), and
/// nowhere else.
#[test]
fn a_waiting_stop_says_so_on_a_terminal_only() {
    let Some(env) = require("stop_spinner", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-spin");
    let a = Node::new(dir.path(), &env.qemu);
    a.json(&["start", "sp1", "--memory", "64", "-H", &accel()]);
    let run = dir.path().join("run");
    let stop = format!("--run-dir {} stop sp1 --timeout 1", run.display());
    let shown = on_a_terminal(&stop, true);
    assert!(
        shown.contains("sp1: waiting for the guest to power off (up to 1 s)"),
        "{shown:?}"
    );
    let out = a.run(&["stop", "sp1", "--timeout", "1"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("waiting for"));
    a.json(&["stop", "sp1", "--force"]);
}

/// The committed API schema and reference are what the types generate
/// (`gkvm api --schema`, `gkvm api --reference`), and every example in the
/// reference parses (the generator refuses one that does not).
#[test]
fn api_schema_and_reference_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (flag, file) in [
        ("--schema", "schemas/v1/api.json"),
        ("--reference", "docs/API.md"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gkvm"))
            .args(["api", flag])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let committed = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout) == committed,
            "{file} is not what the API's types generate: run `gkvm api {flag} > {file}`"
        );
    }
}
