//! Both clients against real QEMU: the test guest under TCG for what needs a
//! guest OS (balloon, power button), a guest-less KVM VM for the rest.

use gkvm_qmp::commands::{self, RunState};
use gkvm_qmp::{blocking, Options, Qmp, TypedEvent};
use gkvm_testkit::{require, Need, Vm};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn async_client_drives_a_real_guest() {
    let Some(env) = require("qmp_async_real_guest", &[Need::Root, Need::Guest]) else {
        return;
    };
    let mut vm = Vm::spawn(&env, |_| {});
    vm.wait_ready();
    rt().block_on(async {
        let q = Qmp::connect(&vm.qmp, Options::default()).await.unwrap();
        let v = q.run(&commands::QueryVersion).await.unwrap();
        assert_eq!(v, q.greeting().version);
        assert!(v.qemu.major >= 7);

        let s = q.run(&commands::QueryStatus).await.unwrap();
        assert_eq!(s.status, RunState::Running);

        // stop / cont, with their events.
        q.run(&commands::Stop).await.unwrap();
        let ev = q
            .wait_for_event(Duration::from_secs(5), |e| e.typed() == TypedEvent::Stop)
            .await
            .unwrap();
        assert!(ev.is_some(), "no STOP event");
        assert_eq!(
            q.run(&commands::QueryStatus).await.unwrap().status,
            RunState::Paused
        );
        q.run(&commands::Cont).await.unwrap();
        let ev = q
            .wait_for_event(Duration::from_secs(5), |e| e.typed() == TypedEvent::Resume)
            .await
            .unwrap();
        assert!(ev.is_some(), "no RESUME event");

        // Balloon 128 -> 96 MiB: the guest driver gives the memory back.
        assert_eq!(
            q.run(&commands::QueryBalloon).await.unwrap().actual,
            128 << 20
        );
        q.run(&commands::Balloon { value: 96 << 20 }).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let actual = q.run(&commands::QueryBalloon).await.unwrap().actual;
            if actual == 96 << 20 {
                break;
            }
            assert!(Instant::now() < deadline, "balloon stuck at {actual}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A TAP descriptor passed with getfd becomes a netdev.
        let tap = gkvm_tap::TapBuilder::new()
            .name_template("gkq%d")
            .open()
            .unwrap();
        q.run_with_fds(
            &commands::GetFd {
                fdname: "tapfd0".into(),
            },
            &[tap.fds()[0].as_fd()],
        )
        .await
        .unwrap();
        let mut props = serde_json::Map::new();
        props.insert("fd".into(), "tapfd0".into());
        q.run(&commands::NetdevAdd {
            kind: "tap".into(),
            id: "hotnet0".into(),
            props,
        })
        .await
        .unwrap();
        let mut props = serde_json::Map::new();
        props.insert("netdev".into(), "hotnet0".into());
        q.run(&commands::DeviceAdd {
            driver: "virtio-net-pci".into(),
            id: "hotnic0".into(),
            props,
        })
        .await
        .unwrap();
        let tree = q
            .execute_raw(
                "qom-list",
                Some(serde_json::json!({"path": "/machine/peripheral"})),
            )
            .await
            .unwrap();
        assert!(tree.to_string().contains("hotnic0"), "{tree}");
        // An unknown command keeps QMP's class.
        let err = q.execute_raw("no-such-command", None).await.unwrap_err();
        assert_eq!(err.qmp_class(), Some("CommandNotFound"));

        // The ACPI power button: the guest powers off, SHUTDOWN arrives.
        q.run(&commands::SystemPowerdown).await.unwrap();
        let ev = q
            .wait_for_event(Duration::from_secs(30), |e| {
                matches!(e.typed(), TypedEvent::Shutdown { .. })
            })
            .await
            .unwrap()
            .expect("no SHUTDOWN event");
        assert_eq!(
            ev.typed(),
            TypedEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
    });
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn blocking_client_on_a_guestless_vm() {
    let Some(env) = require("qmp_blocking_real", &[Need::Qemu]) else {
        return;
    };
    let mut vm = Vm::spawn(&env, |_| {});
    let mut q = blocking::Qmp::connect(&vm.qmp, Options::default()).unwrap();
    assert_eq!(
        q.run(&commands::QueryStatus).unwrap().status,
        RunState::Prelaunch
    );
    let kvm = q.run(&commands::QueryKvm).unwrap();
    assert_eq!(kvm.enabled, gkvm_testkit::guestless_accel() == "kvm");

    let machines = q.run(&commands::QueryMachines).unwrap();
    assert!(machines.iter().any(|m| m.alias.as_deref() == Some("pc")));
    let cmds = q.run(&commands::QueryCommands).unwrap();
    for needed in [
        "migrate",
        "migrate-incoming",
        "set_password",
        "query-cpus-fast",
    ] {
        assert!(cmds.iter().any(|c| c.name == needed), "{needed} missing");
    }
    let cpus = q.run(&commands::QueryCpusFast).unwrap();
    assert_eq!(cpus.len(), 1);
    assert!(cpus[0].thread_id > 0);
    let types = q
        .run(&commands::QomListTypes {
            implements: Some("virtio-device".into()),
            include_abstract: None,
        })
        .unwrap();
    assert!(types.iter().any(|t| t.name == "virtio-net-device"));
    let opts = q
        .run(&commands::QueryCommandLineOptions {
            option: Some("machine".into()),
        })
        .unwrap();
    assert_eq!(opts[0].option, "machine");

    q.run(&commands::MigrateSetParameters {
        downtime_limit: Some(30),
        max_bandwidth: Some(32 << 20),
        ..Default::default()
    })
    .unwrap();
    let p = q.run(&commands::QueryMigrateParameters).unwrap();
    assert_eq!(p.downtime_limit, Some(30));
    assert_eq!(p.max_bandwidth, Some(32 << 20));
    assert_eq!(q.run(&commands::QueryMigrate).unwrap().status, None);

    q.run(&commands::Cont).unwrap();
    let ev = q
        .wait_for_event(Duration::from_secs(5), |e| e.typed() == TypedEvent::Resume)
        .unwrap();
    assert!(ev.is_some());
    q.run(&commands::Stop).unwrap();
    assert!(q
        .wait_for_event(Duration::from_secs(5), |e| e.typed() == TypedEvent::Stop)
        .unwrap()
        .is_some());

    // add-fd with a real descriptor.
    let f = std::fs::File::open("/dev/null").unwrap();
    let info = q
        .run_with_fds(&commands::AddFd::default(), &[f.as_fd()])
        .unwrap();
    assert!(info.fd >= 0);

    q.run(&commands::Quit).unwrap();
    let ev = q
        .wait_for_event(Duration::from_secs(5), |e| {
            matches!(e.typed(), TypedEvent::Shutdown { .. })
        })
        .unwrap();
    if let Some(ev) = ev {
        assert_eq!(
            ev.typed(),
            TypedEvent::Shutdown {
                guest: false,
                reason: "host-qmp-quit".into()
            }
        );
    }
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    // After QEMU is gone the client reports the connection closed.
    assert!(q.run(&commands::QueryStatus).unwrap_err().is_fatal());
}
