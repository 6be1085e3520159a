//! `gkvm console` in a real pseudo-terminal (tmux), as a person uses it.

use gkvm_testkit::{require, Need, ScratchDir};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_pane(session: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let pane = tmux(&["capture-pane", "-p", "-J", "-S", "-200", "-t", session]);
        if pane.contains(needle) {
            return pane;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared; pane:\n{pane}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Session(String);
impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[test]
fn console_in_a_real_terminal() {
    let Some(env) = require("gkvm_console_pty", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-console");
    let run = dir.path().join("run");
    let hvparams: serde_json::Map<String, serde_json::Value> = env
        .guest
        .as_ref()
        .unwrap()
        .hvparams()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    let spec = serde_json::json!({"name": "con1", "memory": 128, "hvparams": hvparams});
    let spec_file = dir.path().join("con1.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let gkvm = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gkvm"))
            .arg("--run-dir")
            .arg(&run)
            .arg("--kvm-path")
            .arg(&env.qemu)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    gkvm(&["start", "--file", spec_file.to_str().unwrap(), "--paused"]);

    let session = Session(format!("gkvmcon{}", std::process::id()));
    let before = dir.path().join("stty.before");
    let after = dir.path().join("stty.after");
    let script = format!(
        "stty -a > {b}; {exe} --run-dir {run} console con1; echo exit=$?; stty -a > {a}; sleep 60",
        b = before.display(),
        a = after.display(),
        exe = env!("CARGO_BIN_EXE_gkvm"),
        run = run.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-x",
        "160",
        "-y",
        "50",
        "-s",
        &session.0,
        "sh",
        "-c",
        &script,
    ]);
    wait_pane(
        &session.0,
        "escape character is ^]",
        Duration::from_secs(10),
    );
    gkvm(&["resume", "con1"]);
    wait_pane(
        &session.0,
        gkvm_testkit::READY_LINE,
        Duration::from_secs(90),
    );

    tmux(&["send-keys", "-t", &session.0, "-l", "echo typed-$((2+3))"]);
    tmux(&["send-keys", "-t", &session.0, "Enter"]);
    wait_pane(&session.0, "typed-5", Duration::from_secs(30));

    tmux(&["send-keys", "-t", &session.0, "C-]"]);
    let pane = wait_pane(&session.0, "exit=0", Duration::from_secs(10));
    assert!(pane.contains("detached"), "{pane}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !Path::new(&after).exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        std::fs::read_to_string(&before).unwrap(),
        std::fs::read_to_string(&after).unwrap(),
        "terminal mode not restored"
    );
    // The guest kept running after the detach.
    gkvm(&["stop", "con1"]);
}
