//! gkvm's end-to-end tests live in `tests/`: the crates together against
//! real QEMU 7.2 and 10.0, real TAPs, bridges and network namespaces.
//! They are kept out of the published crates so that each of those tests
//! on its own; run them with `cargo test -p gkvm-e2e` (as root, after
//! `scripts/install-deps` and `scripts/build-test-guest`).
