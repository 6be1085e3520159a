//! Ganeti 3.1's disk parameters as the booted test guest sees them (TCG):
//! a disk QEMU opens itself over NBD (userspace access), a CD-ROM read
//! over HTTP by QEMU's curl driver, `disk_discard=unmap` reaching the
//! image file, and `disk_aio=native`/`io_uring` doing the guest's I/O.

mod common;
use common::{guest_spec, guestless_spec, rt};
use gkvm_testkit::{require, HttpServer, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::RunDir;
use kvm_cmdline::DiskSpec;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// An image of `size` bytes with `pattern` at offset 0 and, when `fill`,
/// `fill` MiB of written (allocated) data.
fn image(path: &Path, size: u64, pattern: &str, fill: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all(&vec![0xab; usize::try_from(fill * MIB).unwrap()])
        .unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(pattern.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// `qemu-nbd` exporting `file` as `exp` on a free loopback port.
struct Nbd {
    child: std::process::Child,
    port: u16,
}

impl Nbd {
    fn serve(file: &Path) -> Nbd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("qemu-nbd")
            .args(["--persistent", "-f", "raw", "-x", "exp", "-b", "127.0.0.1"])
            .args(["-p", &port.to_string()])
            .arg(file)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbd { child, port }
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest's virtio disks: (name, size in 512-byte sectors).
fn guest_disks(serial: &mut Serial) -> Vec<(String, u64)> {
    let out = serial
        .run(
            "for d in /sys/block/vd*; do echo \"disk ${d##*/} $(cat $d/size)\"; done",
            Duration::from_secs(20),
        )
        .unwrap();
    out.lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("disk ")?.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.parse().ok()?))
        })
        .collect()
}

