//! gkvm-tap against the real kernel: TAPs, multiqueue, bridges (a QEMU
//! guest on a TAP from this crate is in the unpublished `gkvm-e2e` crate).
//! Needs root; without it each test says why it skips, unless
//! `GKVM_REQUIRE_E2E=1`, where a skip is a failure.

use gkvm_tap::{Error, TapBuilder, VnetHdr};
use std::path::Path;
use std::process::Command;

/// Whether the test can run (root); a skip fails under GKVM_REQUIRE_E2E=1.
fn root(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("GKVM_REQUIRE_E2E").as_deref() != Ok("1"),
        "{test}: needs root and GKVM_REQUIRE_E2E=1 forbids skipping"
    );
    eprintln!("SKIP {test}: needs root");
    false
}

/// A Linux bridge made with `ip` for a test, deleted on drop.
struct Bridge(String);

impl Bridge {
    fn new(name: &str) -> Bridge {
        let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap();
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        assert!(ip(&["link", "add", "name", name, "type", "bridge"]).success());
        assert!(ip(&["link", "set", name, "up"]).success());
        Bridge(name.to_owned())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

fn sys_net(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn kernel_chosen_name_appears_and_vanishes_on_drop() {
    if !root("kernel_chosen_name") {
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
    if !root("exact_name") {
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
    if !root("vnet_hdr") {
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
    if !root("multiqueue") {
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
    if !root("bridge") {
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
    if !root("pass_fd") {
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
