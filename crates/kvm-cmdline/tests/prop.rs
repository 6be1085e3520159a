//! Property tests: user strings can never split a QEMU option, and any
//! parameters that pass the syntax check build or fail cleanly.

use kvm_cmdline::{build, BuildEnv, Capabilities, DiskSpec, HvParams, InstanceSpec};
use proptest::prelude::*;
use std::path::Path;

fn caps() -> Capabilities {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qemu-10.0");
    let r = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    Capabilities::from_help(&r("help.txt"), &r("machine.txt"), &r("device.txt")).unwrap()
}

/// Splits a QEMU `key=value,...` option the way QEMU does (`,,` is a comma).
fn qemu_split(opt: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = opt.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn paths_never_split_an_option(tail in "\\PC{0,40}", tail2 in "[ -~]{0,30}") {
        let caps = caps();
        let path = format!("/srv/{tail}");
        let iso = format!("/iso/{tail2}");
        let mut spec = InstanceSpec::new("p1", 64);
        spec.disks.push(DiskSpec::new(path.clone()));
        let cd_set = spec.hvparams.set("cdrom_image_path", serde_json::Value::String(iso.clone()));
        match build(&spec, &caps, &BuildEnv::default()) {
            Err(_) => prop_assert!(path.chars().any(char::is_control) || iso.chars().any(char::is_control)),
            Ok(cmd) => {
                let drives: Vec<&String> = cmd.argv.windows(2).filter(|w| w[0] == "-drive").map(|w| &w[1]).collect();
                let disk = qemu_split(drives[0]);
                prop_assert_eq!(&disk[0], &format!("file={path}"));
                prop_assert!(disk[1..].iter().all(|p| p.contains('=')));
                if cd_set.is_ok() {
                    let cd = qemu_split(drives[1]);
                    prop_assert_eq!(&cd[0], &format!("file={iso}"));
                }
                // No argument carries a newline or NUL.
                prop_assert!(cmd.argv.iter().all(|a| !a.contains('\n') && !a.contains('\0')));
            }
        }
    }

    #[test]
    fn arbitrary_names_are_rejected_or_safe(name in "\\PC{0,20}") {
        let spec = InstanceSpec::new(name.clone(), 64);
        match build(&spec, &caps(), &BuildEnv::default()) {
            Ok(cmd) => {
                prop_assert!(!name.starts_with('-') && !name.contains(',') && !name.contains('/'));
                prop_assert_eq!(&cmd.argv[2], &name);
            }
            Err(e) => prop_assert!(e.to_string().contains("name"), "{}", e),
        }
    }

    #[test]
    fn syntax_checked_params_build_or_error(
        pairs in proptest::collection::vec(
            (proptest::sample::select(HvParams::keys()), "[a-z0-9/.:,=-]{0,12}"), 0..12),
        vcpus in 1u32..6,
    ) {
        let mut hv = HvParams::default();
        for (k, v) in &pairs {
            let _ = hv.set(k, serde_json::Value::String(v.clone()));
        }
        let mut spec = InstanceSpec::new("pp", 128);
        spec.vcpus = vcpus;
        spec.network_port = Some(5999);
        spec.hvparams = hv;
        if spec.hvparams.check_syntax().is_ok() {
            // Must not panic; an error is fine (unsupported, bad machine...).
            let _ = build(&spec, &caps(), &BuildEnv::default());
        }
    }
}
