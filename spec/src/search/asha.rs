//! ASHA: asynchronous successive halving (Li et al., "A System for
//! Massively Parallel Hyperparameter Tuning", MLSys 2020), promotion form.
//!
//! ```text
//!  rung 2 (r = 9)  ▲ promote the best 1/η of rung 1 not yet promoted
//!  rung 1 (r = 3)  ▲ promote the best 1/η of rung 0 not yet promoted
//!  rung 0 (r = 1)  ◀ every new trial starts here
//! ```
//!
//! A trial that finishes rung k's resource reports its metric and pauses.
//! Whenever a worker frees up, [`Asha::next_promotion`] looks from the top
//! rung down for a paused trial in the top ⌊n_k/η⌋ of its rung (n_k = results
//! so far) and promotes it; if there is none, the driver starts a new trial.
//! No rung ever waits for a full cohort. Trials still paused when the sweep
//! ends were not good enough: they are stopped.

use std::collections::BTreeSet;

pub use crate::Mode;

/// A paused trial that should continue to `resource` (rung `rung`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promotion {
    pub trial: u64,
    pub rung: usize,
    pub resource: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AshaError {
    #[error("reduction factor eta must be at least 2, got {0}")]
    BadEta(u32),
    #[error("resources must satisfy 1 <= min_resource ({min}) <= max_resource ({max})")]
    BadResources { min: u32, max: u32 },
    #[error("trial {trial}: no rung {rung} (there are {rungs})")]
    NoSuchRung {
        trial: u64,
        rung: usize,
        rungs: usize,
    },
    #[error("trial {trial}: metric {metric} at rung {rung} is not a number")]
    BadMetric {
        trial: u64,
        rung: usize,
        metric: f64,
    },
    #[error("trial {trial} already reported at rung {rung}")]
    Duplicate { trial: u64, rung: usize },
}

#[derive(Debug, Default)]
struct Rung {
    resource: u32,
    /// (metric, trial) in report order.
    results: Vec<(f64, u64)>,
    promoted: BTreeSet<u64>,
}

/// ASHA's decisions for one sweep (or one Hyperband bracket).
#[derive(Debug)]
pub struct Asha {
    eta: u32,
    mode: Mode,
    rungs: Vec<Rung>,
}

impl Asha {
    /// Rungs at `min·η^k` below `max`, then `max` itself.
    pub fn new(
        eta: u32,
        min_resource: u32,
        max_resource: u32,
        mode: Mode,
    ) -> Result<Self, AshaError> {
        if eta < 2 {
            return Err(AshaError::BadEta(eta));
        }
        if min_resource == 0 || min_resource > max_resource {
            return Err(AshaError::BadResources {
                min: min_resource,
                max: max_resource,
            });
        }
        let mut resources = Vec::new();
        let mut r = u64::from(min_resource);
        while r < u64::from(max_resource) {
            resources.push(r as u32);
            r *= u64::from(eta);
        }
        resources.push(max_resource);
        let rungs = resources
            .into_iter()
            .map(|resource| Rung {
                resource,
                ..Rung::default()
            })
            .collect();
        Ok(Self { eta, mode, rungs })
    }

    /// Resource (e.g. epochs) at each rung, bottom first.
    pub fn resources(&self) -> Vec<u32> {
        self.rungs.iter().map(|r| r.resource).collect()
    }

    /// Records `trial`'s `metric` at the end of rung `rung`. Returns `true`
    /// when that was the top rung (the trial is complete), `false` when the
    /// trial now waits for a promotion.
    pub fn record(&mut self, trial: u64, rung: usize, metric: f64) -> Result<bool, AshaError> {
        let rungs = self.rungs.len();
        let Some(level) = self.rungs.get_mut(rung) else {
            return Err(AshaError::NoSuchRung { trial, rung, rungs });
        };
        if metric.is_nan() {
            return Err(AshaError::BadMetric {
                trial,
                rung,
                metric,
            });
        }
        if level.results.iter().any(|(_, t)| *t == trial) {
            return Err(AshaError::Duplicate { trial, rung });
        }
        level.results.push((metric, trial));
        Ok(rung + 1 == rungs)
    }

    /// The next paused trial to continue, highest rung first, marked as
    /// promoted; `None` means: start a new trial (or, with no budget left,
    /// stop the paused ones).
    pub fn next_promotion(&mut self) -> Option<Promotion> {
        let eta = self.eta as usize;
        let mode = self.mode;
        for k in (0..self.rungs.len().saturating_sub(1)).rev() {
            let next_resource = self.rungs[k + 1].resource;
            let rung = &mut self.rungs[k];
            let mut ranked = rung.results.clone();
            ranked.sort_by(|a, b| mode.best_first(a.0, b.0).then(a.1.cmp(&b.1)));
            let quota = ranked.len() / eta;
            if let Some(&(_, trial)) = ranked
                .iter()
                .take(quota)
                .find(|(_, t)| !rung.promoted.contains(t))
            {
                rung.promoted.insert(trial);
                return Some(Promotion {
                    trial,
                    rung: k + 1,
                    resource: next_resource,
                });
            }
        }
        None
    }

