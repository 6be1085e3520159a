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
    let joined = argv.join(" ");
    assert!(joined.contains("-name web1 -m 256 -smp 2"), "{joined}");
    assert!(joined.contains("file=/srv/web1,,a.img"), "{joined}");
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
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("argv"),
            "{shell}"
        );
    }
}
