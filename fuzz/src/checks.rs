//! What each fuzz target checks, shared by the targets in `fuzz_targets/`
//! (nightly, libFuzzer) and by the replay test
//! `tests/tests/fuzz_corpora.rs` (stable), which includes this file as a
//! module. The data set readers' checks are in `dataset.rs`: they link
//! libtorch, which that test binary cannot load. One function per target; each takes the raw input and panics
//! only when the code under test breaks a promise: a panic inside it, or a
//! property below that does not hold. Rejecting an input with an error is
//! always fine.
//!
//! Keep this file free of crate-level attributes and of anything that needs
//! libFuzzer: it is compiled as a plain module of the test crate too.

use std::fmt::Debug;

use ringleader_coordinator::sweep::driver::Driver;
use ringleader_coordinator::sweep::{SweepKind, SweepRecord, Template, TrialRecord};
use ringleader_coordinator::sweep_spec::SweepSpec;
use ringleader_spec::JobSpec;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A target's check: panics when the code under test breaks a promise.
pub type Check = fn(&[u8]);

/// Every target that does not link libtorch, by the name of its directory under `fuzz/corpus/` and
/// `fuzz/regressions/`, and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("job_spec", job_spec),
    ("sweep_spec", sweep_spec),
    ("records", records),
    ("ring_frame", ring_frame),
];

/// Targets whose checks link libtorch (the worker's data set readers): in
/// [`dataset.rs`](dataset.rs), replayed by a test binary that finds
/// libtorch (see docs/FUZZING.md).
pub const LIBTORCH_TARGETS: &[&str] = &[
    "dataset_idx",
    "dataset_csv",
    "dataset_npy",
    "dataset_safetensors",
];

/// The file name errors quote; any name will do.
const ORIGIN: &str = "fuzz.toml";

/// Trials of an accepted sweep that are turned into jobs, as the leader
/// does when it starts them.
const TRIALS_TRIED: usize = 3;

/// `JobSpec::parse` on the input as text (invalid UTF-8 replaced). An error
/// must render (errors point at line and column); an accepted job must give
/// the leader a driver for its one trial.
pub fn job_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match JobSpec::parse(&text, ORIGIN) {
        Ok(_) => {
            let template = Template::parse(SweepKind::Job, &text, ORIGIN)
                .expect("Template::parse(Job) rejects a spec JobSpec::parse accepts");
            drive(&template);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// `SweepSpec::parse` on the input as text (invalid UTF-8 replaced). An
/// accepted sweep must survive what the leader does with it next: store it
/// (its JSON form parses back to the same sweep), turn it into a driver
/// (`Template::driver_config`, `Driver::new`) and make the first trials'
/// jobs.
pub fn sweep_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let spec = match SweepSpec::parse(&text, ORIGIN) {
        Ok(spec) => spec,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let stored = serde_json::to_vec(&spec).expect("an accepted sweep serialises");
    let again: SweepSpec = serde_json::from_slice(&stored).unwrap_or_else(|e| {
        panic!("a stored sweep does not load again: {e}");
    });
    assert_eq!(
        format!("{spec:?}"),
        format!("{again:?}"),
        "a stored sweep loads as a different sweep"
    );
    let template = Template::parse(SweepKind::Sweep, &text, ORIGIN)
        .expect("Template::parse(Sweep) rejects a spec SweepSpec::parse accepts");
    drive(&template);
}

/// What the leader does with an accepted template: a driver, and the jobs
/// of the first few trials it proposes.
fn drive(template: &Template) {
    let config = template.driver_config("fuzz");
    let Ok(mut driver) = Driver::new(config) else {
        return;
    };
    for _ in 0..TRIALS_TRIED {
        let Some(work) = driver.next_work() else {
            break;
        };
        let trial = driver
            .trial(work.trial)
            .expect("next_work names a trial the driver holds");
        if let Err(e) = template.job(&trial.config) {
            // The spec was checked at every end of every domain, so a
            // trial's job should be valid; an error is still an answer,
            // not a crash, so it is only rendered.
            let _ = e.to_string();
        }
    }
}

/// The etcd record decoders: the input as a `SweepRecord` and as a
/// `TrialRecord`. Whatever decodes must round-trip: encode, decode, encode
/// again gives the same bytes. A decoded trial is then given non-finite
/// numbers (what a diverging trial reports) and must round-trip too.
pub fn records(data: &[u8]) {
    if let Ok(record) = serde_json::from_slice::<SweepRecord>(data) {
        round_trip(&record);
    }
    if let Ok(mut record) = serde_json::from_slice::<TrialRecord>(data) {
        round_trip(&record);
        if record.objective.is_some() {
            record.objective = Some(f64::NAN);
        }
        if let Some(first) = record.rung_results.first_mut() {
            *first = f64::INFINITY;
        }
        for epoch in &mut record.metrics {
            if let Some(value) = epoch.metrics.values_mut().next() {
                *value = f64::NEG_INFINITY;
            }
        }
        round_trip(&record);
    }
}

fn round_trip<T: Serialize + DeserializeOwned + Debug>(record: &T) {
    let bytes = serde_json::to_vec(record)
        .unwrap_or_else(|e| panic!("a record does not encode: {e}: {record:?}"));
    let again: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "an encoded record does not decode: {e}: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    let bytes_again = serde_json::to_vec(&again).expect("a decoded record encodes");
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        String::from_utf8_lossy(&bytes_again),
        "a record changes in a round trip"
    );
}

/// A ring frame as it arrives from a peer, validated against the fixed
/// expectation `ringleader_collective::frame::FUZZ_CHECK`: any bytes get an
/// answer, never a panic.
pub fn ring_frame(data: &[u8]) {
    if let Err(e) = ringleader_collective::validate_frame_bytes(data) {
        let _ = e.to_string();
    }
}
