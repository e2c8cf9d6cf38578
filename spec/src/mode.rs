//! Which way an objective improves: the one answer to "is this better"
//! for searchers, schedulers, early stopping and leaderboards.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// `max` or `min`, as specs and records write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Max,
    Min,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Max => "max",
            Mode::Min => "min",
        }
    }

    /// The worst possible objective: what a diverged trial scores.
    pub fn worst(self) -> f64 {
        match self {
            Mode::Max => f64::NEG_INFINITY,
            Mode::Min => f64::INFINITY,
        }
    }

    /// The value searchers rank an objective by: a NaN or infinite one
    /// (training diverged) counts as the worst, never as the best.
    pub fn ranked(self, objective: f64) -> f64 {
        if objective.is_finite() {
            objective
        } else {
            self.worst()
        }
    }

    /// Orders `a` before `b` when `a` is better (sorting with it puts the
    /// best first).
    pub fn best_first(self, a: f64, b: f64) -> Ordering {
        let order = a.total_cmp(&b);
        match self {
            Mode::Max => order.reverse(),
            Mode::Min => order,
        }
    }

    /// Whether `value` beats `best` by more than `min_delta`.
    pub fn improves(self, value: f64, best: f64, min_delta: f64) -> bool {
        match self {
            Mode::Max => value > best + min_delta,
            Mode::Min => value < best - min_delta,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_first_sorts_each_way_and_worst_is_last() {
        let mut values = [0.5, f64::NAN, 0.9, 0.1];
        for mode in [Mode::Max, Mode::Min] {
            values.sort_by(|a, b| mode.best_first(mode.ranked(*a), mode.ranked(*b)));
            let expected = match mode {
                Mode::Max => [0.9, 0.5, 0.1],
                Mode::Min => [0.1, 0.5, 0.9],
            };
            assert_eq!(values[..3], expected, "{mode}");
            assert!(values[3].is_nan(), "{mode}: a diverged value ranks last");
        }
    }

    #[test]
    fn improvement_needs_more_than_min_delta() {
        assert!(Mode::Min.improves(0.5, 0.6, 0.05));
        assert!(!Mode::Min.improves(0.58, 0.6, 0.05));
        assert!(Mode::Max.improves(0.7, 0.6, 0.05));
        assert!(!Mode::Max.improves(0.6, 0.6, 0.0));
        let modes: Vec<Mode> = serde_json::from_str(r#"["max","min"]"#).unwrap();
        assert_eq!(modes, [Mode::Max, Mode::Min]);
    }
}
