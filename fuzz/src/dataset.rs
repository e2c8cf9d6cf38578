//! The data set readers' fuzz checks: `ringleader_worker::train::dataset::decode`
//! on a file's bytes. Apart from `checks.rs` because they link libtorch:
//! a test binary that replays them must find libtorch at run time (the
//! worker's own test binaries do, through worker/build.rs's rpath).
//!
//! Keep this file free of crate-level attributes and of anything that needs
//! libFuzzer: a stable test can include it as a module.

use ringleader_spec::job::DatasetFormat;
use ringleader_worker::train::dataset;

/// A target's check: panics when the code under test breaks a promise.
pub type Check = fn(&[u8]);

/// The data set targets, by the name of their directories under
/// `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("dataset_idx", dataset_idx),
    ("dataset_csv", dataset_csv),
    ("dataset_npy", dataset_npy),
    ("dataset_safetensors", dataset_safetensors),
];

/// A data set reader on a file's bytes (gzip or not), as a worker reads
/// what a job names: `ringleader_worker::train::dataset::decode`. Any bytes
/// get an answer, never a panic; an error renders.
fn decode(format: DatasetFormat, data: &[u8]) {
    if let Err(e) = dataset::decode(format, data) {
        let _ = e.to_string();
    }
}

pub fn dataset_idx(data: &[u8]) {
    decode(DatasetFormat::Idx, data)
}

pub fn dataset_csv(data: &[u8]) {
    decode(DatasetFormat::Csv, data)
}

pub fn dataset_npy(data: &[u8]) {
    decode(DatasetFormat::Npy, data)
}

pub fn dataset_safetensors(data: &[u8]) {
    decode(DatasetFormat::Safetensors, data)
}
