//! `gkvm demo`: a guided run of the whole tool on a built-in tiny instance.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hv_kvm::{Config, InstanceSpec, KvmHypervisor, NicMode, NicSpec, RunDir};

const NAME: &str = "gkvm-demo";
const READY: &str = "gkvm-test-guest: ready";

/// Options of the demo.
pub struct DemoOptions {
    /// Where the test guest is (vmlinux, initramfs.cpio.gz, cmdline).
    pub guest_dir: PathBuf,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Use KVM for the Linux guest (default: TCG).
    pub kvm: bool,
}

/// The test guest of a source tree: `$GKVM_TEST_GUEST_DIR`, next to the
/// binary's target dir, or `./target/test-guest`, when it is there.
pub fn source_tree_guest_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("GKVM_TEST_GUEST_DIR") {
        return Some(PathBuf::from(d));
    }
    let beside_exe = std::env::current_exe().ok().and_then(|e| {
        e.parent()
            .and_then(Path::parent)
            .map(|t| t.join("test-guest"))
    });
    beside_exe
        .into_iter()
        .chain([PathBuf::from("target/test-guest")])
        .find(|d| d.join("vmlinux").is_file())
}

/// Reads a serial socket in the background into a shared buffer.
struct Console {
    stream: UnixStream,
    seen: Arc<Mutex<String>>,
}

impl Console {
    fn connect(path: &Path) -> std::io::Result<Console> {
        let stream = UnixStream::connect(path)?;
        let mut reader = stream.try_clone()?;
        let seen = Arc::new(Mutex::new(String::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Ok(Console { stream, seen })
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
            if let Some(i) = text.find(needle) {
                return Ok(text[..i + needle.len()].to_owned());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{needle:?} did not appear on the serial console within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a shell command in the guest; returns its output lines.
    fn run(&mut self, command: &str) -> Result<Vec<String>, String> {
        let marker = format!("demo-end-{}", std::process::id());
        if let Ok(mut s) = self.seen.lock() {
            s.clear();
        }
        let (a, b) = marker.split_at(4);
        self.stream
            .write_all(format!("{command}; echo '{a}''{b}'\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let text = self.wait_for(&format!("\n{marker}"), Duration::from_secs(30))?;
        Ok(text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_owned())
            .filter(|l| {
                !l.is_empty()
                    && !l.contains(&marker[..4])
                    && !l.starts_with("/ #")
                    && !l.contains("echo '")
            })
            .collect())
    }
}

/// The first error writing the demo's output (a closed pipe, a full
/// disk): the demo goes on and cleans up, and the error is reported after.
static WRITE_ERROR: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);

/// `println!` that never panics; the first error is kept in WRITE_ERROR.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            let mut first = WRITE_ERROR.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(e);
        }
    }};
}

/// The first error writing the demo's output, if any.
pub fn take_write_error() -> Option<std::io::Error> {
    WRITE_ERROR.lock().unwrap_or_else(|p| p.into_inner()).take()
}

fn step(t0: Instant, what: &str, text: &str) {
    say!("[{:>6.2}s] {what:<9} {text}", t0.elapsed().as_secs_f64());
}

fn node(root: &Path, qemu: &Path, caps: &Path) -> KvmHypervisor {
    let mut c = Config::new(RunDir::new(root));
    c.kvm_path = Some(qemu.to_owned());
    c.caps_cache_dir = Some(caps.to_owned());
    // Both "nodes" are run directories of this machine: the info never
    // leaves it.
    c.trust_unsealed_migration_info = true;
    KvmHypervisor::new(c)
}

/// Runs the demo; returns an error message naming the step that failed.
pub async fn run(opts: DemoOptions) -> Result<(), String> {
    let g = &std::fs::canonicalize(&opts.guest_dir).unwrap_or_else(|_| opts.guest_dir.clone());
    // The test guest's files (scripts/build-test-guest), or those of the
    // guest made of the host's kernel (demo_guest).
    let first = |names: [&str; 2]| names.map(|n| g.join(n)).into_iter().find(|p| p.is_file());
    let (Some(kernel), Some(initrd)) = (
        first(["vmlinux", "kernel"]),
        first(["initramfs.cpio.gz", "initramfs.cpio"]),
    ) else {
        return Err(format!(
            "no guest in {} (a kernel and an initramfs, as scripts/build-test-guest makes)",
            g.display()
        ));
    };
    let cmdline = std::fs::read_to_string(g.join("cmdline")).unwrap_or_default();
    let base = std::env::temp_dir().join(format!("gkvm-demo-{}", std::process::id()));
    let (root_a, root_b, caps) = (base.join("node-a"), base.join("node-b"), base.join("caps"));
    let a = node(&root_a, &opts.qemu, &caps);
    let b = node(&root_b, &opts.qemu, &caps);
    let demo = Demo {
        opts: &opts,
        a: &a,
        b: &b,
        root_a: &root_a,
        root_b: &root_b,
        t0: Instant::now(),
    };
    let result = demo.run(&kernel, &initrd, cmdline.trim()).await;
    if result.is_err() {
        // Leave nothing behind, whatever failed.
        for n in [&a, &b] {
            let _ = n.stop(NAME, hv_kvm::StopMode::Force).await;
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    result
}

/// The demo's two nodes and its clock.
struct Demo<'a> {
    opts: &'a DemoOptions,
    a: &'a KvmHypervisor,
    b: &'a KvmHypervisor,
    root_a: &'a Path,
    root_b: &'a Path,
    t0: Instant,
}

/// Maps a facade error to the demo's message naming the step.
fn e(what: &str) -> impl Fn(hv_kvm::Error) -> String + '_ {
    move |err| format!("{what}: {}", err.report())
}

