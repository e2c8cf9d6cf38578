//! Early stopping on a plateau: the job's `early_stopping` table and the
//! pure decision a worker takes after every epoch.
//!
//! ```text
//!  epoch's metrics ──EarlyStopping::observe(&mut Plateau)──▶ None (go on)
//!                                                        └─▶ Some(EarlyStop)
//!  Plateau { best, best_epoch, stale_epochs } travels in the checkpoint's
//!  sidecar, so a resumed trial stops at the same epoch as an uninterrupted one.
//! ```
//!
//! An epoch improves on the best value when it beats it by more than
//! `min_delta` (`value < best − min_delta` for `min`, `value > best +
//! min_delta` for `max`), as Keras' and Lightning's `EarlyStopping` do.
//! After `patience` epochs in a row without an improvement, training stops.
//! A NaN value never improves; an epoch that does not report the metric at
//! all leaves the count as it was.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::Mode;

/// `early_stopping = { metric = "val_loss", mode = "min", patience = 3,
/// min_delta = 0.001 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// A metric the job reports every epoch.
    pub metric: String,
    /// Whether smaller (`min`) or larger (`max`) values are better.
    pub mode: Mode,
    /// Epochs in a row without an improvement before training stops.
    pub patience: u32,
    /// How much a value must beat the best so far to count as better.
    #[serde(default)]
    pub min_delta: f64,
}

/// Where a trial stands on its plateau: what the next epoch must beat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plateau {
    /// The best value so far; `None` before the first finite one.
    pub best: Option<f64>,
    /// The epoch that reported `best`.
    pub best_epoch: u32,
    /// Epochs in a row since then that did not improve on it.
    pub stale_epochs: u32,
}

/// Why training stopped early. Displays as `early stopped at epoch 7:
/// val_loss did not improve by 0.001 for 3 epochs (best 0.2134 at epoch 4)`.
#[derive(Clone, Debug, PartialEq)]
pub struct EarlyStop {
    pub epoch: u32,
    pub metric: String,
    pub min_delta: f64,
    pub patience: u32,
    pub best: Option<f64>,
    pub best_epoch: u32,
}

impl fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let epochs = if self.patience == 1 {
            "epoch"
        } else {
            "epochs"
        };
        write!(
            f,
            "early stopped at epoch {}: {} did not improve by {} for {} {epochs}",
            self.epoch, self.metric, self.min_delta, self.patience
        )?;
        match self.best {
            Some(best) => write!(f, " (best {best:.4} at epoch {})", self.best_epoch),
            None => write!(f, " (no finite value)"),
        }
    }
}

impl EarlyStopping {
    /// Checks the table against the metrics the job reports (`reported`).
    pub fn validate<S: AsRef<str>>(&self, reported: &[S]) -> Result<(), FieldError> {
        let field = |name: &'static str| ["early_stopping", name];
        if !reported.iter().any(|m| m.as_ref() == self.metric) {
            let names: Vec<&str> = reported.iter().map(AsRef::as_ref).collect();
            return Err(FieldError::new(
                &field("metric"),
                format!(
                    "`{}` is not a metric this job reports (it reports {})",
                    self.metric,
                    names.join(", ")
                ),
            ));
        }
        if self.patience == 0 {
            return Err(FieldError::new(&field("patience"), "must be at least 1"));
        }
        if !(self.min_delta.is_finite() && self.min_delta >= 0.0) {
            return Err(FieldError::new(
                &field("min_delta"),
                format!("must be a finite number, 0 or more, got {}", self.min_delta),
            ));
        }
        Ok(())
    }

