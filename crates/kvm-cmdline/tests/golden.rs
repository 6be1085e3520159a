//! Golden tests, as libvirt does them: capabilities recorded from real QEMU
//! 7.2 (bookworm) and 10.0 (bookworm-backports) and expected argv files per
//! variant and version (real QEMU starts each of them in the unpublished
//! `gkvm-e2e` crate). Re-bless with `GKVM_BLESS=1 cargo test -p
//! kvm-cmdline --test golden` and review the diff.

use kvm_cmdline::{build, BuildEnv, Capabilities, InstanceSpec, Launch, NicBackend, NodePaths};
use serde::Deserialize;
use std::path::{Path, PathBuf};

const PROFILES: [&str; 2] = ["qemu-7.2", "qemu-10.0"];
const FILES: &str = "/tmp/gkvm-golden/files";

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn bless() -> bool {
    std::env::var("GKVM_BLESS").is_ok_and(|v| v == "1")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn caps(profile: &str) -> Capabilities {
    let d = data().join(profile);
    Capabilities::from_help(
        &read(&d.join("help.txt")),
        &read(&d.join("machine.txt")),
        &read(&d.join("device.txt")),
    )
    .unwrap()
}

#[derive(Deserialize)]
struct Variant {
    name: String,
    spec: InstanceSpec,
    launch: LaunchSpec,
    /// Devices left unplaced and QEMU's default devices, as an instance
    /// started by release 0.1 has them.
    #[serde(default)]
    legacy: bool,
}

#[derive(Deserialize)]
struct LaunchSpec {
    paused: bool,
    nic_queues: Vec<usize>,
    incoming: Option<String>,
    pool_user: Option<String>,
    /// Started with the node's migration TLS credentials.
    #[serde(default)]
    migration_tls: bool,
}

fn variants() -> Vec<Variant> {
    serde_json::from_str(&read(&data().join("variants.json"))).unwrap()
}

fn node_dir(profile: &str, variant: &str) -> PathBuf {
    Path::new("/tmp/gkvm-golden").join(profile).join(variant)
}

/// The descriptor number NIC `nic`'s queue `q` gets in the child.
fn nic_fd(nic: usize, q: usize) -> i32 {
    i32::try_from(100 + 4 * nic + q).unwrap()
}

/// The descriptor number of NIC `nic`'s queue `q`'s vhost-net device.
fn vhost_fd(nic: usize, q: usize) -> i32 {
    i32::try_from(200 + 4 * nic + q).unwrap()
}

fn env() -> BuildEnv {
    BuildEnv {
        spice_cacert: Path::new(FILES).join("spice-ca.pem"),
        spice_cert: Path::new(FILES).join("spice.pem"),
        interfaces: [(
            "lo".to_owned(),
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        )]
        .into_iter()
        .collect(),
    }
}

fn argv_for(
    profile: &str,
    caps: &Capabilities,
    v: &Variant,
) -> Result<Vec<String>, kvm_cmdline::Error> {
    let dir = node_dir(profile, &v.name);
    let launch = Launch {
        node: NodePaths {
            pidfile: dir.join("pid"),
            qmp: dir.join("qmp"),
            qmp_watch: None,
            serial: dir.join("serial"),
            guest_agent: dir.join("qga"),
            chroot: dir.join("chroot"),
            keymap: dir.join("keymap"),
            log: Some(dir.join("qemu.log")),
            events: Some(dir.join("events")),
            tpm: Some(dir.join("tpm")),
            firmware: Some(kvm_cmdline::FirmwareFiles {
                code: PathBuf::from(
                    if v.spec.hvparams.firmware == kvm_cmdline::hvparams::Firmware::UefiSecboot {
                        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
                    } else {
                        "/usr/share/OVMF/OVMF_CODE_4M.fd"
                    },
                ),
                vars: dir.join("nvram.fd"),
            }),
        },
        paused: v.launch.paused,
        daemonize: true,
        incoming: v.launch.incoming.clone(),
        nics: v
            .launch
            .nic_queues
            .iter()
            .enumerate()
            .map(|(i, &q)| NicBackend {
                tap_fds: (0..q).map(|j| nic_fd(i, j)).collect(),
                vhost_fds: if kvm_cmdline::uses_vhost(&v.spec.hvparams) {
                    (0..q).map(|j| vhost_fd(i, j)).collect()
                } else {
                    Vec::new()
                },
            })
            .collect(),
        pool_user: v.launch.pool_user.clone(),
        migration_tls: v
            .launch
            .migration_tls
            .then(|| PathBuf::from("/tmp/gkvm-golden/files/x509")),
    };
    // As hv-kvm starts an instance: devices placed, a lean machine.
    let mut spec = v.spec.clone();
    if !v.legacy {
        spec.shape_new(caps)?;
    }
    let cmd = build(&spec, caps, &env())?;
    cmd.launch_argv(&spec, caps, &launch)
}

#[test]
fn capability_goldens() {
    let mut failures = Vec::new();
    for profile in PROFILES {
        let c = caps(profile);
        let got = serde_json::to_string_pretty(&c).unwrap() + "\n";
        let path = data().join(profile).join("caps.json");
        if bless() {
            std::fs::write(&path, &got).unwrap();
        } else if read(&path) != got {
            failures.push(profile);
        }
    }
    assert!(
        failures.is_empty(),
        "capabilities differ from the goldens for {failures:?} (GKVM_BLESS=1 to re-bless)"
    );

    let c72 = caps("qemu-7.2");
    assert_eq!(
        (c72.version.major, c72.version.minor, c72.version.micro),
        (7, 2, 22)
    );
    assert_eq!(c72.default_machine.as_deref(), Some("pc-i440fx-7.2"));
    assert!(
        c72.features.no_acpi && c72.features.chroot && c72.features.runas && !c72.features.run_with
    );
    assert!(!c72.features.balloon_option && !c72.features.localtime && !c72.features.soundhw);
    assert!(
        c72.features.audio
            && c72.features.spice
            && c72.features.vhost_net
            && !c72.features.drive_boot
    );
    assert_eq!(c72.resolve_machine("pc").unwrap(), "pc-i440fx-7.2");

    let c10 = caps("qemu-10.0");
    assert_eq!((c10.version.major, c10.version.minor), (10, 0));
    assert_eq!(c10.default_machine.as_deref(), Some("pc-i440fx-10.0"));
    assert!(
        !c10.features.no_acpi
            && !c10.features.chroot
            && !c10.features.runas
            && c10.features.run_with
    );
    assert_eq!(c10.resolve_machine("q35").unwrap(), "pc-q35-10.0");
    assert!(
        c10.resolve_machine("pc-i440fx-1.0").is_err()
            || c10.machines.iter().any(|m| m.name == "pc-i440fx-1.0")
    );
}

#[test]
fn qmp_probe_agrees_with_help_text() {
    for profile in PROFILES {
        let lines: Vec<serde_json::Value> = read(&data().join(profile).join("qmp.jsonl"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // greeting, qmp_capabilities, version, machines, types, options, quit
        let ret = |i: usize| lines[i]["return"].clone();
        let help = read(&data().join(profile).join("help.txt"));
        let from_help = caps(profile);
        for with_help in [Some(help.as_str()), None] {
            let q = Capabilities::from_qmp(&ret(2), &ret(3), &ret(4), &ret(5), with_help).unwrap();
            assert_eq!(q.version.text, from_help.version.text, "{profile}");
            assert_eq!(q.default_machine, from_help.default_machine, "{profile}");
            let names = |c: &Capabilities| {
                c.machines
                    .iter()
                    .map(|m| m.name.clone())
                    .collect::<std::collections::BTreeSet<_>>()
            };
            assert_eq!(names(&q), names(&from_help), "{profile}");
            assert_eq!(
                q.resolve_machine("pc").unwrap(),
                from_help.resolve_machine("pc").unwrap()
            );
            for d in [
                "virtio-net-pci",
                "virtio-balloon-pci",
                "usb-tablet",
                "ide-cd",
            ] {
                assert!(q.devices.contains(d), "{profile}: {d}");
            }
            // Without the help text, flag options are inferred from the version:
            // they must agree with what the help text says for these versions.
            let (a, b) = (&q.features, &from_help.features);
            assert_eq!(
                (
                    a.no_acpi,
                    a.chroot,
                    a.runas,
                    a.run_with,
                    a.balloon_option,
                    a.localtime,
                    a.soundhw,
                    a.audio,
                    a.spice
                ),
                (
                    b.no_acpi,
                    b.chroot,
                    b.runas,
                    b.run_with,
                    b.balloon_option,
                    b.localtime,
                    b.soundhw,
                    b.audio,
                    b.spice
                ),
                "{profile} (help given: {})",
                with_help.is_some()
            );
            // Both give the same argv.
            for v in variants() {
                assert_eq!(
                    argv_for(profile, &q, &v).unwrap(),
                    argv_for(profile, &from_help, &v).unwrap(),
                    "{profile} {}",
                    v.name
                );
            }
        }
    }
}

#[test]
fn argv_goldens_for_both_versions() {
    let vs = variants();
    assert!(vs.len() >= 30, "at least 30 variants");
    let mut diffs = Vec::new();
    for profile in PROFILES {
        let c = caps(profile);
        let dir = data().join(profile).join("argv");
        std::fs::create_dir_all(&dir).unwrap();
        for v in &vs {
            let argv =
                argv_for(profile, &c, v).unwrap_or_else(|e| panic!("{profile} {}: {e}", v.name));
            let got = argv.join("\n") + "\n";
            let path = dir.join(format!("{}.argv", v.name));
            if bless() {
                std::fs::write(&path, &got).unwrap();
            } else {
                let want = std::fs::read_to_string(&path).unwrap_or_default();
                if want != got {
                    diffs.push(format!(
                        "{profile}/{}:\n--- golden\n{want}+++ built\n{got}",
                        v.name
                    ));
                }
            }
        }
        eprintln!("{profile}: {} argv goldens checked", vs.len());
    }
    assert!(
        diffs.is_empty(),
        "argv differs from the goldens (GKVM_BLESS=1 to re-bless):\n{}",
        diffs.join("\n")
    );
}

#[test]
fn version_aware_spellings() {
    let v = |profile: &str, name: &str| {
        let c = caps(profile);
        let var = variants().into_iter().find(|x| x.name == name).unwrap();
        argv_for(profile, &c, &var).unwrap().join(" ")
    };
    for p in PROFILES {
        assert!(v(p, "minimal").contains("-device virtio-balloon-pci,id=balloon0"));
        assert!(v(p, "localtime").contains("-rtc base=localtime"));
        assert!(v(p, "sound").contains("-audio none,model=ac97"));
        assert!(v(p, "vnc-any-password").contains("-vnc :51,password=on"));
        assert!(v(p, "minimal").contains(",server=on,wait=off"));
        assert!(
            !v(p, "vnc-any-password").contains("vnc.pass"),
            "password file path leaked"
        );
        assert!(v(p, "comma-paths").contains("file.filename=/tmp/gkvm-golden/files/disk,,odd.img"));
        // Shared storage forces cache=none: O_DIRECT, flushes kept, and
        // the guest sees a write-back cache.
        assert!(v(p, "shared-storage").contains(",cache.direct=on,cache.no-flush=off,"));
        assert!(v(p, "shared-storage").contains(",write-cache=on"));
        assert!(v(p, "two-nics-legacy").contains("-drive file=/tmp/gkvm-golden/files/disk0.img,"));
    }
    assert!(v("qemu-7.2", "acpi-off").contains("-no-acpi"));
    assert!(v("qemu-10.0", "acpi-off").contains("-machine pc-i440fx-10.0,accel=kvm,acpi=off"));
    assert!(v("qemu-7.2", "chroot").contains("-chroot /tmp/gkvm-golden/qemu-7.2/chroot/chroot"));
    assert!(v("qemu-10.0", "chroot")
        .contains("-run-with chroot=/tmp/gkvm-golden/qemu-10.0/chroot/chroot"));
    assert!(v("qemu-7.2", "security-user").contains("-runas nobody"));
    assert!(v("qemu-10.0", "security-pool").contains("-run-with user=nobody"));
}

/// Old QEMU, from excerpts of the help text of their day: Ganeti's
/// spellings come back.
#[test]
fn old_qemu_gets_old_spellings() {
    let help =
        "QEMU emulator version 1.0 (qemu-kvm-1.0), Copyright (c) 2003-2008 Fabrice Bellard\n\
-M machine      select emulated machine (-M ? for list)\n\
-drive [file=file][,if=type][,bus=n][,unit=m][,media=d][,index=i]\n\
       [,cyls=c,heads=h,secs=s[,trans=t]][,snapshot=on|off]\n\
       [,cache=writethrough|writeback|none|unsafe][,format=f]\n\
       [,serial=s][,addr=A][,id=name][,aio=threads|native]\n\
       [,readonly=on|off][,boot=on|off]\n\
-balloon virtio[,addr=str]\n\
-localtime      set the real time clock to local time\n\
-soundhw c1,... enable audio support\n\
-usbdevice name add the host or guest USB device 'name'\n\
-no-acpi        disable ACPI\n\
-enable-kvm     enable KVM full virtualization support\n\
-netdev tap,id=str[,ifname=name][,fd=h][,script=file][,downscript=dfile]\n\
         [,vnet_hdr=on|off][,vhost=on|off][,vhostfd=h][,vhostforce=on|off]\n\
-qmp dev        like -monitor but opens in 'control' mode\n\
-nographic      disable graphical output\n\
-chroot dir     chroot to dir just before starting the VM\n\
-runas user     change to user id user just before starting the VM\n\
-uuid %08x-%04x-%04x-%04x-%012x\n";
    let machines = "Supported machines are:\npc         Standard PC (alias of pc-1.0)\npc-1.0     Standard PC (default)\n";
    let devices = "name \"virtio-net-pci\", bus PCI\nname \"virtio-balloon-pci\", bus PCI\n";
    let c = Capabilities::from_help(help, machines, devices).unwrap();
    assert!(c.features.drive_boot && c.features.vhost_net && c.features.balloon_option);
    let mut spec = InstanceSpec::new("old1", 256);
    spec.disks.push(kvm_cmdline::DiskSpec::new("/dev/vg/old1"));
    spec.hvparams.set_pair("use_localtime=true").unwrap();
    spec.hvparams.set_pair("soundhw=es1370").unwrap();
    spec.hvparams.set_pair("acpi=false").unwrap();
    let argv = build(&spec, &c, &BuildEnv::default())
        .unwrap()
        .argv
        .join(" ");
    for want in [
        "-balloon virtio",
        "-no-acpi",
        "-M pc-1.0 -enable-kvm",
        "-boot c -drive file=/dev/vg/old1,format=raw,if=virtio,boot=on",
        "-localtime",
        "-soundhw es1370",
        "-nographic",
    ] {
        assert!(argv.contains(want), "{want:?} missing from {argv}");
    }
    // QEMU 0.9: no -device list, no -machine.
    let c09 = Capabilities::from_help(
        "QEMU PC emulator version 0.9.1, Copyright (c) 2003-2008 Fabrice Bellard\n-M machine      select emulated machine\n-localtime      set the real time clock to local time\n",
        "Supported machines are:\npc         Standard PC (default)\nisapc      ISA-only PC\n",
        "",
    )
    .unwrap();
    assert_eq!(
        (c09.version.major, c09.version.minor, c09.version.micro),
        (0, 9, 1)
    );
    assert!(!c09.features.qmp && !c09.features.machine);
}

/// Ganeti 3.1's `constants.HVC_DEFAULTS` for kvm (its 65 hvparams, from
/// src/Ganeti/Constants.hs with Debian's AutoConf paths) is accepted as it
/// is, passes the syntax check, and builds for both QEMUs.
#[test]
fn ganeti_3_1_kvm_defaults_are_accepted() {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&read(&data().join("ganeti-3.1-kvm-defaults.json"))).unwrap();
    assert_eq!(map.len(), 65);
    let hv = kvm_cmdline::HvParams::from_map(&map).unwrap();
    hv.check_syntax().unwrap();
    assert_eq!(
        kvm_cmdline::HvParams::keys().len(),
        map.len() + kvm_cmdline::GKVM_HVPARAMS.len()
    );
    for profile in PROFILES {
        let mut spec = InstanceSpec::new("g31", 128);
        spec.hvparams = hv.clone();
        // vhost_net is on in 3.1's defaults; this builder needs the host's
        // word that /dev/vhost-net exists, which the launch part checks.
        kvm_cmdline::build(&spec, &caps(profile), &env()).unwrap();
    }
}

/// The hvparams of the instances in Ganeti 3.1's own tests (a runtime
/// file's, the console tests', the valid cases of the parameter checks):
/// each is accepted as it is, and passes the syntax check where Ganeti's
/// whole `CheckParameterSyntax` would pass it.
#[test]
fn ganeti_3_1_unit_test_hvparams_are_accepted() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&read(&data().join("ganeti-3.1-unittest-hvparams.json"))).unwrap();
    assert!(cases.len() >= 14);
    for case in &cases {
        let source = case["source"].as_str().unwrap();
        let map = case["hvparams"].as_object().unwrap();
        let hv = kvm_cmdline::HvParams::from_map(map).unwrap_or_else(|e| panic!("{source}: {e}"));
        if case["full_syntax_check"].as_bool().unwrap() {
            hv.check_syntax()
                .unwrap_or_else(|e| panic!("{source}: {e}"));
        }
    }
}