fn disk_of_size(disks: &[(String, u64)], bytes: u64) -> String {
    disks
        .iter()
        .find(|(_, s)| *s == bytes / 512)
        .unwrap_or_else(|| panic!("no {bytes}-byte disk in the guest: {disks:?}"))
        .0
        .clone()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn fds_of(pid: i32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}

#[test]
fn userspace_nbd_http_cdrom_discard_and_native_aio_in_the_guest() {
    let Some(env) = require("guest_storage", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-stor");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let disk = files.join("disk.img");
    image(&disk, 8 * MIB, "gkvm-local-disk", 4);
    image(&files.join("nbd.img"), 4 * MIB, "gkvm-nbd-pattern", 0);
    image(&files.join("cd.iso"), 2 * MIB, "gkvm-http-cdrom", 0);
    let nbd = Nbd::serve(&files.join("nbd.img"));
    let http = HttpServer::serve(&files, 0).unwrap();
    let hv = common::node(dir.path(), &env.qemu);

    let mut spec = guest_spec(&env, "stor1");
    for pair in [
        "disk_aio=native",
        "disk_discard=unmap",
        "cdrom_disk_type=paravirtual",
        &format!("cdrom_image_path={}", http.url("cd.iso")),
    ] {
        spec.hvparams.set_pair(pair).unwrap();
    }
    spec.disks.push(DiskSpec::new(&disk));
    spec.disks.push(DiskSpec::from_uri(format!(
        "nbd://127.0.0.1:{}/exp",
        nbd.port
    )));
    rt().block_on(async {
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(dir.path().join("run"))
            .instance("stor1")
            .unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("stor1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        let disks = guest_disks(&mut serial);
        let (local, remote, cd) = (
            disk_of_size(&disks, 8 * MIB),
            disk_of_size(&disks, 4 * MIB),
            disk_of_size(&disks, 2 * MIB),
        );
        for (dev, pattern) in [
            (&local, "gkvm-local-disk"),
            (&remote, "gkvm-nbd-pattern"),
            (&cd, "gkvm-http-cdrom"),
        ] {
            let out = serial
                .run(
                    &format!("dd if=/dev/{dev} bs=16 count=1 2>/dev/null; echo"),
                    Duration::from_secs(20),
                )
                .unwrap();
            assert!(out.contains(pattern), "/dev/{dev}: {out}");
        }
        assert!(http.requests() > 0);
        // The CD-ROM is read-only to the guest.
        let ro = serial
            .run(&format!("cat /sys/block/{cd}/ro"), Duration::from_secs(20))
            .unwrap();
        assert!(ro.lines().any(|l| l.trim() == "1"), "{ro}");

        // disk_aio=native: QEMU's Linux AIO context is mapped.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", report.pid)).unwrap();
        assert!(maps.contains("[aio]"), "no Linux AIO context in QEMU");

        // disk_discard=unmap: the guest's discard punches the image.
        let before = allocated(&disk);
        assert!(before >= 4 * MIB, "{before}");
        let out = serial
            .run(
                &format!("blkdiscard /dev/{local} && sync && echo discarded"),
                Duration::from_secs(30),
            )
            .unwrap();
        assert!(out.contains("discarded"), "{out}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while allocated(&disk) >= before {
            assert!(Instant::now() < deadline, "discard never reached the image");
            std::thread::sleep(Duration::from_millis(50));
        }
        hv.stop("stor1", hv_kvm::StopMode::Force).await.unwrap();
    });

    // disk_aio=io_uring: the guest's writes land through an io_uring.
    let mut spec = guest_spec(&env, "stor2");
    spec.hvparams.set_pair("disk_aio=io_uring").unwrap();
    spec.disks.push(DiskSpec::new(&disk));
    rt().block_on(async {
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(dir.path().join("run")).instance("stor2").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("stor2").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            fds_of(report.pid)
                .iter()
                .any(|l| l.to_string_lossy().contains("io_uring")),
            "no io_uring in QEMU"
        );
        let out = serial
            .run(
                "echo gkvm-io-uring-write | dd of=/dev/vda bs=512 conv=fsync 2>/dev/null && echo written",
                Duration::from_secs(30),
            )
            .unwrap();
        assert!(out.contains("written"), "{out}");
        let data = std::fs::read(&disk).unwrap();
        assert!(data.starts_with(b"gkvm-io-uring-write"));
        hv.stop("stor2", hv_kvm::StopMode::Force).await.unwrap();
    });
}

#[test]
fn a_missing_http_cdrom_is_refused_before_anything_starts() {
    let Some(env) = require("guest_storage_404", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-stor404");
    let http = HttpServer::serve(dir.path(), 0).unwrap();
    let hv = common::node(dir.path(), &env.qemu);
    let mut spec = guestless_spec("stor404");
    spec.hvparams
        .set_pair(&format!("cdrom2_image_path={}", http.url("missing.iso")))
        .unwrap();
    let err = rt()
        .block_on(hv.start(&spec, hv_kvm::StartMode::Paused))
        .unwrap_err();
    let report = err.report();
    assert!(
        report.contains("cdrom2_image_path")
            && report.contains("missing.iso")
            && report.contains("404"),
        "{report}"
    );
    assert_eq!(hv.state_files(), Vec::<PathBuf>::new());
}

/// `stats`: what the guest reads and writes moves its disk's counters,
/// what it sends moves its NIC's (its TAP's, turned to the guest's side),
/// and its vCPU is its own thread with its own time.
#[test]
fn stats_follow_what_the_guest_does() {
    let Some(env) = require("stats_guest", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-stats");
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let bridge = gkvm_testkit::Bridge::new("gkvmst0");
    let disk = dir.path().join("data.img");
    image(&disk, 16 * MIB, "gkvm-stats", 0);
    let mut spec = guest_spec(&env, "st1");
    spec.disks.push(DiskSpec::new(&disk));
    spec.nics.push(kvm_cmdline::NicSpec::new(
        "52:54:00:00:71:01".parse().unwrap(),
        bridge.0.clone(),
    ));
    rt().block_on(async {
        let report = hv.start(&spec, hv_kvm::StartMode::Paused).await.unwrap();
        let paths = RunDir::new(dir.path().join("run")).instance("st1").unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("st1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        let before = hv.stats(&[]).await.unwrap().remove(0);
        let out = serial
            .run(
                "dd if=/dev/vda of=/dev/null bs=64k count=32 2>/dev/null; \
                 dd if=/dev/zero of=/dev/vda bs=64k count=16 conv=fsync 2>/dev/null; \
                 arping -c 3 -w 5 -I eth0 192.0.2.1 >/dev/null; echo stats-done",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(out.contains("stats-done"), "{out}");
        let all = hv
            .stats_with(&[], hv_kvm::StatsOptions::default().with_pss(true))
            .await
            .unwrap();
        assert_eq!(all.len(), 1);
        let after = all.into_iter().next().unwrap();
        assert_eq!(after.pid, report.pid);
        let data = |s: &hv_kvm::InstanceStats| {
            s.disks
                .iter()
                .find(|d| d.device.starts_with("disk"))
                .unwrap_or_else(|| panic!("no disk in {:?}", s.disks))
                .clone()
        };
        let (d0, d1) = (data(&before), data(&after));
        assert!(d1.read_bytes >= d0.read_bytes + 2 * MIB, "{d0:?} {d1:?}");
        assert!(d1.write_bytes >= d0.write_bytes + MIB, "{d0:?} {d1:?}");
        assert!(d1.flush_ops > d0.flush_ops, "{d0:?} {d1:?}");
        let (n0, n1) = (&before.nics[0], &after.nics[0]);
        assert_eq!(n1.tap, report.taps[0]);
        assert!(n1.tx_packets >= n0.tx_packets + 3, "{n0:?} {n1:?}");
        assert!(n1.tx_bytes > n0.tx_bytes, "{n0:?} {n1:?}");
        assert_eq!(after.vcpus.len(), 1);
        let thread = std::path::PathBuf::from(format!(
            "/proc/{}/task/{}",
            report.pid, after.vcpus[0].thread_id
        ));
        assert!(thread.exists(), "{}", thread.display());
        // The vCPU thread found by its name in /proc is the one QEMU says.
        let cpus = gkvm_qmp::Qmp::connect(&paths.qmp, gkvm_qmp::Options::default())
            .await
            .unwrap()
            .run(&gkvm_qmp::commands::QueryCpusFast)
            .await
            .unwrap();
        assert_eq!(cpus.len(), 1);
        assert_eq!(cpus[0].thread_id, after.vcpus[0].thread_id);
        assert!(after.vcpus[0].cpu_time_secs > 0.0);
        assert!(after.cpu_time_secs >= after.vcpus[0].cpu_time_secs);
        assert!(after.rss_bytes > 0 && after.balloon_bytes == Some(128 * MIB));
        let pss = after.pss_bytes.expect("PSS");
        assert!(pss > 0 && pss <= after.rss_bytes, "{after:?}");
        // The guest's own view of its memory, from its balloon driver:
        // asked for at the first read, there once the driver answered.
        let deadline = Instant::now() + Duration::from_secs(60);
        let guest = loop {
            let s = hv.stats(&[]).await.unwrap().remove(0);
            if let Some(g) = s.guest_memory {
                break g;
            }
            assert!(Instant::now() < deadline, "no guest memory stats: {s:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            guest.total_bytes > 64 * MIB
                && guest.total_bytes <= 128 * MIB
                && guest.free_bytes < guest.total_bytes,
            "{guest:?}"
        );
        // Its own cgroup, made without limits too: its CPU time counted
        // there (QEMU's, at least).
        let cgroup_secs = after.cgroup_cpu_secs.expect("the instance's cgroup");
        assert!(cgroup_secs > 0.0, "{after:?}");
        hv.stop("st1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

/// Bytes a second the guest reads from `dev` (O_DIRECT, `mib` MiB from
/// `skip_mib`), timed by the guest's own clock.
fn guest_read_rate(serial: &mut Serial, dev: &str, skip_mib: u64, mib: u64) -> f64 {
    let out = serial
        .run(
            &format!(
                "a=$(cut -d' ' -f1 /proc/uptime); \
                 dd if=/dev/{dev} of=/dev/null bs=64k count={} skip={} iflag=direct 2>/dev/null; \
                 b=$(cut -d' ' -f1 /proc/uptime); echo el''apsed $a $b",
                mib * 16,
                skip_mib * 16
            ),
            Duration::from_secs(120),
        )
        .unwrap();
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("elapsed "))
        .unwrap_or_else(|| panic!("no timing in {out}"));
    let t: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    f64::from(u32::try_from(mib * MIB).unwrap()) / (t[1] - t[0])
}

/// A disk in a throttle group reads at its limit (within 10 %), and a
/// live change of the group's limits (`set_io_limits`: QOM, no restart)
/// changes the rate at once; the record keeps the new limits.
#[test]
fn a_throttled_disk_keeps_its_rate_and_a_live_change_moves_it() {
    let Some(env) = require("io_limits", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-iolim");
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let data = dir.path().join("data.img");
    image(&data, 32 * MIB, "gkvm-throttled", 32);
    let mut spec = guest_spec(&env, "iol1");
    let mut limits = hv_kvm::IoLimits::default();
    limits.set("bps-read", "1M").unwrap();
    spec.io_limits.insert("slow".into(), limits);
    let mut disk = DiskSpec::new(&data);
    disk.io_group = Some("slow".into());
    spec.disks = vec![disk];
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let paths = RunDir::new(dir.path().join("run"))
            .instance("iol1")
            .unwrap();
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("iol1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        let limit = f64::from(1u32 << 20);
        let rate = guest_read_rate(&mut serial, "vda", 0, 3);
        eprintln!("at 1 MiB/s: {:.0} KiB/s", rate / 1024.0);
        assert!(
            rate <= 1.1 * limit && rate >= 0.5 * limit,
            "{rate} B/s against a limit of {limit}"
        );

        // Four times the rate, live.
        let mut faster = hv_kvm::IoLimits::default();
        faster.set("bps-read", "4M").unwrap();
        hv.set_io_limits("iol1", "slow", faster.clone())
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let rate = guest_read_rate(&mut serial, "vda", 4, 8);
        eprintln!("at 4 MiB/s: {:.0} KiB/s", rate / 1024.0);
        assert!(
            rate <= 1.1 * 4.0 * limit && rate >= 2.0 * limit,
            "{rate} B/s against a limit of {}",
            4.0 * limit
        );
        assert!(hv.migration_info("iol1").unwrap().contains("4194304"));
        // A group it does not have, and limits QEMU would refuse, are
        // errors naming them.
        let err = hv
            .set_io_limits("iol1", "fast", faster)
            .await
            .unwrap_err()
            .report();
        assert!(err.contains("fast") && err.contains("slow"), "{err}");
        let mut bad = hv_kvm::IoLimits::default();
        bad.set("bps-total", "1M").unwrap();
        bad.set("bps-read", "1M").unwrap();
        let err = hv
            .set_io_limits("iol1", "slow", bad)
            .await
            .unwrap_err()
            .report();
        assert!(err.contains("bps-total"), "{err}");
        hv.stop("iol1", hv_kvm::StopMode::Force).await.unwrap();
    });
}

/// `cgroup_io_max`: the kernel holds the instance's reads of the host
/// device under its disk to the ceiling (QEMU opens the disk O_DIRECT,
/// `disk_cache=none`, so its reads reach the device), the ceiling is in
/// the cgroup's own file for that device, and `set_limits` moves it live.
#[test]
fn a_cgroup_io_ceiling_holds_the_guests_reads_and_moves_live() {
    let Some(env) = require("cgroup_io_max", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-iomax");
    let _guard = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = common::node(dir.path(), &env.qemu);
    let data = dir.path().join("data.img");
    image(&data, 32 * MIB, "gkvm-io-ceiling", 32);
    let Some(dev) = kvm_runtime::cgroup::BlockDev::under(&data) else {
        eprintln!(
            "cgroup_io_max: skipped ({} is on no block device)",
            data.display()
        );
        return;
    };
    let mut spec = guest_spec(&env, "iom1");
    spec.hvparams.set_pair("disk_cache=none").unwrap();
    spec.hvparams.set_pair("cgroup_io_max=rbps=1M").unwrap();
    spec.disks = vec![DiskSpec::new(&data)];
    rt().block_on(async {
        hv.start(&spec, hv_kvm::StartMode::Paused)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let paths = RunDir::new(dir.path().join("run"))
            .instance("iom1")
            .unwrap();
        // The ceiling is the cgroup's, for the device under the disk.
        let rule = paths
            .cgroup
            .dirs()
            .into_iter()
            .find_map(|(c, d)| match c {
                "blkio" => std::fs::read_to_string(d.join("blkio.throttle.read_bps_device")).ok(),
                "" => std::fs::read_to_string(d.join("io.max")).ok(),
                _ => None,
            })
            .expect("an I/O controller");
        assert!(
            rule.contains(&format!("{dev} ")) && rule.contains("1048576"),
            "{rule}"
        );
        let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
        hv.resume("iom1").await.unwrap();
        serial
            .wait_for(READY_LINE, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        let limit = f64::from(1u32 << 20);
        let rate = guest_read_rate(&mut serial, "vda", 0, 3);
        eprintln!("under a 1 MiB/s ceiling: {:.0} KiB/s", rate / 1024.0);
        assert!(
            rate <= 1.15 * limit && rate >= 0.5 * limit,
            "{rate} B/s against a ceiling of {limit}"
        );
        let set = |max: &str| {
            std::collections::BTreeMap::from([(
                "cgroup_io_max".to_owned(),
                serde_json::Value::String(max.to_owned()),
            )])
        };
        hv.set_limits("iom1", &set("rbps=4M"))
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        let rate = guest_read_rate(&mut serial, "vda", 4, 8);
        eprintln!("under a 4 MiB/s ceiling: {:.0} KiB/s", rate / 1024.0);
        assert!(
            rate <= 1.15 * 4.0 * limit && rate >= 2.0 * limit,
            "{rate} B/s against a ceiling of {}",
            4.0 * limit
        );
        // A malformed ceiling is refused by name and changes nothing.
        let err = hv
            .set_limits("iom1", &set("rbps=fast"))
            .await
            .unwrap_err()
            .report();
        assert!(err.contains("cgroup_io_max"), "{err}");
        assert!(hv.migration_info("iom1").unwrap().contains("rbps=4M"));
        hv.stop("iom1", hv_kvm::StopMode::Force).await.unwrap();
        assert!(!paths.cgroup.exists(), "the cgroup outlived its instance");
    });
}
