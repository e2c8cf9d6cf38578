//! From a submitted spec to what the scheduler needs: the driver's settings
//! and, per trial, the job to run.

use std::collections::BTreeMap;

use ringleader_spec::job::ModelSpec;
use ringleader_spec::search::{Mode, Space};
use ringleader_spec::sweep::{SearcherSpec, SweepSpec};
use ringleader_spec::{JobSpec, SpecError};
use serde_json::Value;

use super::driver::{DriverConfig, Source, Stopping};
use super::records::SweepKind;
use crate::limits::MAX_SPEC_BYTES;

/// Attempts that may fail before a job (a one-trial sweep) is failed.
const JOB_MAX_FAILURES: u32 = 2;

/// A parsed submission.
pub enum Template {
    Job(Box<JobSpec>),
    Sweep(Box<SweepSpec>),
}

impl Template {
    /// Parses (and fully validates) a spec; the error names file, field
    /// and line.
    pub fn parse(kind: SweepKind, text: &str, origin: &str) -> Result<Self, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge {
                origin: origin.to_string(),
                bytes: text.len(),
                limit: MAX_SPEC_BYTES,
            });
        }
        match kind {
            SweepKind::Job => JobSpec::parse(text, origin).map(|j| Template::Job(Box::new(j))),
            SweepKind::Sweep => {
                SweepSpec::parse(text, origin).map(|s| Template::Sweep(Box::new(s)))
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Template::Job(job) => &job.name,
            Template::Sweep(sweep) => &sweep.name,
        }
    }

    /// The metric a job is ranked by: a synthetic model's value, else
    /// validation accuracy when it holds out a validation set, else test
    /// accuracy when there is a test split, else the training loss.
    pub fn objective(&self) -> (String, Mode) {
        match self {
            Template::Job(job) => match (&job.model, &job.dataset) {
                (ModelSpec::Synthetic { .. }, _) => ("objective".into(), Mode::Min),
                (_, dataset) if dataset.has_validation() => ("val_accuracy".into(), Mode::Max),
                (_, dataset) if dataset.test.is_some() => ("test_accuracy".into(), Mode::Max),
                (_, _) => ("train_loss".into(), Mode::Min),
            },
            Template::Sweep(sweep) => (sweep.objective.metric.clone(), sweep.objective.mode),
        }
    }

    /// What a person should know before the sweep runs: an objective on a
    /// test metric chooses trials on the test split, so the chosen trial's
    /// test metrics overstate how well it does on unseen data.
    pub fn warnings(&self) -> Vec<String> {
        match self {
            Template::Sweep(sweep) if sweep.objective.selects_on_test() => vec![format!(
                "the objective {} chooses trials on the test split, so the best trial's test \
                 metrics are no longer an unbiased estimate (they overstate the result); hold \
                 out validation (dataset.validation_fraction = 0.1) and optimise val_accuracy",
                sweep.objective.metric
            )],
            _ => Vec::new(),
        }
    }

    pub fn max_trials(&self) -> u64 {
        match self {
            Template::Job(_) => 1,
            Template::Sweep(sweep) => u64::from(sweep.max_trials),
        }
    }

    pub fn driver_config(&self, sweep_id: &str) -> DriverConfig {
        let (metric, mode) = self.objective();
        match self {
            Template::Job(job) => DriverConfig {
                sweep: sweep_id.into(),
                space: Space::default(),
                source: Source::Fixed,
                stopping: None,
                seed: job.seed,
                max_trials: 1,
                max_concurrent: None,
                max_epochs: job.epochs,
                max_failures: JOB_MAX_FAILURES,
                metric,
                mode,
                folds: None,
            },
            Template::Sweep(spec) => {
                let (source, stopping) = match &spec.searcher {
                    SearcherSpec::Grid { points } => (
                        Source::Grid {
                            points: *points as usize,
                        },
                        None,
                    ),
                    SearcherSpec::Random => (Source::Random, None),
                    SearcherSpec::Tpe { options } => (Source::Tpe(options.clone()), None),
                    SearcherSpec::Asha { eta, min_epochs } => (
                        Source::Random,
                        Some(Stopping {
                            eta: *eta,
                            min_epochs: *min_epochs,
                            brackets: 1,
                        }),
                    ),
                    SearcherSpec::Hyperband { eta, min_epochs } => (
                        Source::Random,
                        Some(Stopping {
                            eta: *eta,
                            min_epochs: *min_epochs,
                            brackets: hyperband_brackets(*eta, *min_epochs, spec.max_epochs),
                        }),
                    ),
                };
                let stopping = stopping.or(spec.stopper.as_ref().map(|s| Stopping {
                    eta: s.eta,
                    min_epochs: s.min_epochs,
                    brackets: 1,
                }));
                DriverConfig {
                    sweep: sweep_id.into(),
                    space: Space::new(spec.params.clone()).expect("validated when parsed"),
                    source,
                    stopping,
                    seed: spec.seed,
                    max_trials: u64::from(spec.max_trials),
                    max_concurrent: spec.max_concurrent_trials,
                    max_epochs: spec.max_epochs,
                    max_failures: spec.max_failures,
                    metric,
                    mode,
                    folds: spec.cross_validation.map(|cv| cv.folds),
                }
            }
        }
    }

    /// The job one trial runs.
    pub fn job(&self, config: &BTreeMap<String, Value>) -> Result<JobSpec, SpecError> {
        match self {
            Template::Job(job) => Ok(job.as_ref().clone()),
            Template::Sweep(sweep) => sweep.trial_job(config),
        }
    }
}