impl Demo<'_> {
    fn step(&self, what: &str, text: &str) {
        step(self.t0, what, text);
    }

    async fn run(&self, kernel: &Path, initrd: &Path, cmdline: &str) -> Result<(), String> {
        self.prepare().await?;
        let spec = self.spec(kernel, initrd, cmdline)?;
        let (report, mut console) = self.start_and_boot(&spec).await?;
        self.show_info().await?;
        self.balloon().await?;
        let lines = console
            .run("uname -sr; grep MemTotal /proc/meminfo")
            .map_err(|err| format!("console: {err}"))?;
        self.step("console", "the guest's shell answers on the serial socket:");
        for l in &lines {
            say!("{:>10} | {l}", "");
        }
        self.migrate().await?;
        drop(console);
        self.after_migration()?;
        self.stop().await?;
        self.check_clean(&report)
    }

    async fn prepare(&self) -> Result<(), String> {
        let opts = self.opts;
        let caps = self
            .a
            .capabilities(&opts.qemu)
            .await
            .map_err(e("probe QEMU"))?;
        let accel = if opts.kvm {
            "kvm"
        } else {
            "tcg (this host's nested KVM cannot run Linux; --kvm on real hardware)"
        };
        let text = format!(
            "QEMU {} at {}, guest from {}, accel {accel}",
            caps.version.text,
            opts.qemu.display(),
            opts.guest_dir.display(),
        );
        self.step("prepare", &text);
        Ok(())
    }

    /// The built-in instance: the test guest, one NIC in `ext` mode (a TAP
    /// gkvm brings up and leaves to the host: the demo changes no bridge or
    /// route of this machine).
    fn spec(&self, kernel: &Path, initrd: &Path, cmdline: &str) -> Result<InstanceSpec, String> {
        let mut spec = InstanceSpec::new(NAME, 128);
        let kvm_flag = if self.opts.kvm { "enabled" } else { "disabled" };
        for (k, v) in [
            ("kernel_path", kernel.to_string_lossy().into_owned()),
            ("initrd_path", initrd.to_string_lossy().into_owned()),
            ("root_path", "/dev/ram0".to_owned()),
            (
                "kernel_args",
                cmdline.replace("console=ttyS0", "").trim().to_owned(),
            ),
            ("serial_speed", "115200".to_owned()),
            ("kvm_flag", kvm_flag.to_owned()),
            ("migration_bandwidth", "10240".to_owned()),
        ] {
            spec.hvparams
                .set(k, serde_json::Value::String(v))
                .map_err(|err| format!("hvparams: {err}"))?;
        }
        let mac = hv_kvm::MacAddr::new([0x52, 0x54, 0x00, 0xde, 0x00, 0x01]);
        let mut nic = NicSpec::new(mac, "");
        nic.mode = NicMode::Ext;
        spec.nics.push(nic);
        Ok(spec)
    }

    async fn start_and_boot(
        &self,
        spec: &InstanceSpec,
    ) -> Result<(hv_kvm::StartReport, Console), String> {
        let t = Instant::now();
        let report = self
            .a
            .start(spec, hv_kvm::StartMode::Paused)
            .await
            .map_err(e("start"))?;
        let text = format!(
            "{NAME} started paused in {:.0} ms (pid {}, machine {}, NIC on TAP {})",
            t.elapsed().as_secs_f64() * 1000.0,
            report.pid,
            report.machine,
            report.taps.join(" ")
        );
        self.step("start", &text);
        let console = self.console(self.root_a)?;
        let t = Instant::now();
        self.a.resume(NAME).await.map_err(e("resume"))?;
        let boot = console
            .wait_for(READY, Duration::from_secs(120))
            .map_err(|err| format!("boot: {err}"))?;
        let text = format!("guest ready in {:.2} s", t.elapsed().as_secs_f64());
        self.step("boot", &text);
        for line in boot.lines().filter(|l| l.contains("gkvm-test-guest")) {
            say!("{:>10} | {}", "", line.trim_end_matches('\r'));
        }
        Ok((report, console))
    }

    fn console(&self, root: &Path) -> Result<Console, String> {
        let paths = RunDir::new(root)
            .instance(NAME)
            .map_err(|err| err.to_string())?;
        Console::connect(&paths.serial).map_err(|err| format!("serial console: {err}"))
    }

    async fn show_info(&self) -> Result<(), String> {
        let info = self.a.info(NAME).await.map_err(e("info"))?;
        self.step("info", "");
        say!(
            "{:>10} | NAME       STATE    PID      MEMORY   VCPUS  CPU TIME",
            ""
        );
        say!(
            "{:>10} | {:<10} {:<8} {:<8} {:<8} {:<6} {:.1}s",
            "",
            info.name,
            info.state.to_string(),
            info.pid,
            format!("{} MiB", info.memory_mib),
            info.vcpus,
            info.cpu_time_secs
        );
        Ok(())
    }

    async fn balloon(&self) -> Result<(), String> {
        let t = Instant::now();
        self.a.balloon(NAME, 96).await.map_err(e("balloon"))?;
        loop {
            let m = self.a.info(NAME).await.map_err(e("info"))?.memory_mib;
            if m == 96 {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("balloon: stuck at {m} MiB"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = format!("128 MiB -> 96 MiB in {:.2} s", t.elapsed().as_secs_f64());
        self.step("balloon", &text);
        Ok(())
    }

    /// Ganeti's sequence, step by step: accept on B, migrate from A,
    /// finalize both.
    async fn migrate(&self) -> Result<(), String> {
        let (a, b) = (self.a, self.b);
        let info_json = a.migration_info(NAME).map_err(e("migration info"))?;
        let port = 24000 + u16::try_from(std::process::id() % 1000).unwrap_or(0);
        b.accept_instance(&info_json, "127.0.0.1", port)
            .await
            .map_err(e("accept"))?;
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let t = Instant::now();
        let status = a
            .migrate(NAME, "127.0.0.1", port, hv_kvm::MigrationMode::Live, |s| {
                bar.set_length(s.total_bytes);
                bar.set_position(s.total_bytes.saturating_sub(s.remaining_bytes));
                bar.set_message(s.status.to_string());
            })
            .await
            .map_err(e("migrate"))?;
        bar.finish_and_clear();
        b.wait_incoming(NAME, Duration::from_secs(60))
            .await
            .map_err(e("migrate"))?;
        let done = hv_kvm::MigrationOutcome::Completed;
        b.finalize_migration_dst(NAME, done)
            .await
            .map_err(e("finalize destination"))?;
        a.finalize_migration_source(NAME, done)
            .await
            .map_err(e("finalize source"))?;
        let text = format!(
            "to a second run dir over 127.0.0.1:{port} in {:.0} ms ({} MiB sent, downtime {} ms); source node empty",
            t.elapsed().as_secs_f64() * 1000.0,
            status.transferred_bytes >> 20,
            status.downtime_ms.unwrap_or(0)
        );
        self.step("migrate", &text);
        Ok(())
    }

    fn after_migration(&self) -> Result<(), String> {
        let mut console = self.console(self.root_b)?;
        let lines = console
            .run("cat /proc/uptime")
            .map_err(|err| format!("console: {err}"))?;
        for l in &lines {
            say!(
                "{:>10} | guest still running after the migration, uptime {l}",
                ""
            );
        }
        Ok(())
    }

    async fn stop(&self) -> Result<(), String> {
        let t = Instant::now();
        let mode = hv_kvm::StopMode::Acpi {
            timeout: Duration::from_secs(60),
        };
        let outcome = self.b.stop(NAME, mode).await.map_err(e("stop"))?;
        let text = format!(
            "{outcome:?} after the ACPI power button, in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        self.step("stop", &text);
        Ok(())
    }

    /// Nothing may be left: no state file, no process, no TAP.
    fn check_clean(&self, report: &hv_kvm::StartReport) -> Result<(), String> {
        let mut left: Vec<String> = self
            .a
            .state_files()
            .into_iter()
            .chain(self.b.state_files())
            .map(|p| p.display().to_string())
            .collect();
        if hv_kvm::process_alive(report.pid) {
            left.push(format!("process {}", report.pid));
        }
        for tap in &report.taps {
            if Path::new("/sys/class/net").join(tap).exists() {
                left.push(format!("TAP {tap}"));
            }
        }
        if !left.is_empty() {
            return Err(format!("cleanup: left behind: {}", left.join(", ")));
        }
        self.step(
            "cleanup",
            "nothing left: no QEMU, no TAP, no socket, no file",
        );
        Ok(())
    }
}
