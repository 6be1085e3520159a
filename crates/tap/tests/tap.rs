//! gkvm-tap against the real kernel: TAPs, multiqueue, bridges, and a QEMU
//! guest using a TAP handed over as a descriptor.

use gkvm_tap::{Error, TapBuilder, VnetHdr};
use gkvm_testkit::{require, Bridge, Need, Vm};
use std::path::Path;
use std::process::Command;

fn sys_net(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn kernel_chosen_name_appears_and_vanishes_on_drop() {
    if require("kernel_chosen_name", &[Need::Root]).is_none() {
        return;
    }
    let tap = TapBuilder::new().name_template("gkt%d").open().unwrap();
    let name = tap.name().to_owned();
    assert!(
        name.starts_with("gkt") && name[3..].parse::<u32>().is_ok(),
        "{name}"
    );
    assert!(sys_net(&name));
    assert_eq!(tap.fds().len(), 1);
    assert_ne!(tap.kernel_flags().unwrap() & gkvm_tap::IFF_TAP, 0);
    drop(tap);
    assert!(!sys_net(&name), "{name} still exists after drop");
}

#[test]
fn exact_name_and_name_in_use() {
    if require("exact_name", &[Need::Root]).is_none() {
        return;
    }
    let tap = TapBuilder::new().name("gktexact0").open().unwrap();
    assert_eq!(tap.name(), "gktexact0");
    assert!(sys_net("gktexact0"));
    // A second single-queue TAP of the same name is refused by the kernel.
    match TapBuilder::new().name("gktexact0").open() {
        Err(Error::NameInUse { name }) => assert_eq!(name, "gktexact0"),
        other => panic!("expected NameInUse, got {other:?}"),
    }
    // So is the name of an interface that is not a TAP.
    match TapBuilder::new().name("lo").open() {
        Err(Error::NameInUse { name }) => assert_eq!(name, "lo"),
        other => panic!("expected NameInUse for lo, got {other:?}"),
    }
}

#[test]
fn vnet_hdr_state_is_read_back() {
    if require("vnet_hdr", &[Need::Root]).is_none() {
        return;
    }
    let features = gkvm_tap::features().unwrap();
    assert_eq!(gkvm_tap::probe_vnet_hdr(), features.vnet_hdr());

    let off = TapBuilder::new().vnet_hdr(VnetHdr::Off).open().unwrap();
    assert!(!off.vnet_hdr());
    assert_eq!(off.kernel_flags().unwrap() & gkvm_tap::IFF_VNET_HDR, 0);

    let auto = TapBuilder::new().vnet_hdr(VnetHdr::Auto).open().unwrap();
    assert_eq!(auto.vnet_hdr(), features.vnet_hdr());
    assert_eq!(
        auto.kernel_flags().unwrap() & gkvm_tap::IFF_VNET_HDR != 0,
        features.vnet_hdr()
    );

    match TapBuilder::new().vnet_hdr(VnetHdr::Required).open() {
        Ok(t) => {
            assert!(features.vnet_hdr());
            assert_ne!(t.kernel_flags().unwrap() & gkvm_tap::IFF_VNET_HDR, 0);
        }
        Err(Error::VnetHdrUnsupported { .. }) => assert!(!features.vnet_hdr()),
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn four_queue_multiqueue() {
    if require("multiqueue", &[Need::Root]).is_none() {
        return;
    }
    let tap = TapBuilder::new()
        .name_template("gktmq%d")
        .queues(4)
        .open()
        .unwrap();
    assert_eq!(tap.fds().len(), 4);
    let flags = tap.kernel_flags().unwrap();
    assert_ne!(flags & gkvm_tap::IFF_MULTI_QUEUE, 0);
    let name = tap.name().to_owned();
    // Every queue belongs to the same interface; all must close before it goes.
    let mut fds = tap.into_fds();
    fds.truncate(1);
    assert!(sys_net(&name));
    drop(fds);
    assert!(!sys_net(&name));
}

#[test]
fn link_up_and_bridge_attach_detach() {
    if require("bridge", &[Need::Root]).is_none() {
        return;
    }
    let br = Bridge::new("gktbr0");
    let tap = TapBuilder::new().name_template("gktb%d").open().unwrap();
    tap.set_up().unwrap();
    let flags = std::fs::read_to_string(format!("/sys/class/net/{}/flags", tap.name())).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & 1, 0, "IFF_UP not set");

    tap.attach_to_bridge(&br.0).unwrap();
    let master = std::fs::read_link(format!("/sys/class/net/{}/master", tap.name())).unwrap();
    assert_eq!(master.file_name().unwrap(), "gktbr0");

    tap.detach_from_bridge(&br.0).unwrap();
    assert!(!Path::new(&format!("/sys/class/net/{}/master", tap.name())).exists());

    match tap.attach_to_bridge("gktnobr9") {
        Err(Error::BridgeNotFound { bridge, name }) => {
            assert_eq!(bridge, "gktnobr9");
            assert_eq!(name, tap.name());
        }
        other => panic!("expected BridgeNotFound, got {other:?}"),
    }
    match tap.attach_to_bridge("lo") {
        Err(Error::NotABridge { bridge, .. }) => assert_eq!(bridge, "lo"),
        other => panic!("expected NotABridge, got {other:?}"),
    }
}

#[test]
fn invalid_names_never_reach_the_kernel() {
    // A TUN device path that does not exist proves the kernel is not asked:
    // name validation must fail first, with InvalidName.
    let bad_exact = [
        "",
        "0123456789abcdef",
        "a/b",
        "a b",
        "a:b",
        ".",
        "..",
        "tab\t",
        "nl\n",
        "pct%d",
        "é",
    ];
    for name in bad_exact {
        match TapBuilder::new()
            .name(name)
            .tun_device("/nonexistent/tun")
            .open()
        {
            Err(Error::InvalidName { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name:?}: expected InvalidName, got {other:?}"),
        }
    }
    for tpl in ["gkvm", "gkvm%d%d", "gkvm%s", "%"] {
        match TapBuilder::new()
            .name_template(tpl)
            .tun_device("/nonexistent/tun")
            .open()
        {
            Err(Error::InvalidName { .. }) => {}
            other => panic!("{tpl:?}: expected InvalidName, got {other:?}"),
        }
    }
    match TapBuilder::new()
        .name("ok0")
        .tun_device("/nonexistent/tun")
        .open()
    {
        Err(Error::TunMissing { path }) => assert_eq!(path, "/nonexistent/tun"),
        other => panic!("expected TunMissing, got {other:?}"),
    }
}

#[test]
fn fd_passes_to_child_but_stays_cloexec_in_parent() {
    if require("pass_fd", &[Need::Root]).is_none() {
        return;
    }
    let tap = TapBuilder::new().open().unwrap();
    let mut cmd = Command::new("sh");
    let fds = tap.pass_to_child(&mut cmd);
    let fd = fds[0];
    cmd.args(["-c", &format!("readlink /proc/self/fd/{fd}")]);
    let out = cmd.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/dev/net/tun");
    // SAFETY: F_GETFD on a descriptor we own.
    let flags = unsafe { libc_fcntl_getfd(fd) };
    assert_ne!(flags & 1, 0, "FD_CLOEXEC cleared in the parent");
    // A child spawned without passing it does not see it.
    let out = Command::new("sh")
        .args(["-c", &format!("readlink /proc/self/fd/{fd} || echo closed")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "closed");
}

unsafe fn libc_fcntl_getfd(fd: i32) -> i32 {
    extern "C" {
        fn fcntl(fd: i32, cmd: i32, ...) -> i32;
    }
    // SAFETY: plain fcntl(F_GETFD).
    unsafe { fcntl(fd, 1) }
}

#[test]
fn qemu_guest_boots_with_a_tap_from_this_crate() {
    let Some(env) = require("qemu_guest_tap", &[Need::Root, Need::Guest]) else {
        return;
    };
    let tap = TapBuilder::new().name_template("gktq%d").open().unwrap();
    tap.set_up().unwrap();
    let started = std::time::Instant::now();
    let mut vm = Vm::spawn(&env, |cmd| {
        let fd = tap.pass_to_child(cmd)[0];
        cmd.args(["-netdev", &format!("tap,id=n0,fd={fd}")])
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]);
    });
    let seen = vm.wait_ready();
    eprintln!("guest ready after {:?}", started.elapsed());
    assert!(seen.contains("eth0 up 52:54:00:12:34:56"), "{seen}");
    // The guest's link came up on the TAP: the host side sees carrier.
    let carrier = std::fs::read_to_string(format!("/sys/class/net/{}/carrier", tap.name()));
    assert_eq!(carrier.unwrap().trim(), "1");
}
