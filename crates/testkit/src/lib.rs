//! Helpers shared by gkvm's end-to-end tests: the skip policy, finding QEMU
//! and the test guest built by `scripts/build-test-guest`, and reading a
//! guest's serial console.
//!
//! Tests that need root, QEMU or the guest call [`require`]; without them a
//! test prints why it skips, unless `GKVM_REQUIRE_E2E=1`, where a skip is a
//! failure (CI sets it so real-QEMU tests can never silently not run).
#![deny(missing_docs)]

mod http;
pub use http::HttpServer;

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What an end-to-end test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Running as root (TAP devices, bridges, namespaces).
    Root,
    /// A QEMU binary.
    Qemu,
    /// The test guest (implies [`Need::Qemu`]).
    Guest,
}

/// Everything found for a test that passed [`require`].
#[derive(Debug, Clone)]
pub struct Env {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The test guest, when asked for.
    pub guest: Option<Guest>,
}

/// The tiny test guest built by `scripts/build-test-guest`.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Uncompressed kernel (ELF with a PVH note).
    pub kernel: PathBuf,
    /// Busybox initramfs.
    pub initrd: PathBuf,
    /// Kernel command line (serial console on ttyS0).
    pub cmdline: String,
}

impl Guest {
    /// The hvparams (Ganeti key names) that boot this guest with its
    /// console on the serial socket, on the accelerator of
    /// [`guest_accel`].
    pub fn hvparams(&self) -> Vec<(&'static str, String)> {
        let accel = if guest_accel() == "kvm" {
            "enabled"
        } else {
            "disabled"
        };
        vec![
            ("kernel_path", self.kernel.display().to_string()),
            ("initrd_path", self.initrd.display().to_string()),
            ("root_path", "/dev/ram0".into()),
            // gkvm adds console=ttyS0,SPEED itself.
            (
                "kernel_args",
                self.cmdline.replace("console=ttyS0", "").trim().to_owned(),
            ),
            ("serial_speed", "115200".into()),
            ("kvm_flag", accel.into()),
        ]
    }
}

/// The line the guest prints on its serial console once it is ready.
pub const READY_LINE: &str = "gkvm-test-guest: ready";

/// Whether CI asked that every skip fail.
pub fn e2e_required() -> bool {
    std::env::var("GKVM_REQUIRE_E2E").is_ok_and(|v| v == "1")
}

/// Skips the calling test with a reason, or panics under `GKVM_REQUIRE_E2E=1`.
pub fn skip(test: &str, reason: &str) {
    if e2e_required() {
        panic!("{test}: cannot run ({reason}) and GKVM_REQUIRE_E2E=1 forbids skipping");
    }
    eprintln!("SKIP {test}: {reason}");
}

/// Checks what a test needs; `None` means the test was skipped (and should
/// return at once).
pub fn require(test: &str, needs: &[Need]) -> Option<Env> {
    if needs.contains(&Need::Root) && !is_root() {
        skip(test, "needs root");
        return None;
    }
    let Some(qemu) = qemu_binary() else {
        if needs.iter().any(|n| matches!(n, Need::Qemu | Need::Guest)) {
            skip(test, "no QEMU binary (run scripts/install-deps)");
            return None;
        }
        return Some(Env {
            qemu: PathBuf::new(),
            guest: None,
        });
    };
    let guest = if needs.contains(&Need::Guest) {
        match test_guest() {
            Some(g) => Some(g),
            None => {
                skip(test, "no test guest (run scripts/build-test-guest)");
                return None;
            }
        }
    } else {
        None
    };
    Some(Env { qemu, guest })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The QEMU binary: `$GKVM_QEMU`, else `qemu-system-x86_64` on PATH.
pub fn qemu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GKVM_QEMU") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// The test guest, from `$GKVM_TEST_GUEST_DIR` or `target/test-guest`.
pub fn test_guest() -> Option<Guest> {
    let dir = std::env::var_os("GKVM_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("test-guest"));
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio.gz");
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).ok()?;
    (kernel.is_file() && initrd.is_file()).then(|| Guest {
        kernel,
        initrd,
        cmdline: cmdline.trim().to_owned(),
    })
}

/// The accelerator for booting the Linux test guest: `$GKVM_GUEST_ACCEL`,
/// default `tcg` (this project's nested KVM cannot run a Linux guest; on
/// real hardware set `GKVM_GUEST_ACCEL=kvm`).
pub fn guest_accel() -> String {
    std::env::var("GKVM_GUEST_ACCEL").unwrap_or_else(|_| "tcg".to_owned())
}

/// The accelerator for instances that need no guest OS: KVM when
/// `/dev/kvm` opens, else TCG.
pub fn guestless_accel() -> &'static str {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        "kvm"
    } else {
        "tcg"
    }
}

/// The hvparam pair that puts a guest-less instance on
/// [`guestless_accel`]: `kvm_flag=enabled` or `kvm_flag=disabled`.
pub fn guestless_kvm_flag() -> &'static str {
    if guestless_accel() == "kvm" {
        "kvm_flag=enabled"
    } else {
        "kvm_flag=disabled"
    }
}