    /// Folds `epoch`'s value of the metric (`None`: not reported) into
    /// `plateau`; returns why to stop after this epoch, if it is time.
    pub fn observe(
        &self,
        plateau: &mut Plateau,
        epoch: u32,
        value: Option<f64>,
    ) -> Option<EarlyStop> {
        let value = value?;
        let improved = value.is_finite()
            && plateau
                .best
                .is_none_or(|best| self.mode.improves(value, best, self.min_delta));
        if improved {
            *plateau = Plateau {
                best: Some(value),
                best_epoch: epoch,
                stale_epochs: 0,
            };
            return None;
        }
        plateau.stale_epochs += 1;
        (plateau.stale_epochs >= self.patience).then(|| EarlyStop {
            epoch,
            metric: self.metric.clone(),
            min_delta: self.min_delta,
            patience: self.patience,
            best: plateau.best,
            best_epoch: plateau.best_epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopping(mode: Mode, patience: u32, min_delta: f64) -> EarlyStopping {
        EarlyStopping {
            metric: "val_loss".into(),
            mode,
            patience,
            min_delta,
        }
    }

    /// The epoch (1-based) a scripted sequence stops at, if any.
    fn stop_epoch(rule: &EarlyStopping, values: &[Option<f64>]) -> Option<u32> {
        let mut plateau = Plateau::default();
        values
            .iter()
            .zip(1..)
            .find_map(|(v, epoch)| rule.observe(&mut plateau, epoch, *v))
            .map(|stop| stop.epoch)
    }

    #[test]
    fn a_scripted_sequence_stops_after_patience_epochs_without_improvement() {
        let rule = stopping(Mode::Min, 3, 0.01);
        // Best 0.5 at epoch 3; 0.495 (epoch 4) beats it by less than
        // min_delta, so epochs 4, 5, 6 are stale: stop after epoch 6.
        let values = [1.0, 0.7, 0.5, 0.495, 0.52, 0.499, 0.1].map(Some);
        assert_eq!(stop_epoch(&rule, &values), Some(6));
        let mut plateau = Plateau::default();
        let stop = values
            .iter()
            .zip(1..)
            .find_map(|(v, e)| rule.observe(&mut plateau, e, *v))
            .unwrap();
        assert_eq!(
            stop.to_string(),
            "early stopped at epoch 6: val_loss did not improve by 0.01 for 3 epochs \
             (best 0.5000 at epoch 3)"
        );
        // An improvement resets the count.
        let values = [1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.87].map(Some);
        assert_eq!(stop_epoch(&stopping(Mode::Min, 2, 0.0), &values), Some(6));
        // Never stale long enough.
        let values = [1.0, 1.0, 0.5, 0.5, 0.2].map(Some);
        assert_eq!(stop_epoch(&stopping(Mode::Min, 2, 0.0), &values), None);
    }

    #[test]
    fn max_mode_wants_larger_values_and_nan_never_improves() {
        let rule = stopping(Mode::Max, 2, 0.0);
        let values = [0.5, 0.6, 0.6, 0.7, 0.65, 0.7].map(Some);
        assert_eq!(stop_epoch(&rule, &values), Some(6), "equal is not better");
        let values = [Some(0.5), Some(f64::NAN), Some(f64::NAN), Some(0.9)];
        assert_eq!(stop_epoch(&rule, &values), Some(3));
        // A NaN first value is not a best to beat.
        let values = [Some(f64::NAN), Some(0.1), Some(0.2)];
        assert_eq!(stop_epoch(&rule, &values), None);
    }

    #[test]
    fn epochs_without_the_metric_do_not_count() {
        let rule = stopping(Mode::Min, 2, 0.0);
        let values = [Some(1.0), None, Some(2.0), None, None, Some(3.0)];
        assert_eq!(stop_epoch(&rule, &values), Some(6));
    }

    #[test]
    fn a_resumed_plateau_stops_at_the_same_epoch() {
        let rule = stopping(Mode::Min, 3, 0.0);
        let values = [0.9, 0.5, 0.6, 0.6, 0.4, 0.5, 0.5, 0.5, 0.1].map(Some);
        let whole = stop_epoch(&rule, &values);
        assert_eq!(whole, Some(8));
        // Stop after epoch 6, carry the plateau through JSON (the sidecar),
        // go on from epoch 7.
        let mut plateau = Plateau::default();
        for (v, epoch) in values[..6].iter().zip(1..) {
            assert_eq!(rule.observe(&mut plateau, epoch, *v), None);
        }
        let json = serde_json::to_string(&plateau).unwrap();
        let mut resumed: Plateau = serde_json::from_str(&json).unwrap();
        let stop = values[6..]
            .iter()
            .zip(7..)
            .find_map(|(v, e)| rule.observe(&mut resumed, e, *v));
        assert_eq!(stop.map(|s| s.epoch), whole);
    }

    const JOB: &str =
        "name = \"j\"\nepochs = 5\n\n[model]\nkind = \"synthetic\"\nfunction = \"branin\"\n";

    #[test]
    fn a_job_file_reads_the_table_and_errors_name_the_line() {
        let text = format!(
            "{JOB}\n[early_stopping]\nmetric = \"objective\"\nmode = \"min\"\npatience = 2\n"
        );
        let job = crate::JobSpec::parse(&text, "job.toml").unwrap();
        assert_eq!(job.early_stopping, Some(stopping_on("objective", 2, 0.0)));
        let text = format!(
            "{JOB}\n[early_stopping]\nmetric = \"val_loss\"\nmode = \"min\"\npatience = 2\n"
        );
        let error = crate::JobSpec::parse(&text, "job.toml")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("job.toml:9:1: early_stopping.metric: `val_loss` is not a metric this job reports (it reports objective)"),
            "{error}"
        );
        let text = format!(
            "{JOB}\n[early_stopping]\nmetric = \"objective\"\nmode = \"down\"\npatience = 2\n"
        );
        let error = crate::JobSpec::parse(&text, "job.toml")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("job.toml:10:8: early_stopping.mode: unknown variant `down`"),
            "{error}"
        );
    }

    fn stopping_on(metric: &str, patience: u32, min_delta: f64) -> EarlyStopping {
        EarlyStopping {
            metric: metric.into(),
            mode: Mode::Min,
            patience,
            min_delta,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let reported = ["train_loss", "val_loss"];
        assert!(stopping(Mode::Min, 1, 0.0).validate(&reported).is_ok());
        let mut unknown = stopping(Mode::Min, 1, 0.0);
        unknown.metric = "val_los".into();
        let error = unknown.validate(&reported).unwrap_err();
        assert_eq!(error.path.to_string(), "early_stopping.metric");
        assert!(
            error.message.contains("`val_los` is not a metric"),
            "{}",
            error.message
        );
        let error = stopping(Mode::Min, 0, 0.0).validate(&reported).unwrap_err();
        assert_eq!(error.path.to_string(), "early_stopping.patience");
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            let error = stopping(Mode::Min, 1, bad).validate(&reported).unwrap_err();
            assert_eq!(error.path.to_string(), "early_stopping.min_delta", "{bad}");
        }
    }
}