/// Hyperband's bracket count: ⌊log_η(max/min)⌋ + 1.
fn hyperband_brackets(eta: u32, min_epochs: u32, max_epochs: u32) -> u32 {
    let mut brackets = 1;
    let mut r = u64::from(min_epochs.max(1)) * u64::from(eta);
    while r <= u64::from(max_epochs) {
        brackets += 1;
        r *= u64::from(eta);
    }
    brackets
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random search over a data set with a test split, with
    /// `sweep_line` added to `[sweep]` and `dataset_line` to
    /// `[job.dataset]`.
    fn sweep(sweep_line: &str, dataset_line: &str) -> Template {
        let text = format!(
            r#"[sweep]
name = "fmnist"
searcher = "random"
max_trials = 12
{sweep_line}

[sweep.params]
"optimizer.lr" = {{ kind = "log_uniform", low = 0.001, high = 0.3 }}

[job]
name = "base"
workers = 1
epochs = 3

[job.dataset]
format = "idx"
classes = 10
train = {{ images = "i.gz", labels = "l.gz" }}
test = {{ images = "ti.gz", labels = "tl.gz" }}
{dataset_line}

[job.model]
kind = "cnn"
"#
        );
        Template::parse(SweepKind::Sweep, &text, "sweep.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_objective_on_the_test_split_is_warned_of() {
        let on_validation = sweep("", "validation_fraction = 0.1");
        assert_eq!(
            on_validation.objective(),
            ("val_accuracy".into(), Mode::Max)
        );
        assert!(on_validation.warnings().is_empty());
        let on_test = sweep(
            "objective = { metric = \"test_accuracy\", mode = \"max\" }",
            "validation_fraction = 0.1",
        );
        let warnings = on_test.warnings();
        assert!(
            warnings.len() == 1
                && warnings[0].contains("test_accuracy chooses trials on the test split"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_cross_validated_sweep_drives_its_folds_and_its_trial_jobs_hold_none() {
        let template = sweep("cross_validation = { folds = 3 }", "");
        assert_eq!(template.driver_config("s").folds, Some(3));
        // The leader sets each fold's.
        let job = template.job(&BTreeMap::new()).unwrap();
        assert_eq!(job.dataset.folds, None);
    }
}
