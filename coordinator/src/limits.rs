//! Every bound on what a client, a worker or a stored record can make a
//! coordinator hold or do. Each input is checked against these where it
//! arrives, before anything is allocated for it or stored, and a breach is
//! an error naming the limit. docs/LIMITS.md lists them for users; keep the
//! two in step.

/// Largest spec file a client may submit. The text is stored whole in the
/// sweep's etcd record, and etcd refuses requests over 1.5 MiB.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// What a sweep spec may ask for (parameters, grid points, trials): checked
/// where the spec is parsed, in ringleader-spec.
pub use ringleader_spec::limits::{MAX_GRID_POINTS, MAX_PARAMS, MAX_TRIALS};

/// Default for `ringleader serve --max-trials-per-sweep`: what the leader
/// accepts unless its operator allows more (up to [`MAX_TRIALS`]).
pub const DEFAULT_MAX_TRIALS_PER_SWEEP: u64 = 100_000;

/// Default for `ringleader serve --max-running-sweeps`: sweeps and jobs
/// running or waiting at once; a submission beyond it is refused with
/// RESOURCE_EXHAUSTED until one finishes.
pub const DEFAULT_MAX_RUNNING_SWEEPS: usize = 1_000;

/// A worker's registration: id, host name and peer address.
pub const MAX_WORKER_ID_BYTES: usize = 128;
pub const MAX_HOST_BYTES: usize = 255;
pub const MAX_ADDRESS_BYTES: usize = 255;

/// Metrics in one epoch report, and the length of each name.
pub const MAX_METRICS_PER_EPOCH: usize = 64;
pub const MAX_METRIC_NAME_BYTES: usize = 64;

/// A worker's error text or checkpoint path longer than this is refused
/// (a path) or cut (an error message, marked as cut).
pub const MAX_ERROR_BYTES: usize = 4096;
pub const MAX_PATH_BYTES: usize = 4096;

pub use ringleader_client::limits::{
    MAX_LINEAGE_FILES, MAX_LINEAGE_PATHS_BYTES, MAX_LINEAGE_VERSION_BYTES, MAX_RESPONSE_BYTES,
};

/// A trial record's JSON stays below this: past it, the oldest epochs'
/// metrics are dropped from the record (the objective, rung results and
/// latest metrics are always kept). etcd refuses requests over 1.5 MiB.
pub const MAX_TRIAL_RECORD_BYTES: usize = 1 << 20;

/// Largest request any coordinator RPC decodes (a submission carries at
/// most [`MAX_SPEC_BYTES`] of spec).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// `GetSweep` pages: trials per page by default and at most, and the
/// bytes of trial records one page may carry (it always carries at least
/// one trial, so a page is at most this plus one record).
pub const DEFAULT_TRIALS_PER_PAGE: u32 = 1_000;
pub const MAX_TRIALS_PER_PAGE: u32 = 10_000;
pub const MAX_PAGE_BYTES: usize = 8 << 20;

/// Keys per etcd range request when the leader reads its state, and the
/// largest range response it accepts (a page of the largest records).
pub const ETCD_PAGE_KEYS: i64 = 64;
pub const ETCD_MAX_RESPONSE_BYTES: usize = 96 << 20;

/// Cuts `text` to at most `max` bytes on a character boundary, marking
/// the cut, so a message from a worker cannot grow a record without bound.
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(16);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [cut]", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_short_text_and_cuts_on_a_character_boundary() {
        assert_eq!(truncated("short", 10), "short");
        let long = "é".repeat(100);
        let cut = truncated(&long, 40);
        assert!(cut.len() <= 40, "{}", cut.len());
        assert!(cut.ends_with("… [cut]"));
    }
}