/// Makes the child see each `(from, to)` descriptor of this process as
/// `to` (as a golden argv's `fd=N` expects). Every source is first copied
/// above all targets (close-on-exec), then moved into place, so a source
/// that already is its target, or another move's target, is still right.
pub fn pass_fds_at(cmd: &mut std::process::Command, moves: Vec<(i32, i32)>) {
    use std::os::unix::process::CommandExt;
    let above = moves.iter().map(|&(_, to)| to).max().unwrap_or(0) + 1;
    // SAFETY: only fcntl(2) and dup2(2), async-signal-safe, between fork
    // and exec, on descriptors this process owns.
    unsafe {
        cmd.pre_exec(move || {
            let mut staged = Vec::with_capacity(moves.len());
            for &(from, to) in &moves {
                let tmp = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, above);
                if tmp < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                staged.push((tmp, to));
            }
            for (tmp, to) in staged {
                if libc::dup2(tmp, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Connects to a Unix socket, retrying until it appears or `timeout` passes.
pub fn connect_retry(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A guest's serial console on a Unix socket.
#[derive(Debug)]
pub struct Serial {
    stream: UnixStream,
    seen: String,
}

impl Serial {
    /// Connects to the console socket (retrying while QEMU creates it).
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Serial> {
        Ok(Serial {
            stream: connect_retry(path, timeout)?,
            seen: String::new(),
        })
    }

    /// Reads until the output seen so far contains `needle`; returns all
    /// output seen, or an error with the output when `timeout` passes or the
    /// console closes.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out waiting for {needle:?}; console said:\n{}",
                    self.seen
                ));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(format!(
                        "console closed before {needle:?}; it said:\n{}",
                        self.seen
                    ))
                }
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("console read failed: {e}; it said:\n{}", self.seen)),
            }
        }
        Ok(self.seen.clone())
    }

    /// Types a line into the guest's shell.
    pub fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(format!("{line}\n").as_bytes())
    }

    /// Forgets the output seen so far (so the next wait looks at new output).
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    /// Runs a shell command in the guest and waits for its marker line.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<String, String> {
        self.clear();
        let marker = format!("gkvm-done-{}", std::process::id());
        // Split the marker so the echoed command line does not match it.
        let (a, b) = marker.split_at(5);
        self.send_line(&format!("{command}; echo '{a}''{b}'"))
            .map_err(|e| e.to_string())?;
        self.wait_for(&format!("{marker}\r\n"), timeout)
            .or_else(|_| self.wait_for(&format!("{marker}\n"), Duration::from_millis(1)))
    }
}

/// A scratch directory removed when dropped, under `/tmp` (short paths keep
/// Unix socket names under their 108-byte limit).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates a fresh directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> ScratchDir {
        ScratchDir::under(&std::env::temp_dir(), prefix)
    }

    /// A scratch directory on tmpfs (`/dev/shm`), as a node's `/run` is:
    /// for run directories in benchmarks (this machine's `/run` and `/tmp`
    /// are on disk). Falls back to [`ScratchDir::new`].
    pub fn on_tmpfs(prefix: &str) -> ScratchDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            ScratchDir::under(shm, prefix)
        } else {
            ScratchDir::new(prefix)
        }
    }

    fn under(parent: &Path, prefix: &str) -> ScratchDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = parent.join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        ScratchDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed and reaped when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QEMU process started for a test, killed and cleaned up when dropped.
#[derive(Debug)]
pub struct Vm {
    /// The QMP socket (`server=on,wait=off`).
    pub qmp: PathBuf,
    /// The serial console, when the VM runs the test guest.
    pub serial: Option<Serial>,
    /// The QEMU process.
    pub child: KillOnDrop,
    /// The VM's scratch directory (sockets).
    pub dir: ScratchDir,
}

