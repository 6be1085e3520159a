//! A QEMU guest on a TAP created and handed over by gkvm-tap.

use gkvm_tap::TapBuilder;
use gkvm_testkit::{require, Need, Vm};

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
