//! Bounds a sweep spec is checked against where it is parsed. The
//! coordinator re-exports them beside its own limits
//! (coordinator/src/limits.rs); docs/LIMITS.md lists them for users.

/// Search parameters in one sweep.
pub const MAX_PARAMS: usize = 64;

/// `grid_points` for each continuous parameter of a grid sweep.
pub const MAX_GRID_POINTS: u32 = 10_000;

/// Trials one sweep may ever start (its `max_trials`, or its grid's size
/// when that is the default). Trial keys have six digits.
pub const MAX_TRIALS: u64 = 999_999;