impl Vm {
    /// Starts QEMU: with the test guest when `env.guest` is set (serial on
    /// a socket the helper connects to, 128 MiB, a virtio balloon), else a
    /// guest-less `-S` VM on KVM when available. `customize` may add
    /// arguments or descriptors before the spawn.
    pub fn spawn(env: &Env, customize: impl FnOnce(&mut std::process::Command)) -> Vm {
        let dir = ScratchDir::new("gkvm-vm");
        let qmp = dir.path().join("qmp.sock");
        let serial_path = dir.path().join("serial.sock");
        let mut cmd = std::process::Command::new(&env.qemu);
        cmd.args(["-nodefaults", "-display", "none", "-m", "128", "-no-reboot"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(["-device", "virtio-balloon-pci,id=balloon0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        match &env.guest {
            Some(g) => {
                cmd.args(["-machine", &format!("pc,accel={}", guest_accel())])
                    .arg("-kernel")
                    .arg(&g.kernel)
                    .arg("-initrd")
                    .arg(&g.initrd)
                    .args(["-append", &g.cmdline])
                    .arg("-chardev")
                    .arg(format!(
                        "socket,id=s0,path={},server=on,wait=on",
                        serial_path.display()
                    ))
                    .args(["-serial", "chardev:s0"]);
            }
            None => {
                cmd.args(["-machine", &format!("pc,accel={}", guestless_accel())])
                    .arg("-S");
            }
        }
        customize(&mut cmd);
        let child = KillOnDrop(cmd.spawn().expect("spawn qemu"));
        let serial = env.guest.as_ref().map(|_| {
            Serial::connect(&serial_path, Duration::from_secs(20)).expect("serial console socket")
        });
        // The socket file appears when QEMU binds it, a moment before it
        // listens: wait until a connection is taken (a busy machine
        // stretches that moment), then leave the socket to the test.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&qmp).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Vm {
            qmp,
            serial,
            child,
            dir,
        }
    }

    /// Waits for the guest's ready line on its serial console.
    pub fn wait_ready(&mut self) -> String {
        let serial = self.serial.as_mut().expect("a VM with the test guest");
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits up to `timeout` for QEMU to exit; its exit code, or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.0.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A Linux bridge created for a test (with `ip`) and deleted on drop.
#[derive(Debug)]
pub struct Bridge(pub String);

impl Bridge {
    /// Creates bridge `name` (replacing a leftover one) and brings it up.
    /// Its MAC address is set (locally administered, from the name): a
    /// bridge without one takes its lowest port's, so it would change
    /// when a migration swaps the guest's TAP, and a guest's ARP entry
    /// for the host would go stale (a real bridge has its uplink's).
    pub fn new(name: &str) -> Bridge {
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
        };
        let _ = ip(&["link", "del", name]);
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let [a, b, c, d, ..] = h.to_le_bytes();
        let mac = format!("02:6b:{a:02x}:{b:02x}:{c:02x}:{d:02x}");
        let st = ip(&[
            "link", "add", "name", name, "address", &mac, "type", "bridge",
        ])
        .expect("run ip");
        assert!(st.success(), "ip link add {name} type bridge failed");
        let _ = ip(&["link", "set", name, "up"]);
        Bridge(name.to_owned())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

/// Live (not zombie) processes whose command line (its arguments) `pick`
/// accepts, sorted.
fn live_processes(pick: impl Fn(&[&[u8]]) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rfind(')')
                    .map(|i| s[i + 1..].trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if pick(&args) && !zombie {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// Live processes whose command line has `-pidfile <run_dir>/pid/...`:
/// the QEMUs of a run dir, found without trusting its pid files.
pub fn qemus_in(run_dir: &Path) -> Vec<i32> {
    let prefix = run_dir.join("pid");
    live_processes(|args| {
        args.windows(2).any(|w| {
            w[0] == b"-pidfile" && Path::new(std::ffi::OsStr::from_bytes(w[1])).starts_with(&prefix)
        })
    })
}

/// Live helper processes (swtpm) whose command line names a socket in
/// `run_dir`'s `ctrl/` (QEMUs, which name them too, aside).
pub fn helpers_in(run_dir: &Path) -> Vec<i32> {
    let needle = format!("path={}/", run_dir.join("ctrl").display());
    let has = |args: &[&[u8]], what: &[u8]| {
        args.iter()
            .any(|a| a.windows(what.len()).any(|w| w == what))
    };
    live_processes(|args| has(args, needle.as_bytes()) && !has(args, b"-pidfile"))
}

/// Kills, when dropped, every QEMU of a run dir (found in `/proc` by its
/// `-pidfile`, so a test that removed or garbled a pid file still cleans
/// up), so a test that fails half-way does not leave daemonized QEMUs
/// (and their TAPs) behind; and removes the gkvm cgroups they ran in.
#[derive(Debug)]
pub struct KillRunDir(pub PathBuf);

impl Drop for KillRunDir {
    fn drop(&mut self) {
        let pids: Vec<i32> = qemus_in(&self.0)
            .into_iter()
            .chain(helpers_in(&self.0))
            .collect();
        let cgroups: Vec<PathBuf> = pids.iter().flat_map(|p| gkvm_cgroups_of(*p)).collect();
        for pid in &pids {
            // SAFETY: kill(2); the process is a QEMU of this test's run dir.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // A cgroup goes once its processes are reaped (init may take a
        // while with orphans).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for dir in cgroups {
            while dir.exists()
                && std::fs::remove_dir(&dir).is_err()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// The directories of the gkvm cgroups (`/gkvm…/NAME`) process `pid` is
/// in, from `/proc/PID/cgroup`.
fn gkvm_cgroups_of(pid: i32) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let rel = path.strip_prefix('/')?;
            if !rel.starts_with("gkvm") {
                return None;
            }
            let tree = if controllers.is_empty() {
                root.to_owned()
            } else {
                // v1: a tree per controller (`cpu,cpuacct` may be one).
                let whole = root.join(controllers);
                if whole.is_dir() {
                    whole
                } else {
                    root.join(controllers.split(',').next()?)
                }
            };
            Some(tree.join(rel))
        })
        .collect()
}
