//! Replays the fuzz corpora on stable: every file under
//! `fuzz/seeds/<target>/`, `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the same check the fuzz target
//! runs (`fuzz/src/checks.rs`, included here as a module), so an input that
//! once crashed a parser stays a test after it is fixed, and
//! `scripts/test.sh` needs no nightly toolchain. See docs/FUZZING.md.
//!
//! The data set readers' targets (`fuzz/src/dataset.rs`) link libtorch,
//! which this test binary cannot load (it has no rpath to it); they are
//! replayed by a test of a crate that does (see docs/FUZZING.md).

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/checks.rs"]
mod checks;
#[path = "../../fuzz/src/replay.rs"]
#[allow(dead_code)]
mod replay;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

#[test]
fn every_fuzz_input_replays() {
    replay::replay(&fuzz_dir(), checks::TARGETS);
}

#[test]
fn every_fuzz_target_has_a_check() {
    // A target added under fuzz/fuzz_targets/ must be in checks::TARGETS
    // (replayed here) or checks::LIBTORCH_TARGETS (replayed with libtorch).
    let names = replay::target_names(&fuzz_dir());
    for name in &names {
        assert!(
            checks::TARGETS.iter().any(|(t, _)| t == name)
                || checks::LIBTORCH_TARGETS.contains(&name.as_str()),
            "fuzz target {name} is in neither checks::TARGETS nor checks::LIBTORCH_TARGETS"
        );
    }
    assert_eq!(
        names.len(),
        checks::TARGETS.len() + checks::LIBTORCH_TARGETS.len(),
        "{names:?}"
    );
}
