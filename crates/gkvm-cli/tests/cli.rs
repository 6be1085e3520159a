//! The real `gkvm` binary, as an administrator would run it.

use gkvm_testkit::{require, Need, ScratchDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gkvm(run_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gkvm"))
        .arg("--run-dir")
        .arg(run_dir)
        .args(args)
        .output()
        .expect("run gkvm")
}

fn data(profile: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kvm-cmdline/tests/data")
        .join(profile)
        .join(file)
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json output parses")
}

#[test]
fn caps_from_captured_text_of_both_versions() {
    let dir = ScratchDir::new("gkvm-cli");
    for (profile, major, default) in [
        ("qemu-7.2", 7, "pc-i440fx-7.2"),
        ("qemu-10.0", 10, "pc-i440fx-10.0"),
    ] {
        let h = data(profile, "help.txt");
        let m = data(profile, "machine.txt");
        let d = data(profile, "device.txt");
        let out = gkvm(
            dir.path(),
            &[
                "caps",
                "--json",
                "--help-text",
                h.to_str().unwrap(),
                "--machine-text",
                m.to_str().unwrap(),
                "--device-text",
                d.to_str().unwrap(),
            ],
        );
        let v = json(&out);
        assert_eq!(v["version"]["major"], major);
        assert_eq!(v["default_machine"], default);
        for key in [
            "drive_boot",
            "qmp",
            "spice",
            "vhost_net",
            "enable_kvm",
            "netdev",
            "display",
            "machine",
            "uuid",
            "virtio_net_pci",
        ] {
            assert!(v["features"][key].is_boolean(), "{key}");
        }
        assert!(v["machines"].as_array().unwrap().len() > 10);
        assert!(v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "virtio-net-pci"));
    }
}

