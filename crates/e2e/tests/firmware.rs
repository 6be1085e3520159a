//! UEFI: the test guest boots through OVMF (its kernel handed over by
//! fw_cfg, under TCG), sees `/sys/firmware/efi`, and an EFI variable it
//! writes is in its own variable store after a stop and a start (the store
//! lives in the node's state directory, not the run directory); removing
//! the state is refused while it runs, and ends it once stopped. And the
//! other devices a current guest expects: a random-number device fed by
//! the host, a watchdog that acts when the guest stops feeding it, and a
//! TPM 2.0 whose emulator (a swtpm of the instance's own) is started and
//! ended with it and whose state travels with a migration.

mod common;
use common::{guest_spec, hop, rt};
use gkvm_testkit::{require, Env, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::{KvmHypervisor, RunDir, StartMode, StopMode};
use std::path::Path;
use std::time::Duration;

/// An EFI variable of the test's own vendor GUID.
const VAR: &str = "GkvmTest-4b1f0e2a-8d6c-4b7e-9f10-2a3b4c5d6e7f";

/// Whether OVMF's `file` is missing here (the test is then skipped,
/// saying so).
fn ovmf_missing(test: &str, file: &str) -> bool {
    let missing = !Path::new("/usr/share/OVMF").join(file).exists();
    if missing {
        gkvm_testkit::skip(test, "no OVMF (Debian's ovmf; scripts/install-deps)");
    }
    missing
}

/// A node at `dir` whose state directory is `dir/state`.
fn uefi_node(dir: &Path, qemu: &Path) -> KvmHypervisor {
    let mut config = common::node_config(dir, qemu);
    config.state_dir = dir.join("state");
    KvmHypervisor::new(config)
}

/// The test guest, booting UEFI.
fn uefi_guest(env: &Env, name: &str) -> hv_kvm::InstanceSpec {
    let mut spec = guest_spec(env, name);
    // OVMF and the EFI stub's decompression want more than the 128 MiB
    // the guest boots in under SeaBIOS.
    spec.memory = 256;
    spec.hvparams.set_pair("firmware=uefi").unwrap();
    // OVMF boots a kernel with its EFI stub: the bzImage beside the ELF.
    let kernel = &env.guest.as_ref().expect("test guest").kernel;
    spec.hvparams.kernel_path = Some(kernel.with_file_name("bzImage"));
    spec
}

fn boot(hv: &KvmHypervisor, run: &Path, spec: &hv_kvm::InstanceSpec) -> Serial {
    rt().block_on(hv.start(spec, StartMode::Paused)).unwrap();
    let paths = RunDir::new(run).instance(&spec.name).unwrap();
    let mut serial = Serial::connect(&paths.serial, Duration::from_secs(5)).unwrap();
    rt().block_on(hv.resume(&spec.name)).unwrap();
    serial
        .wait_for(READY_LINE, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("the guest did not boot through OVMF: {e}"));
    serial
}

/// Writes the test's EFI variable (`value`, 12 bytes) in the booted
/// guest, through efivarfs.
fn write_var(serial: &mut Serial, value: &str) {
    let out = serial
        .run(
            &format!(
                "ls -d /sys/firmware/efi && mount -t efivarfs none /sys/firmware/efi/efivars \
                 && printf '\\007\\000\\000\\000{value}' > /sys/firmware/efi/efivars/{VAR} \
                 && echo written-$?"
            ),
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(out.contains("written-0"), "{out}");
}

/// What the booted guest reads of the test's EFI variable.
fn read_var(serial: &mut Serial) -> String {
    serial
        .run(
            &format!(
                "mount -t efivarfs none /sys/firmware/efi/efivars; \
                 tail -c 12 /sys/firmware/efi/efivars/{VAR}; echo; echo read-$?"
            ),
            Duration::from_secs(60),
        )
        .unwrap()
}

/// The SecureBoot variable as the booted guest reads it: `1` under Secure
/// Boot, `0` without (its last byte; the first four are its attributes).
fn secure_boot(serial: &mut Serial) -> String {
    let out = serial
        .run(
            "mount -t efivarfs none /sys/firmware/efi/efivars 2>/dev/null; \
             echo s''b=$(od -An -tu1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c | awk '{print $NF}')",
            Duration::from_secs(60),
        )
        .unwrap();
    out.rsplit("sb=")
        .next()
        .and_then(|l| l.lines().next())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn uefi_boots_and_keeps_its_variables() {
    let Some(env) = require("uefi", &[Need::Root, Need::Guest]) else {
        return;
    };
    if ovmf_missing("uefi", "OVMF_CODE_4M.fd") {
        return;
    }
    let dir = ScratchDir::new("gkvm-uefi");
    let run = dir.path().join("run");
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let hv = uefi_node(dir.path(), &env.qemu);
    let spec = uefi_guest(&env, "uefi1");

    let mut serial = boot(&hv, &run, &spec);
    let nvram = dir.path().join("state/instances/uefi1/nvram.fd");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&nvram).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", nvram.display());
    write_var(&mut serial, "gkvm-uefi-42");
    // Plain UEFI: no keys enrolled, no Secure Boot.
    assert_eq!(secure_boot(&mut serial), "0");
    // Removing the state of a running instance is refused.
    let refused = rt().block_on(hv.remove_state("uefi1")).unwrap_err();
    assert!(
        refused.report().contains("stop it first") && refused.kind() == "state",
        "{}: {}",
        refused.kind(),
        refused.report()
    );
    rt().block_on(hv.stop("uefi1", StopMode::Force)).unwrap();
    drop(serial);

    // Started again: the variable is there (the store persisted).
    let mut serial = boot(&hv, &run, &spec);
    let out = read_var(&mut serial);
    assert!(
        out.contains("gkvm-uefi-42"),
        "the EFI variable did not survive a restart:\n{out}"
    );
    rt().block_on(hv.stop("uefi1", StopMode::Force)).unwrap();
    drop(serial);

    rt().block_on(hv.remove_state("uefi1")).unwrap();
    assert!(!nvram.exists());
    assert!(!dir.path().join("state/instances/uefi1").exists());
}

/// A UEFI instance live-migrates to a node that has no copy of its
/// variable store: the destination makes one, QEMU carries the guest's
/// variables in the stream (the flash's contents are migrated and written
/// back), and a restart there finds them.
#[test]
fn uefi_variables_travel_with_a_migration() {
    let Some(env) = require("uefi_migration", &[Need::Root, Need::Guest]) else {
        return;
    };
    if ovmf_missing("uefi_migration", "OVMF_CODE_4M.fd") {
        return;
    }
    let (da, db) = (
        ScratchDir::new("gkvm-uefi-a"),
        ScratchDir::new("gkvm-uefi-b"),
    );
    let (a, b) = (
        uefi_node(da.path(), &env.qemu),
        uefi_node(db.path(), &env.qemu),
    );
    let (_ka, _kb) = (
        gkvm_testkit::KillRunDir(da.path().join("run")),
        gkvm_testkit::KillRunDir(db.path().join("run")),
    );
    let mut spec = uefi_guest(&env, "uefim");
    let port = 21000 + u16::try_from(std::process::id() % 2000).unwrap();
    spec.hvparams.migration_port = port;

    let mut serial = boot(&a, &da.path().join("run"), &spec);
    write_var(&mut serial, "gkvm-moved-7");
    drop(serial);
    let b_store = db.path().join("state/instances/uefim/nvram.fd");
    assert!(!b_store.exists());
    rt().block_on(async {
        hop(&a, &b, "uefim", port).await;
        b.stop("uefim", StopMode::Force).await.unwrap();
    });
    assert!(b_store.exists(), "the destination made no variable store");
    // Started again on the destination, from its own store.
    let mut serial = boot(&b, &db.path().join("run"), &spec);
    let out = read_var(&mut serial);
    assert!(
        out.contains("gkvm-moved-7"),
        "the variable did not travel:\n{out}"
    );
    rt().block_on(b.stop("uefim", StopMode::Force)).unwrap();
}

/// Secure Boot: q35, SMM, a secure flash and a store with Microsoft's keys
/// enrolled. Started under TCG (this machine's nested KVM has no SMM);
/// the store is made from the enrolled template.
#[test]
fn uefi_secure_boot_starts_with_the_enrolled_store() {
    let Some(env) = require("uefi_secboot", &[Need::Root, Need::Qemu]) else {
        return;
    };
    if ovmf_missing("uefi_secboot", "OVMF_CODE_4M.secboot.fd") {
        return;
    }
    let dir = ScratchDir::new("gkvm-uefi-sb");
    let _kill = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let hv = uefi_node(dir.path(), &env.qemu);
    let mut spec = hv_kvm::InstanceSpec::new("sb1", 256);
    for pair in [
        "firmware=uefi-secboot",
        "machine_version=q35",
        "kvm_flag=disabled",
    ] {
        spec.hvparams.set_pair(pair).unwrap();
    }
    rt().block_on(async {
        hv.start(&spec, StartMode::Paused).await.unwrap();
        assert_eq!(
            hv.info("sb1").await.unwrap().state,
            hv_kvm::InstanceState::Paused
        );
        hv.stop("sb1", StopMode::Force).await.unwrap();
    });
    let store = std::fs::read(dir.path().join("state/instances/sb1/nvram.fd")).unwrap();
    let enrolled = std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").unwrap();
    assert_eq!(store.len(), enrolled.len());
    // On i440fx it is refused, naming the parameter.
    spec.hvparams.set_pair("machine_version=pc").unwrap();
    let e = rt()
        .block_on(hv.start(&spec, StartMode::Paused))
        .unwrap_err();
    assert!(
        e.report().contains("uefi-secboot needs a q35 machine"),
        "{}",
        e.report()
    );
}

/// Secure Boot shown to a booted guest: the test guest's EFI system
/// partition (shim signed by Microsoft's UEFI CA, GRUB and the kernel
/// signed by Debian) boots from a disk on a `uefi-secboot` instance, and
/// the guest reads SecureBoot = 1 and its kernel says it is on (and
/// locks itself down).
#[test]
fn a_guest_boots_under_secure_boot_and_sees_it_on() {
    let Some(env) = require("uefi_secboot_guest", &[Need::Root, Need::Guest]) else {
        return;
    };
    if ovmf_missing("uefi_secboot_guest", "OVMF_CODE_4M.secboot.fd") {
        return;
    }
    let dir = ScratchDir::new("gkvm-uefi-sbg");
    let run = dir.path().join("run");
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let hv = uefi_node(dir.path(), &env.qemu);
    let kernel = &env.guest.as_ref().expect("test guest").kernel;
    let esp = dir.path().join("esp.img");
    std::fs::copy(kernel.with_file_name("esp.img"), &esp)
        .expect("the test guest's esp.img (scripts/build-test-guest)");
    // OVMF, shim, GRUB and the EFI stub's decompression under Secure Boot
    // want more than the 256 MiB a fw_cfg boot does.
    let mut spec = hv_kvm::InstanceSpec::new("sbg1", 512);
    for pair in [
        "firmware=uefi-secboot",
        "machine_version=q35",
        "kvm_flag=disabled",
        "boot_order=disk",
    ] {
        spec.hvparams.set_pair(pair).unwrap();
    }
    spec.disks = vec![kvm_cmdline::DiskSpec::new(&esp)];
    let mut serial = boot(&hv, &run, &spec);
    assert_eq!(secure_boot(&mut serial), "1");
    let out = serial
        .run(
            "dmesg | grep -i -E 'secure ?boot|lockdown'",
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(out.contains("Secure boot enabled"), "{out}");
    rt().block_on(hv.stop("sbg1", StopMode::Force)).unwrap();
}

/// `rng=virtio`: the guest's kernel takes virtio-rng as its hardware RNG
/// and reads from it. `watchdog=i6300esb` with `watchdog_action=pause`:
/// fed, the guest runs on; its feeder killed (no magic close), QEMU stops
/// the guest and `info` says why (state `watchdog`).
#[test]
fn the_guest_draws_randomness_and_its_watchdog_acts() {
    let Some(env) = require("rng_watchdog", &[Need::Root, Need::Guest]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-rngwd");
    let run = dir.path().join("run");
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let hv = KvmHypervisor::new(common::node_config(dir.path(), &env.qemu));
    let mut spec = guest_spec(&env, "rngwd1");
    for pair in [
        "rng=virtio",
        "rng_rate=65536",
        "watchdog=i6300esb",
        "watchdog_action=pause",
    ] {
        spec.hvparams.set_pair(pair).unwrap();
    }
    let mut serial = boot(&hv, &run, &spec);
    let out = serial
        .run(
            "cat /sys/class/misc/hw_random/rng_current; \
             dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        out.contains("virtio_rng") && out.lines().any(|l| l.trim() == "32"),
        "{out}"
    );
    // Ganeti's own driver has neither device: not handed to it.
    let refused = rt().block_on(hv.release_to_ganeti("rngwd1")).unwrap_err();
    assert!(
        refused.report().contains("rng=virtio"),
        "{}",
        refused.report()
    );
    // Fed every second with a 2 s timeout (busybox's watchdog daemon).
    let out = serial
        .run(
            "watchdog -T 2 -t 1 /dev/watchdog; echo fed-$?",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(out.contains("fed-0"), "{out}");
    let state = || rt().block_on(hv.info("rngwd1")).unwrap().state;
    assert_eq!(state(), hv_kvm::InstanceState::Running);
    serial
        .run("killall -9 watchdog; echo killed", Duration::from_secs(60))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while state() != hv_kvm::InstanceState::Watchdog {
        assert!(
            std::time::Instant::now() < deadline,
            "the watchdog did not act: {:?}",
            state()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    rt().block_on(hv.stop("rngwd1", StopMode::Force)).unwrap();
}

/// A TPM2_PCR_Extend of PCR 16 (the debug PCR) with a SHA-256 digest of
/// 32 bytes `fill`, as printf octal escapes for the guest's shell.
fn pcr16_extend(fill: u8) -> String {
    let mut cmd: Vec<u8> = vec![0x80, 0x02, 0, 0, 0, 65, 0, 0, 0x01, 0x82, 0, 0, 0, 16];
    // The password session: TPM_RS_PW, no nonce, no attributes, no HMAC.
    cmd.extend([0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0]);
    // One digest: SHA-256.
    cmd.extend([0, 0, 0, 1, 0, 0x0b]);
    cmd.extend([fill; 32]);
    assert_eq!(cmd.len(), 65);
    cmd.iter().map(|b| format!("\\{b:03o}")).collect()
}

/// What the guest reads of PCR 16's SHA-256 bank.
fn read_pcr16(serial: &mut Serial) -> String {
    let out = serial
        .run(
            // The marker split in the command: the console wraps the
            // echoed command, and a wrapped line must not start with it.
            "echo p''cr=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)",
            Duration::from_secs(60),
        )
        .unwrap();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("pcr="))
        .filter(|v| v.len() == 64)
        .unwrap_or_else(|| panic!("no PCR 16 in {out}"))
        .to_owned()
}

/// The TPM's reset count (TPM2_ReadClock), which the TPM keeps in its
/// persistent state and counts up at each power-on: read by the guest
/// through `/dev/tpm0`.
fn read_reset_count(serial: &mut Serial) -> u32 {
    let out = serial
        .run(
            // The command has a newline byte (its size, 10), at which
            // printf flushes: dd makes it one write, as the TPM wants.
            // Kernel messages off the console: one in the middle of the
            // answer would garble it.
            "dmesg -n 1; exec 3<>/dev/tpm0; \
             printf '\\200\\001\\000\\000\\000\\012\\000\\000\\001\\201' \
             | dd ibs=1 count=10 obs=10 >&3 2>/dev/null; \
             echo c''lock=$(dd bs=64 count=1 <&3 2>/dev/null | od -An -tx1 -v); exec 3<&-",
            Duration::from_secs(60),
        )
        .unwrap();
    let bytes: Vec<u8> = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("clock="))
        .unwrap_or_else(|| panic!("no clock in {out}"))
        .split_whitespace()
        .map(|b| {
            u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("{b:?} is not a byte in {out:?}"))
        })
        .collect();
    // Header (10), time (8), clock (8), then resetCount.
    assert!(
        bytes.len() >= 35 && bytes[6..10] == [0; 4],
        "TPM2_ReadClock failed: {out}"
    );
    u32::from_be_bytes(bytes[26..30].try_into().unwrap())
}

/// `tpm=tpm2`: the guest sees a TPM 2.0 and extends a PCR; the value is
/// there after a live migration (the destination started its own swtpm;
/// the state came in the stream), each swtpm ends with its QEMU, and the
/// TPM's state stays in the node's state directory after a stop.
#[test]
fn the_guest_has_a_tpm_that_migrates() {
    let Some(env) = require("tpm", &[Need::Root, Need::Guest]) else {
        return;
    };
    if !Path::new("/usr/bin/swtpm").exists() {
        gkvm_testkit::skip("tpm", "no swtpm (Debian's swtpm; scripts/install-deps)");
        return;
    }
    let (da, db) = (ScratchDir::new("gkvm-tpm-a"), ScratchDir::new("gkvm-tpm-b"));
    let (a, b) = (
        uefi_node(da.path(), &env.qemu),
        uefi_node(db.path(), &env.qemu),
    );
    let (run_a, run_b) = (da.path().join("run"), db.path().join("run"));
    let (_ka, _kb) = (
        gkvm_testkit::KillRunDir(run_a.clone()),
        gkvm_testkit::KillRunDir(run_b.clone()),
    );
    let mut spec = guest_spec(&env, "tpm1");
    spec.hvparams.set_pair("tpm=tpm2").unwrap();
    // The guest finds its TPM in the ACPI tables, which a kernel booted
    // directly (PVH) gets broken: refused; the bzImage, through SeaBIOS.
    let kernel = &env.guest.as_ref().expect("test guest").kernel;
    let refused = rt()
        .block_on(a.start(&spec, StartMode::Paused))
        .unwrap_err();
    assert!(
        refused.kind() == "params" && refused.report().contains("bzImage"),
        "{}",
        refused.report()
    );
    assert_eq!(gkvm_testkit::helpers_in(&run_a), Vec::<i32>::new());
    // Refused before anything was made for it (no TAP, no state).
    assert_eq!(a.state_files(), Vec::<std::path::PathBuf>::new());
    assert!(!da.path().join("state/instances/tpm1").exists());
    spec.hvparams.kernel_path = Some(kernel.with_file_name("bzImage"));
    spec.hvparams.migration_port = 23000 + u16::try_from(std::process::id() % 2000).unwrap();
    let mut serial = boot(&a, &run_a, &spec);
    let out = serial
        .run(
            "echo ma''jor=$(cat /sys/class/tpm/tpm0/tpm_version_major); ls /dev/tpm0",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        out.contains("major=2") && out.contains("/dev/tpm0"),
        "{out}"
    );
    let before = read_pcr16(&mut serial);
    let out = serial
        .run(
            &format!("printf '{}' > /dev/tpm0; echo extended-$?", pcr16_extend(1)),
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(out.contains("extended-0"), "{out}");
    let extended = read_pcr16(&mut serial);
    assert_ne!(before, extended, "the extend changed nothing");
    let resets = read_reset_count(&mut serial);
    drop(serial);
    let paths_a = RunDir::new(&run_a).instance("tpm1").unwrap();
    let swtpm_a = paths_a.tpm_helper().expect("a swtpm on the source");

    rt().block_on(hop(&a, &b, "tpm1", spec.hvparams.migration_port));
    let paths_b = RunDir::new(&run_b).instance("tpm1").unwrap();
    let swtpm_b = paths_b.tpm_helper().expect("a swtpm on the destination");
    assert_ne!(swtpm_a, swtpm_b);
    let gone = |pid: i32| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while hv_kvm::process_alive(pid) {
            assert!(std::time::Instant::now() < deadline, "swtpm {pid} lives on");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The source's QEMU quit after the handover: its swtpm with it.
    gone(swtpm_a);
    let mut serial = Serial::connect(&paths_b.serial, Duration::from_secs(5)).unwrap();
    assert_eq!(
        read_pcr16(&mut serial),
        extended,
        "PCR 16 after the migration"
    );
    drop(serial);
    let helpers = rt().block_on(b.info("tpm1")).unwrap().helpers;
    assert_eq!(
        (helpers.len(), helpers[0].kind.as_str(), helpers[0].pid),
        (1, "swtpm", Some(swtpm_b))
    );
    // A swtpm killed under the running instance is reported by info; the
    // stop then leaves nothing of it.
    // SAFETY: a signal to the swtpm this test's instance owns.
    unsafe { libc::kill(swtpm_b, libc::SIGKILL) };
    gone(swtpm_b);
    let info = rt().block_on(b.info("tpm1")).unwrap();
    assert_eq!(info.helpers[0].pid, None, "{info:?}");
    rt().block_on(b.stop("tpm1", StopMode::Force)).unwrap();
    assert!(!paths_b.tpm.exists() && !paths_b.tpm_pid.exists());
    // Started again on the destination, from the state it was sent: the
    // TPM counts one more power-on (a new TPM would count from the start).
    let mut serial = boot(&b, &run_b, &spec);
    assert_eq!(
        read_reset_count(&mut serial),
        resets + 1,
        "TPM state after a restart"
    );
    drop(serial);
    rt().block_on(b.stop("tpm1", StopMode::Force)).unwrap();
    let state = db.path().join("state/instances/tpm1/tpm");
    let kept: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        kept.iter().any(|f| f.to_string_lossy().contains("permall")),
        "no TPM state in {}: {kept:?}",
        state.display()
    );
}

/// The uid a live process runs as.
fn uid_of(pid: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Under `security_model=user` and `pool` the TPM's swtpm runs as the
/// user QEMU drops to, not as root: QEMU connects to it (its TPM is set
/// up, its state written into the instance's state directory, owned by
/// that user), the state is read again at the next start (by another
/// pool uid too), and stopping ends it. Guest-less: QEMU initialises the
/// TPM before the guest runs.
#[test]
fn the_tpm_helper_runs_as_the_instances_user() {
    let Some(env) = require("tpm_security_model", &[Need::Root, Need::Qemu]) else {
        return;
    };
    let dir = ScratchDir::new("gkvm-tpm-user");
    let _kill = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let id = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap();
    let uid: u32 = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
    // A pool of one system user of Debian's that runs nothing (a uid
    // with processes is not handed out).
    let pool_uid = ["uucp", "news", "games", "list", "irc"]
        .iter()
        .filter_map(|name| {
            let out = std::process::Command::new("id")
                .args(["-u", name])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .ok()
        })
        .find(|u| {
            !std::process::Command::new("pgrep")
                .args(["-U", &u.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("a Debian system user without processes");
    let mut config = common::node_config(dir.path(), &env.qemu);
    config.state_dir = dir.path().join("state");
    config.uid_pool = Some(kvm_runtime::UidPool::new(pool_uid, pool_uid));
    let hv = KvmHypervisor::new(config);
    let state = dir.path().join("state/instances/tpmu1/tpm");
    for model in ["security_model=user", "security_model=pool"] {
        let mut spec = common::guestless_spec("tpmu1");
        for pair in [model, "tpm=tpm2"] {
            spec.hvparams.set_pair(pair).unwrap();
        }
        if model.ends_with("user") {
            spec.hvparams.set_pair("security_domain=nobody").unwrap();
        }
        rt().block_on(async {
            hv.start(&spec, StartMode::Paused)
                .await
                .unwrap_or_else(|e| panic!("{model}: {}", e.report()));
            let info = hv.info("tpmu1").await.unwrap();
            let swtpm = info.helpers.iter().find(|h| h.kind == "swtpm").unwrap();
            let swtpm = swtpm.pid.expect("swtpm runs");
            let uid = if model.ends_with("user") {
                uid
            } else {
                pool_uid
            };
            assert_eq!(uid_of(swtpm), uid, "{model}: swtpm is not uid {uid}'s");
            assert_eq!(uid_of(info.pid), uid, "{model}: QEMU is not uid {uid}'s");
            let permall = state.join("tpm2-00.permall");
            let meta = std::fs::metadata(&permall)
                .unwrap_or_else(|e| panic!("{model}: {}: {e}", permall.display()));
            assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid);
            hv.stop("tpmu1", StopMode::Force).await.unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !gkvm_testkit::helpers_in(&dir.path().join("run")).is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{model}: swtpm outlived its QEMU"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
}