    /// Restores a promotion out of `rung` decided before a failover.
    pub fn mark_promoted(&mut self, trial: u64, rung: usize) {
        if let Some(level) = self.rungs.get_mut(rung) {
            level.promoted.insert(trial);
        }
    }

    /// Trials waiting at some rung below the top without a promotion: the
    /// ones to stop when the sweep has no budget left.
    pub fn paused(&self) -> BTreeSet<u64> {
        let top = self.rungs.len() - 1;
        let mut paused = BTreeSet::new();
        for (k, rung) in self.rungs.iter().enumerate().take(top) {
            for (_, trial) in &rung.results {
                let moved_on = rung.promoted.contains(trial)
                    || self.rungs[k + 1..]
                        .iter()
                        .any(|r| r.results.iter().any(|(_, t)| t == trial));
                if !moved_on {
                    paused.insert(*trial);
                }
            }
        }
        paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_grow_by_eta_up_to_the_maximum() {
        assert_eq!(
            Asha::new(3, 1, 9, Mode::Max).unwrap().resources(),
            [1, 3, 9]
        );
        assert_eq!(
            Asha::new(3, 1, 10, Mode::Max).unwrap().resources(),
            [1, 3, 9, 10]
        );
        assert_eq!(Asha::new(2, 4, 4, Mode::Max).unwrap().resources(), [4]);
        assert_eq!(
            Asha::new(1, 1, 9, Mode::Max).unwrap_err(),
            AshaError::BadEta(1)
        );
        assert!(Asha::new(3, 5, 2, Mode::Max).is_err());
    }

    /// Hand-worked: η = 3, rungs [1, 3, 9], maximising.
    #[test]
    fn promotes_the_top_third_of_each_rung_as_results_arrive() {
        let mut asha = Asha::new(3, 1, 9, Mode::Max).unwrap();
        asha.record(1, 0, 0.1).unwrap();
        asha.record(2, 0, 0.2).unwrap();
        // ⌊2/3⌋ = 0: nothing is promotable yet; start a new trial.
        assert_eq!(asha.next_promotion(), None);
        asha.record(3, 0, 0.3).unwrap();
        // ⌊3/3⌋ = 1: the best of {0.1, 0.2, 0.3} goes on to 3 epochs.
        assert_eq!(
            asha.next_promotion(),
            Some(Promotion {
                trial: 3,
                rung: 1,
                resource: 3
            })
        );
        assert_eq!(asha.next_promotion(), None);
        asha.record(4, 0, 0.05).unwrap();
        assert_eq!(asha.next_promotion(), None); // top 1 of 4 is trial 3, taken
        asha.record(5, 0, 0.6).unwrap();
        asha.record(6, 0, 0.4).unwrap();
        // ⌊6/3⌋ = 2: top two are 5 (0.6) and 6 (0.4).
        assert_eq!(asha.next_promotion().map(|p| p.trial), Some(5));
        assert_eq!(asha.next_promotion().map(|p| p.trial), Some(6));
        assert_eq!(asha.next_promotion(), None);
        // Rung 1 fills: 3 → 0.5, 5 → 0.9, 6 → 0.7; the best reaches 9 epochs,
        // and higher rungs are served first.
        assert!(!asha.record(3, 1, 0.5).unwrap());
        assert!(!asha.record(5, 1, 0.9).unwrap());
        assert!(!asha.record(6, 1, 0.7).unwrap());
        assert_eq!(
            asha.next_promotion(),
            Some(Promotion {
                trial: 5,
                rung: 2,
                resource: 9
            })
        );
        assert!(
            asha.record(5, 2, 0.95).unwrap(),
            "top rung completes the trial"
        );
        // Stopped at the end: everyone who reported but never moved on.
        assert_eq!(asha.paused(), BTreeSet::from([1, 2, 3, 4, 6]));
    }

    #[test]
    fn minimising_promotes_the_lowest_and_bad_reports_are_refused() {
        let mut asha = Asha::new(2, 1, 4, Mode::Min).unwrap();
        asha.record(1, 0, 3.0).unwrap();
        asha.record(2, 0, 1.0).unwrap();
        assert_eq!(asha.next_promotion().map(|p| p.trial), Some(2));
        assert_eq!(
            asha.record(1, 0, 2.0),
            Err(AshaError::Duplicate { trial: 1, rung: 0 })
        );
        assert!(matches!(
            asha.record(7, 5, 1.0),
            Err(AshaError::NoSuchRung { .. })
        ));
        assert!(matches!(
            asha.record(7, 0, f64::NAN),
            Err(AshaError::BadMetric { .. })
        ));
    }
}