#[test]
fn caps_probe_of_the_installed_qemu_is_cached() {
    let Some(env) = require("gkvm_caps_probe", &[Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-cli-probe");
    let qemu = env.qemu.to_str().unwrap().to_owned();
    let v = json(&gkvm(dir.path(), &["caps", "--json", "--kvm-path", &qemu]));
    assert!(v["version"]["major"].as_u64().unwrap() >= 7);
    // The probe was cached on disk under the run dir.
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("caps"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 1);
    // Human output names the version.
    let out = gkvm(dir.path(), &["caps", "--kvm-path", &qemu]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(v["version"]["text"].as_str().unwrap()));
}

#[test]
fn argv_dry_run() {
    let Some(env) = require("gkvm_argv", &[Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-cli-argv");
    let spec = dir.path().join("web1.json");
    std::fs::write(
        &spec,
        r#"{"name": "web1", "memory": 256, "vcpus": 2,
            "disks": [{"path": "/srv/web1,a.img"}],
            "nics": [{"mac": "52:54:00:aa:bb:cc", "link": "br0"}],
            "hvparams": {"use_localtime": "true", "kvm_flag": "disabled"}}"#,
    )
    .unwrap();
    let qemu = env.qemu.to_str().unwrap().to_owned();
    let v = json(&gkvm(
        dir.path(),
        &[
            "argv",
            "--json",
            "--kvm-path",
            &qemu,
            spec.to_str().unwrap(),
        ],
    ));
    let argv: Vec<String> = serde_json::from_value(v["argv"].clone()).unwrap();
    assert_eq!(argv[0], qemu);
    // Ganeti 3.1's assessment: cpu_type is unset in this definition.
    assert!(
        v["warnings"].to_string().contains("cpu_type"),
        "{}",
        v["warnings"]
    );
    let joined = argv.join(" ");
    assert!(
        joined.contains("-name web1,debug-threads=on -nodefaults -m 256 -smp 2"),
        "{joined}"
    );
    assert!(
        joined.contains("file.filename=/srv/web1,,a.img"),
        "{joined}"
    );
    assert!(joined.contains("-rtc base=localtime"), "{joined}");
    assert!(joined.contains(",accel=tcg"), "{joined}");
    assert!(joined.contains(&format!(
        "-qmp unix:{}/ctrl/web1.qmp,server=on,wait=off",
        dir.path().display()
    )));
    assert_eq!(
        v["machine"],
        argv.iter()
            .skip_while(|a| *a != "-machine")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
    );
    // Human form is one shell line.
    let out = gkvm(
        dir.path(),
        &["argv", "--kvm-path", &qemu, spec.to_str().unwrap()],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn errors_are_one_line_with_exit_codes() {
    let dir = ScratchDir::new("gkvm-cli-err");
    let bad = dir.path().join("bad.json");
    for (content, needle) in [
        ("{not json", "not a valid instance definition"),
        (r#"{"name": "-evil", "memory": 64}"#, "instance -evil"),
        (
            r#"{"name": "ok1", "memory": 64, "hvparams": {"acpi": "perhaps"}}"#,
            "acpi",
        ),
        (
            r#"{"name": "ok1", "memory": 64, "hvparams": {"no_such_param": 1}}"#,
            "no_such_param",
        ),
        (
            r#"{"name": "ok1", "memory": 64, "hvparams": {"kernel_path": "/k\nx"}}"#,
            "kernel_path",
        ),
    ] {
        std::fs::write(&bad, content).unwrap();
        let out = gkvm(
            dir.path(),
            &["argv", "--kvm-path", "/bin/true", bad.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(1), "{content}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.starts_with("gkvm: error: "), "{err}");
        assert!(err.contains(needle), "{content}: {err}");
    }
    let out = gkvm(dir.path(), &["caps", "--kvm-path", "/nonexistent/qemu"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("scripts/install-deps"));
    let out = gkvm(dir.path(), &["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
    // A command line's bad values are usage errors alike (exit 2),
    // whichever flag carries them.
    for bad in [
        &["start", "x1", "-H", "no_such_param=1"][..],
        &["start", "x1", "-H", "kvm_flag=maybe"],
        &["start", "x1", "--nic", "garbage"],
        &["start", "x1", "--memory", "lots"],
    ] {
        let out = gkvm(dir.path(), bad);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = gkvm(dir.path(), &["caps", "--machine-text", "x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--machine-text needs --help-text"
    );
}

#[test]
fn completions_for_three_shells() {
    let dir = ScratchDir::new("gkvm-cli-comp");
    for shell in ["bash", "zsh", "fish"] {
        let out = gkvm(dir.path(), &["completions", shell]);
        assert!(out.status.success());
        // Each asks gkvm itself at completion time (tests/definitions.rs
        // completes with bash for real).
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("COMPLETE") && script.contains("gkvm"),
            "{shell}: {script}"
        );
    }
}

#[test]
fn lifecycle_subcommands() {
    let Some(env) = require("gkvm_lifecycle_cli", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-cli-life");
    let run = dir.path().join("run");
    // A failing assertion must not leave its QEMUs running.
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let qemu = env.qemu.to_str().unwrap().to_owned();
    let accel = if gkvm_testkit::guestless_accel() == "kvm" {
        "enabled"
    } else {
        "disabled"
    };
    let g = |args: &[&str]| {
        let mut all = vec!["--kvm-path", qemu.as_str()];
        all.extend_from_slice(args);
        gkvm(&run, &all)
    };
    let out = g(&[
        "start",
        "cli1",
        "--memory",
        "96M",
        "--vcpus",
        "2",
        "-H",
        &format!("kvm_flag={accel}"),
        "--json",
    ]);
    let started = json(&out);
    assert_eq!(started["name"], "cli1");
    let pid = started["pid"].as_i64().unwrap();
    let out = g(&[
        "start",
        "cli2",
        "--memory",
        "64",
        "--paused",
        "-H",
        &format!("kvm:kvm_flag={accel}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused"));

    // Human table, aligned, with units.
    let out = g(&["list"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME") && lines[0].contains("MEMORY"));
    assert!(
        lines[1].starts_with("cli1") && lines[1].contains("96 MiB") && lines[1].contains("running"),
        "{table}"
    );
    assert!(lines[2].contains("paused"), "{table}");
    assert_eq!(
        lines[1].find("STATE").or(lines[0].find("STATE")),
        lines[0].find("STATE")
    );

    let all = json(&g(&["list", "--json"]));
    assert_eq!(all.as_array().unwrap().len(), 2);
    let info = json(&g(&["info", "cli1", "--json"]))[0].clone();
    assert_eq!(
        (
            info["pid"].as_i64().unwrap(),
            info["vcpus"].as_u64().unwrap()
        ),
        (pid, 2)
    );
    assert!(g(&["balloon", "cli1", "64M"]).status.success());
    assert!(g(&["resume", "cli2"]).status.success());
    assert!(g(&["reboot", "cli1"]).status.success());
    let m = json(&g(&["migration-status", "cli1", "--json"]));
    assert_eq!(m["status"], "none");
    let out = g(&["migration-status", "cli1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli1: none"));
    let c = json(&g(&["console-info", "cli1", "--json"]));
    assert_eq!(c["kind"], "serial");
    let n = json(&g(&["node-info", "--json"]));
    assert!(n["memory_total_mib"].as_u64().unwrap() > 0);
    assert!(g(&["verify"]).status.success());

    // Errors: one line, naming the instance, exit 1.
    for (args, needle) in [
        (
            vec!["start", "cli1", "--memory", "64"],
            "cli1 is already running",
        ),
        (vec!["info", "nosuch"], "nosuch is not running"),
        (vec!["cleanup", "cli1"], "cli1 is already running"),
        (vec!["balloon", "nosuch", "64"], "nosuch"),
        (vec!["start", "bad/name"], "bad/name"),
        (
            vec!["start", "nicbad", "--nic", "bridge=br0,speed=10"],
            "unknown key",
        ),
        (vec!["migrate-cancel", "nosuch"], "nosuch is not running"),
        (
            vec!["migrate", "cli1", "--to", "127.0.0.1:1"],
            "cli1: migration failed",
        ),
        (vec!["migration-info", "nosuch"], "nosuch is not running"),
    ] {
        let out = g(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(
        g(&["start"]).status.code(),
        Some(2),
        "start without a name is a usage error"
    );

    let out = g(&["stop", "cli1", "--force"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli1 killed"));
    let out = g(&["stop", "cli2", "--force", "--json"]);
    assert_eq!(json(&out)["outcome"], "killed");
    // Stopped, nothing is left of it here: as a name this node never saw
    // (a typo), an error to a person, and fine for a caller that says it
    // repeats itself.
    let out = g(&["stop", "cli2", "--idempotent"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("was not running"));
    for args in [
        vec!["stop", "cli2"],
        vec!["cleanup", "cli2"],
        vec!["stop", "cil1"],
        vec!["stop", "cil1", "--force"],
        vec!["cleanup", "cil1"],
        vec!["remove-state", "cil1"],
        vec!["undefine", "cil1"],
    ] {
        let out = g(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{} is not", args[1])),
            "{args:?}: {err}"
        );
        let mut again = args.clone();
        again.push("--idempotent");
        assert!(g(&again).status.success(), "{again:?}");
    }
    assert_eq!(json(&g(&["list", "--json"])).as_array().unwrap().len(), 0);
}

/// Where scripts/build-test-guest put the test guest.
fn test_guest_dir(env: &gkvm_testkit::Env) -> PathBuf {
    let kernel = &env.guest.as_ref().expect("a test guest").kernel;
    kernel.parent().expect("its directory").to_owned()
}

/// The demos of this file run one at a time: each boots the same
/// built-in instance (`gkvm-demo`, whose cgroup is the node's) and checks
/// that its TAP is gone afterwards by name, a name the kernel gives the
/// next TAP made.
static ONE_DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn demo_runs_end_to_end() {
    let Some(env) = require("gkvm_demo", &[Need::Root, Need::Guest]) else {
        return;
    };
    let _one = ONE_DEMO.lock().unwrap_or_else(|p| p.into_inner());
    let guest_dir = test_guest_dir(&env);
    let dir = ScratchDir::new("gkvm-cli-demo");
    let out = gkvm(
        dir.path(),
        &[
            "--kvm-path",
            env.qemu.to_str().unwrap(),
            "demo",
            "--guest-dir",
            guest_dir.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "prepare", "start", "boot", "info", "balloon", "console", "migrate", "stop", "cleanup",
    ] {
        assert!(
            stdout.lines().any(|l| l.contains(&format!("] {step}"))),
            "step {step} missing:\n{stdout}"
        );
    }
    assert!(stdout.contains("nothing left"), "{stdout}");
    assert!(
        stdout.contains("Linux "),
        "console lines missing:\n{stdout}"
    );
}

#[test]
fn node_configuration_file_is_read_checked_and_overridden() {
    use std::os::unix::fs::PermissionsExt;
    let dir = ScratchDir::new("gkvm-cli-nodecfg");
    let file = dir.path().join("node.toml");
    let write = |text: &str, mode: u32| {
        std::fs::write(&file, text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gkvm"))
            .env_remove("GKVM_RUN_DIR")
            .arg("--node-config")
            .arg(&file)
            .args(args)
            .output()
            .unwrap()
    };
    // run_dir comes from the file; --run-dir overrides it.
    let from_file = dir.path().join("from-file");
    write(
        &format!("run_dir = {:?}\n", from_file.to_str().unwrap()),
        0o644,
    );
    // (verify makes the run directory it checks.)
    let out = run(&["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(&["verify"]);
    assert!(from_file.join("ctrl").is_dir());
    let flag = dir.path().join("from-flag");
    run(&["--run-dir", flag.to_str().unwrap(), "verify"]);
    assert!(flag.join("ctrl").is_dir());

    // A bad key is a verify problem naming it (exit 1), and an error for
    // every other command.
    write("run_dir = \"/x\"\nnic_up_scrpt = \"/bin/true\"\n", 0o644);
    let out = run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problem = v["problems"][0].as_str().unwrap();
    assert!(
        problem.contains("nic_up_scrpt") && problem.contains("node.toml"),
        "{problem}"
    );
    let out = run(&["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nic_up_scrpt"));
    write("uid_pool = \"9-3\"\n", 0o644);
    let err = String::from_utf8_lossy(&run(&["list"]).stderr).into_owned();
    assert!(err.contains("uid_pool"), "{err}");

    // It chooses what runs as root: others may not write it.
    write(
        &format!("run_dir = {:?}\n", from_file.to_str().unwrap()),
        0o666,
    );
    let err = String::from_utf8_lossy(&run(&["list"]).stderr).into_owned();
    assert!(err.contains("chmod go-w"), "{err}");
    // Nor the directory it is in (they could swap the file).
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = String::from_utf8_lossy(&run(&["list"]).stderr).into_owned();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        err.contains(dir.path().to_str().unwrap()) && err.contains("chmod go-w"),
        "{err}"
    );

    // verify -H assesses parameters as Ganeti 3.1 does: warnings, not
    // problems (the problems here are the node's, if any).
    write(
        &format!("run_dir = {:?}\n", from_file.to_str().unwrap()),
        0o600,
    );
    let out = run(&["verify", "--json", "-H", "vnc_bind_address=0.0.0.0"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = v["warnings"].to_string();
    assert!(
        warnings.contains("vnc_tls") && warnings.contains("cpu_type"),
        "{v}"
    );
    let out = run(&["verify", "--json", "-H", "no_such_param=1"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["problems"].to_string().contains("no_such_param"), "{v}");
}

/// One HTTP request to `addr`, the whole answer.
fn http(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `stats --prometheus --listen`: the node's stats over HTTP for a
/// Prometheus server, read afresh at each scrape; other paths and methods
/// are refused; SIGTERM ends it.
#[test]
fn stats_are_served_over_http_on_request() {
    let Some(env) = require("stats_exporter", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-cli-exp");
    let run = dir.path().join("run");
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let qemu = env.qemu.to_str().unwrap();
    let out = gkvm(
        &run,
        &[
            "--kvm-path",
            qemu,
            "start",
            "exp1",
            "--memory",
            "64",
            "--paused",
            "-H",
            gkvm_testkit::guestless_kvm_flag(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut exporter = Command::new(env!("CARGO_BIN_EXE_gkvm"))
        .arg("--run-dir")
        .arg(&run)
        .args(["stats", "--prometheus", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(exporter.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|u| u.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let metrics = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
    assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
    assert!(
        metrics.contains("gkvm_cpu_seconds_total{instance=\"exp1\"}"),
        "{metrics}"
    );
    // Read afresh: a second instance shows up at the next scrape.
    let out = gkvm(
        &run,
        &[
            "--kvm-path",
            qemu,
            "start",
            "exp2",
            "--memory",
            "64",
            "--paused",
            "-H",
            gkvm_testkit::guestless_kvm_flag(),
        ],
    );
    assert!(out.status.success());
    let metrics = http(&addr, "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(metrics.contains("instance=\"exp2\""), "{metrics}");
    // PSS only when asked (it costs the kernel a page-table walk).
    assert!(
        !metrics.contains("gkvm_proportional_memory_bytes{"),
        "{metrics}"
    );
    let out = gkvm(&run, &["stats", "--prometheus", "--pss", "exp1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let pss: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("gkvm_proportional_memory_bytes{instance=\"exp1\"} "))
        .unwrap_or_else(|| panic!("no PSS in {text}"))
        .parse()
        .unwrap();
    assert!(pss > 0, "{text}");
    assert!(http(&addr, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(&addr, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    // SAFETY: kill(2) of the exporter this test started.
    unsafe {
        libc::kill(i32::try_from(exporter.id()).unwrap(), libc::SIGTERM);
    }
    let status = exporter.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}");
    for name in ["exp1", "exp2"] {
        assert!(gkvm(&run, &["stop", name, "--force"]).status.success());
    }
}

/// `gkvm manpages`: a page per subcommand and `gkvm-hvparams(7)` with
/// every parameter, made by the debug build too (clap checks each
/// subcommand's definition there).
#[test]
fn man_pages_cover_every_subcommand_and_hvparam() {
    let dir = ScratchDir::new("gkvm-cli-man");
    let man = dir.path().join("man");
    let out = gkvm(dir.path(), &["manpages", man.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "gkvm.1",
        "gkvm-start.1",
        "gkvm-save.1",
        "gkvm-stats.1",
        "gkvm-define.1",
        "gkvm-guests-stop.1",
        "gkvm-hvparams.7",
        "gkvm-node.toml.5",
    ] {
        assert!(man.join(page).is_file(), "{page}");
    }
    // Every command's page says what it exits with, what it reads from the
    // environment and which files it uses.
    for entry in std::fs::read_dir(&man).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".1") {
            continue;
        }
        let page = std::fs::read_to_string(entry.path()).unwrap();
        for section in [
            ".SH EXIT STATUS",
            ".SH ENVIRONMENT",
            ".SH FILES",
            ".SH EXAMPLES",
            ".SH SEE ALSO",
        ] {
            assert!(page.contains(section), "{name}: {section}");
        }
    }
    let stop = std::fs::read_to_string(man.join("gkvm-stop.1")).unwrap();
    assert!(
        stop.contains(".SH EXAMPLES") && stop.contains("gkvm stop web1 \\-\\-force"),
        "{stop}"
    );
    let five = std::fs::read_to_string(man.join("gkvm-node.toml.5")).unwrap();
    for key in ["run_dir", "state_dir", "migration_tls_dir"] {
        assert!(five.contains(&format!(".B {key}\n")), "{key}");
    }
    let seven = std::fs::read_to_string(man.join("gkvm-hvparams.7")).unwrap();
    for key in ["kernel_path", "migration_caps", "cgroup_io_max", "tpm"] {
        assert!(seven.contains(&format!(".B {key}\n")), "{key}");
    }
}

#[test]
fn demo_on_an_installed_system_makes_its_guest_of_the_hosts_kernel() {
    let Some(env) = require("gkvm_demo_host_kernel", &[Need::Root, Need::Guest]) else {
        return;
    };
    let _one = ONE_DEMO.lock().unwrap_or_else(|p| p.into_inner());
    // A host's tree as an installed Debian system has it: the kernel
    // package's /boot and /lib/modules (the one the test guest is made
    // of), and busybox-static's busybox.
    let dl = test_guest_dir(&env).join("dl");
    let deb = std::fs::read_dir(&dl)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("linux-image-"))
        .expect("the kernel package scripts/build-test-guest downloaded");
    let dir = ScratchDir::new("gkvm-cli-demo-host");
    let root = dir.path().join("root");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(ok.success());
    let conf = dir.path().join("node.toml");
    std::fs::write(
        &conf,
        format!("state_dir = \"{}\"\n", dir.path().join("state").display()),
    )
    .unwrap();
    std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let demo = |root: &Path| {
        Command::new(env!("CARGO_BIN_EXE_gkvm"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--node-config")
            .arg(&conf)
            .arg("--kvm-path")
            .arg(&env.qemu)
            .arg("demo")
            .env("GKVM_DEMO_HOST_ROOT", root)
            .env_remove("GKVM_TEST_GUEST_DIR")
            .output()
            .unwrap()
    };
    let refused = |root: &Path, needle: &str| {
        let out = demo(root);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
    };
    // What is missing is named, with the package to install.
    refused(&dir.path().join("empty"), "apt install linux-image-amd64");
    refused(&root, "apt install busybox-static");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(std::env::current_exe().unwrap(), root.join("bin/busybox")).unwrap();
    refused(&root, "dynamically linked");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();

    let out = demo(&root);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo-guest"), "{stdout}");
    assert!(stdout.contains("nothing left"), "{stdout}");
    // The guest runs the host's kernel.
    let version = std::fs::read_dir(root.join("lib/modules"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name();
    assert!(
        stdout.contains(&format!("Linux {}", version.to_string_lossy())),
        "{stdout}"
    );
    let made = dir.path().join("state/demo-guest");
    assert!(made.join("initramfs.cpio").is_file());
    let stamp = std::fs::read(made.join("stamp")).unwrap();
    // Made once: a second demo uses it as it is.
    let before = std::fs::metadata(made.join("initramfs.cpio"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(demo(&root).status.success());
    let after = std::fs::metadata(made.join("initramfs.cpio"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        (before, stamp),
        (after, std::fs::read(made.join("stamp")).unwrap())
    );
}

#[test]
fn the_packaged_readme_speaks_of_installed_commands_only() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/debian/README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    for source_tree in ["scripts/", "crates/", "target/", "cargo "] {
        assert!(!text.contains(source_tree), "{source_tree}");
    }
    // Every command it shows exists (so the page cannot drift from the
    // binary): each `gkvm WORD` at the start of a line of a code block.
    let mut in_code = false;
    let dir = ScratchDir::new("gkvm-cli-readme");
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let Some(rest) = line.strip_prefix("gkvm ").filter(|_| in_code) else {
            continue;
        };
        let sub = rest.split_whitespace().next().unwrap();
        let out = gkvm(dir.path(), &[sub, "--help"]);
        assert!(out.status.success(), "gkvm {sub}: {line}");
        // And the options it gives that subcommand.
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        for word in rest.split_whitespace().filter(|w| w.starts_with("--")) {
            let flag = word
                .trim_matches(|c| c == '[' || c == ']')
                .split('=')
                .next()
                .unwrap();
            assert!(help.contains(flag), "gkvm {sub} has no {flag}: {line}");
        }
    }
}
