//! Ringleader's fuzz checks (see docs/FUZZING.md). Each module is also
//! included, as plain source, by a stable replay test, so none of them may
//! use libFuzzer or crate-level attributes.

pub mod checks;
pub mod dataset;
pub mod replay;

pub use checks::{credentials, job_spec, records, ring_frame, sweep_spec};
pub use dataset::{dataset_csv, dataset_idx, dataset_npy, dataset_safetensors};
