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

#[test]
fn a_busy_qmp_socket_is_waited_for_not_failed() {
    let Some(env) = require("qmp_busy_socket", &[Need::Qemu]) else {
        return;
    };
    let vm = Vm::spawn(&env, |_| {});
    // QEMU serves one client per QMP socket and queues a few more (its
    // backlog of 1 lets the kernel queue two): a connect beyond that fails
    // at once with EAGAIN. Both clients wait instead, and get the socket
    // when the others let go.
    let busy = |qmp: &std::path::Path| -> Vec<std::os::unix::net::UnixStream> {
        let mut v = Vec::new();
        while let Ok(s) = crate::nonblocking_connect(qmp) {
            v.push(s);
        }
        assert!(!v.is_empty());
        v
    };
    let others = busy(&vm.qmp);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(others);
    });
    let options = Options {
        connect_timeout: Duration::from_secs(5),
        ..Options::default()
    };
    let t = Instant::now();
    let mut q = blocking::Qmp::connect(&vm.qmp, options).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    q.run(&commands::QueryStatus).unwrap();
    release.join().unwrap();

    // The async client too.
    drop(q);
    std::thread::sleep(Duration::from_millis(50));
    let others = busy(&vm.qmp);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(others);
    });
    rt().block_on(async {
        let q = Qmp::connect(&vm.qmp, options).await.unwrap();
        q.run(&commands::QueryStatus).await.unwrap();
    });
    release.join().unwrap();

    // Busy past the timeout: a clear timeout, not a hang.
    std::thread::sleep(Duration::from_millis(50));
    let _others = busy(&vm.qmp);
    let short = Options {
        connect_timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let t = Instant::now();
    let e = blocking::Qmp::connect(&vm.qmp, short).err().unwrap();
    // Still queued for the connect ("busy"), or queued and then waiting
    // for the greeting when QEMU let a queued client in meanwhile: either
    // way a timeout, soon.
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// A non-blocking connect: fails with EAGAIN when the backlog is full.
fn nonblocking_connect(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    // SAFETY: socket(2), connect(2) on a zeroed, filled sockaddr_un; the
    // fd is owned by the returned stream.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0);
        let stream = std::os::unix::net::UnixStream::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap();
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = libc::c_char::from_ne_bytes([*s]);
        }
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap();
        if libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) == 0 {
            Ok(stream)
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}
