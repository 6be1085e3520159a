//! UEFI: the test guest boots through OVMF (its kernel handed over by
//! fw_cfg, under TCG), sees `/sys/firmware/efi`, and an EFI variable it
//! writes is in its own variable store after a stop and a start (the store
//! lives in the node's state directory, not the run directory); removing
//! the state is refused while it runs, and ends it once stopped.

mod common;
use common::{guest_spec, rt};
use gkvm_testkit::{require, Need, ScratchDir, Serial, READY_LINE};
use hv_kvm::{KvmHypervisor, RunDir, StartMode, StopMode};
use std::path::Path;
use std::time::Duration;

/// An EFI variable of the test's own vendor GUID.
const VAR: &str = "GkvmTest-4b1f0e2a-8d6c-4b7e-9f10-2a3b4c5d6e7f";

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

#[test]
fn uefi_boots_and_keeps_its_variables() {
    let Some(env) = require("uefi", &[Need::Root, Need::Guest]) else {
        return;
    };
    if !Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists() {
        gkvm_testkit::skip("uefi", "no OVMF (Debian's ovmf; scripts/install-deps)");
        return;
    }
    let dir = ScratchDir::new("gkvm-uefi");
    let run = dir.path().join("run");
    let _kill = gkvm_testkit::KillRunDir(run.clone());
    let mut config = common::node_config(dir.path(), &env.qemu);
    config.state_dir = dir.path().join("state");
    let hv = KvmHypervisor::new(config);
    let guest = env.guest.as_ref().unwrap();
    let mut spec = guest_spec(&env, "uefi1");
    // OVMF and the EFI stub's decompression want more than the 128 MiB
    // the guest boots in under SeaBIOS.
    spec.memory = 256;
    spec.hvparams.set_pair("firmware=uefi").unwrap();
    // OVMF boots a kernel with its EFI stub: the bzImage beside the ELF.
    let bz = guest.kernel.with_file_name("bzImage");
    spec.hvparams.kernel_path = Some(bz);

    let mut serial = boot(&hv, &run, &spec);
    let nvram = dir.path().join("state/instances/uefi1/nvram.fd");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&nvram).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", nvram.display());
    let out = serial
        .run(
            &format!(
                "ls -d /sys/firmware/efi && mount -t efivarfs none /sys/firmware/efi/efivars \
                 && printf '\\007\\000\\000\\000gkvm-uefi-42' > /sys/firmware/efi/efivars/{VAR} \
                 && echo written-$?"
            ),
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(out.contains("written-0"), "{out}");
    // Removing the state of a running instance is refused.
    let refused = rt().block_on(hv.remove_state("uefi1")).unwrap_err();
    assert!(
        refused.report().contains("stop it first"),
        "{}",
        refused.report()
    );
    rt().block_on(hv.stop("uefi1", StopMode::Force)).unwrap();
    drop(serial);

    // Started again: the variable is there (the store persisted).
    let mut serial = boot(&hv, &run, &spec);
    let out = serial
        .run(
            &format!(
                "mount -t efivarfs none /sys/firmware/efi/efivars; \
                 tail -c 12 /sys/firmware/efi/efivars/{VAR}; echo; echo read-$?"
            ),
            Duration::from_secs(60),
        )
        .unwrap();
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
    if !Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists() {
        gkvm_testkit::skip(
            "uefi_migration",
            "no OVMF (Debian's ovmf; scripts/install-deps)",
        );
        return;
    }
    let (da, db) = (
        ScratchDir::new("gkvm-uefi-a"),
        ScratchDir::new("gkvm-uefi-b"),
    );
    let node = |d: &ScratchDir| {
        let mut c = common::node_config(d.path(), &env.qemu);
        c.state_dir = d.path().join("state");
        KvmHypervisor::new(c)
    };
    let (a, b) = (node(&da), node(&db));
    let (_ka, _kb) = (
        gkvm_testkit::KillRunDir(da.path().join("run")),
        gkvm_testkit::KillRunDir(db.path().join("run")),
    );
    let guest = env.guest.as_ref().unwrap();
    let mut spec = guest_spec(&env, "uefim");
    spec.memory = 256;
    spec.hvparams.set_pair("firmware=uefi").unwrap();
    spec.hvparams.kernel_path = Some(guest.kernel.with_file_name("bzImage"));
    let port = 21000 + u16::try_from(std::process::id() % 2000).unwrap();
    spec.hvparams.migration_port = port;

    let mut serial = boot(&a, &da.path().join("run"), &spec);
    let out = serial
        .run(
            &format!(
                "mount -t efivarfs none /sys/firmware/efi/efivars \
                 && printf '\\007\\000\\000\\000gkvm-moved-7' > /sys/firmware/efi/efivars/{VAR} \
                 && echo written-$?"
            ),
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(out.contains("written-0"), "{out}");
    drop(serial);
    let b_store = db.path().join("state/instances/uefim/nvram.fd");
    assert!(!b_store.exists());
    rt().block_on(async {
        let info = a.migration_info("uefim").unwrap();
        b.accept_instance(&info, "127.0.0.1", port).await.unwrap();
        let status = a
            .migrate(
                "uefim",
                "127.0.0.1",
                port,
                hv_kvm::MigrationMode::Live,
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(status.status, hv_kvm::MigrationState::Completed);
        b.wait_incoming("uefim", Duration::from_secs(60))
            .await
            .unwrap();
        a.finalize_migration_source("uefim", hv_kvm::MigrationOutcome::Completed)
            .await
            .unwrap();
        b.finalize_migration_dst("uefim", hv_kvm::MigrationOutcome::Completed)
            .await
            .unwrap();
        b.stop("uefim", StopMode::Force).await.unwrap();
    });
    assert!(b_store.exists(), "the destination made no variable store");
    // Started again on the destination, from its own store.
    let mut serial = boot(&b, &db.path().join("run"), &spec);
    let out = serial
        .run(
            &format!(
                "mount -t efivarfs none /sys/firmware/efi/efivars; \
                 tail -c 12 /sys/firmware/efi/efivars/{VAR}; echo; echo read-$?"
            ),
            Duration::from_secs(60),
        )
        .unwrap();
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
    if !Path::new("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd").exists() {
        gkvm_testkit::skip(
            "uefi_secboot",
            "no OVMF (Debian's ovmf; scripts/install-deps)",
        );
        return;
    }
    let dir = ScratchDir::new("gkvm-uefi-sb");
    let _kill = gkvm_testkit::KillRunDir(dir.path().join("run"));
    let mut config = common::node_config(dir.path(), &env.qemu);
    config.state_dir = dir.path().join("state");
    let hv = KvmHypervisor::new(config);
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
