//! The sweep spec: the TOML a user submits with `ringleader sweep submit`.
//!
//! ```toml
//! [sweep]
//! name = "fashion-mnist-asha"
//! searcher = "asha"          # grid | random | asha | hyperband | tpe
//! max_trials = 24
//! max_epochs = 9             # replaces job.epochs
//! objective = { metric = "val_accuracy", mode = "max" }   # the default
//!                            # when the job holds out validation
//!
//! [sweep.params]             # dotted paths into the job
//! "optimizer.lr" = { kind = "log_uniform", low = 0.001, high = 0.3 }
//!
//! [job]                      # the base job, as in a job file
//! ```
//!
//! Defaults: `seed` 0; `max_concurrent_trials` 0 (as many as workers
//! allow); `workers_per_trial` and `max_epochs` the job's `workers` and
//! `epochs`; `max_failures` 2; `eta` 3, `min_epochs` 1; `stopper` "none";
//! `grid_points` 3; `tpe` as [`TpeOptions::default`]. `max_trials` is
//! required except for grid sweeps, which default to the whole grid.
//!
//! [`SweepSpec::parse`] checks everything a trial could trip over before
//! anything is stored: the base job, every parameter's domain, and that
//! each parameter path, set to the ends of its domain (every value of a
//! choice), still gives a valid job. Every error names the file, the line
//! and the field. Parsing is pure, so a rejected spec never writes anything.
//!
//! The file reads straight into the search types: `[sweep.params]` into
//! [`Param`]s, `[sweep.tpe]` into [`TpeOptions`], the objective's `mode`
//! into [`Mode`], each checked as it is read. Only `[sweep]` itself has a
//! form of its own (`RawSweep`), since its flat keys (`searcher`, `eta`,
//! `grid_points`, …) become a [`SearcherSpec`] only together.
//!
//! A `SweepSpec` serialises as its origin and TOML source and deserialises
//! by parsing that again: what etcd holds is exactly what the user wrote,
//! and a stored sweep is checked by the same code as a new one.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Document, FieldError, FieldPath, SpecError};
use crate::job::{read_spec, FoldSpec, ModelSpec};
use crate::limits::{MAX_GRID_POINTS, MAX_PARAMS, MAX_TRIALS};
use crate::search::{Asha, AshaError, Grid, Mode, Param, Space, TpeOptions};
use crate::{apply_overrides, toml, with_overrides, JobSpec};

/// A checked sweep.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(into = "StoredSweep", try_from = "StoredSweep")]
pub struct SweepSpec {
    pub name: String,
    pub searcher: SearcherSpec,
    /// Early stopping for searchers that do not stop trials themselves.
    pub stopper: Option<AshaStopper>,
    pub seed: u64,
    pub max_trials: u32,
    /// Trials running at once; `None`: as many as workers allow.
    pub max_concurrent_trials: Option<u32>,
    /// Workers each trial trains on (replaces the job's `workers`).
    pub workers_per_trial: u32,
    /// Epochs of a trial that runs to the end (replaces the job's `epochs`).
    pub max_epochs: u32,
    /// Failed attempts a trial may have before it counts as failed.
    pub max_failures: u32,
    pub objective: Objective,
    /// Every trial trains `folds` folds and scores their mean objective.
    pub cross_validation: Option<CrossValidation>,
    /// Dotted job paths (`optimizer.lr`) and their domains.
    pub params: BTreeMap<String, Param>,
    /// The base job, before any trial's overrides.
    pub job: toml::Table,
    /// Where the spec came from (file name), for errors.
    pub origin: String,
    /// The TOML text the spec was parsed from.
    pub source: String,
}

#[derive(Clone, Debug)]
pub enum SearcherSpec {
    /// Every combination; continuous parameters get `points` values.
    Grid {
        points: u32,
    },
    Random,
    Asha {
        eta: u32,
        min_epochs: u32,
    },
    Hyperband {
        eta: u32,
        min_epochs: u32,
    },
    Tpe {
        options: TpeOptions,
    },
}

/// ASHA used only to stop trials early (rungs at `min_epochs·eta^k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AshaStopper {
    pub eta: u32,
    pub min_epochs: u32,
}

/// The metric trials are ranked by, and which way is better:
/// `objective = { metric = "val_loss", mode = "min" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    pub metric: String,
    pub mode: Mode,
}

impl Objective {
    /// The default objective of a sweep whose job holds out validation.
    fn validation_accuracy() -> Self {
        Self {
            metric: "val_accuracy".into(),
            mode: Mode::Max,
        }
    }

    /// Whether trials are chosen on the test split, which then no longer
    /// gives an unbiased estimate of the chosen trial.
    pub fn selects_on_test(&self) -> bool {
        self.metric.starts_with("test_")
    }
}

impl SweepSpec {
    /// Reads and checks a sweep file.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        Self::parse(&read_spec(path)?, &path.display().to_string())
    }

    /// Parses and checks a sweep written in TOML; `origin` names it in
    /// errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let doc = Document::parse(text, origin)?;
        let file: SweepFile = doc.deserialize()?;
        let sweep = file.sweep;
        let at = |path: &[&str], message: String| doc.error(FieldError::new(path, message));

        // The sweep's own settings replace these job fields in every trial;
        // a job error in one of them points at the sweep setting.
        let fixed: BTreeMap<String, Value> = [
            ("epochs", sweep.max_epochs),
            ("workers", sweep.workers_per_trial),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_string(), Value::from(value?))))
        .collect();
        let mut base = apply_overrides(&file.job, &fixed).map_err(|e| {
            let job_key = e.path.0.first().map(String::as_str).unwrap_or_default();
            match SET_BY_SWEEP
                .iter()
                .find(|(key, _)| fixed.contains_key(*key) && *key == job_key)
            {
                Some((_, sweep_key)) => at(&["sweep", sweep_key], e.message),
                None => doc.error(e.under(&FieldPath(vec!["job".into()]))),
            }
        })?;

        match sweep.max_trials {
            Some(0) => return Err(at(&["sweep", "max_trials"], "must be at least 1".into())),
            Some(n) if u64::from(n) > MAX_TRIALS => {
                let message = format!("at most {MAX_TRIALS} trials per sweep, got {n}");
                return Err(at(&["sweep", "max_trials"], message));
            }
            _ => {}
        }
        // Checked with fold 0 in place, so that the objective defaults to
        // (and is checked against) the validation metrics folds report.
        if let Some(cross_validation) = sweep.cross_validation {
            check_cross_validation(cross_validation, &mut base)
                .map_err(|(path, message)| at(&path, message))?;
        }
        let objective = match &sweep.objective {
            Some(objective) => objective.clone(),
            None if base.dataset.has_validation() => Objective::validation_accuracy(),
            None => {
                let message = "required when the job holds out no validation set \
                               (with dataset.validation_fraction, dataset.validation or \
                               dataset.folds it defaults to val_accuracy, max)";
                return Err(at(&["sweep", "objective"], message.into()));
            }
        };
        let mode = objective.mode;
        let searcher = sweep.searcher(&at)?;
        let stopper = match sweep.stopper {
            Stopper::None => None,
            Stopper::Asha if searcher.stops_trials() => {
                let message = "asha and hyperband stop trials themselves; \
                               a stopper applies to grid, random and tpe";
                return Err(at(&["sweep", "stopper"], message.into()));
            }
            Stopper::Asha => Some(AshaStopper {
                eta: sweep.eta,
                min_epochs: sweep.min_epochs,
            }),
        };
        if sweep.cross_validation.is_some() && (stopper.is_some() || searcher.stops_trials()) {
            let message = "does not combine with asha, hyperband or stopper = \"asha\": a \
                           rung would rank trials before every fold had reached it; use \
                           grid, random or tpe";
            return Err(at(&["sweep", "cross_validation"], message.into()));
        }
        if stopper.is_some() || searcher.stops_trials() {
            // The rungs ASHA would build must exist.
            Asha::new(sweep.eta, sweep.min_epochs, base.epochs, mode).map_err(|e| match e {
                AshaError::BadEta(_) => at(&["sweep", "eta"], e.to_string()),
                _ => at(
                    &["sweep", "min_epochs"],
                    format!(
                        "must lie in [1, max_epochs = {}], got {}",
                        base.epochs, sweep.min_epochs
                    ),
                ),
            })?;
        }
        check_metric(&objective.metric, &base)
            .map_err(|e| at(&["sweep", "objective", "metric"], e))?;

        if sweep.params.is_empty() {
            return Err(at(
                &["sweep", "params"],
                "a sweep needs at least one parameter".into(),
            ));
        }
        if sweep.params.len() > MAX_PARAMS {
            let message = format!(
                "at most {MAX_PARAMS} parameters per sweep, got {}",
                sweep.params.len()
            );
            return Err(at(&["sweep", "params"], message));
        }
        let mut params = BTreeMap::new();
        for (name, param) in sweep.params {
            check_param(&name, &param, &file.job, &fixed)
                .map_err(|e| at(&["sweep", "params", &name], e))?;
            params.insert(name, param);
        }

        let max_trials = match (sweep.max_trials, &searcher) {
            (Some(n), _) => n,
            (None, SearcherSpec::Grid { points }) => {
                // Every parameter was checked above, so the space is valid.
                let space = Space::new(params.clone())
                    .map_err(|e| at(&["sweep", "params"], e.to_string()))?;
                // Sized, not built: a grid of 10^18 points costs nothing.
                match Grid::new(&space, *points as usize).size() {
                    Some(size) if size <= MAX_TRIALS => size as u32,
                    size => {
                        let size = size.map_or("more than 2^64".to_string(), |n| n.to_string());
                        let message = format!(
                            "the grid has {size} combinations, more than the {MAX_TRIALS} \
                             trials a sweep may run: lower grid_points, narrow the \
                             parameters, or set sweep.max_trials to run part of it"
                        );
                        return Err(at(&["sweep", "grid_points"], message));
                    }
                }
            }
            (None, _) => {
                let message = "required (only grid sweeps default to the whole grid)";
                return Err(at(&["sweep", "max_trials"], message.into()));
            }
        };

        Ok(Self {
            name: sweep.name,
            searcher,
            stopper,
            seed: sweep.seed,
            max_trials,
            max_concurrent_trials: Some(sweep.max_concurrent_trials).filter(|&n| n > 0),
            workers_per_trial: base.workers,
            max_epochs: base.epochs,
            max_failures: sweep.max_failures,
            objective,
            cross_validation: sweep.cross_validation,
            params,
            job: file.job,
            origin: origin.into(),
            source: text.into(),
        })
    }

    /// The job one trial runs: the base job with `workers_per_trial`,
    /// `max_epochs` and the trial's configuration applied.
    pub fn trial_job(&self, config: &BTreeMap<String, Value>) -> Result<JobSpec, SpecError> {
        let mut overrides = config.clone();
        overrides.insert("workers".into(), Value::from(self.workers_per_trial));
        overrides.insert("epochs".into(), Value::from(self.max_epochs));
        with_overrides(&self.job, &overrides, &format!("{}: trial", self.origin))
    }
}

/// Job fields a sweep setting replaces in every trial, so no parameter
/// may set them: (job key, sweep key).
const SET_BY_SWEEP: [(&str, &str); 2] =
    [("epochs", "max_epochs"), ("workers", "workers_per_trial")];

impl SearcherSpec {
    /// Whether the searcher stops poor trials itself (no stopper needed).
    fn stops_trials(&self) -> bool {
        matches!(
            self,
            SearcherSpec::Asha { .. } | SearcherSpec::Hyperband { .. }
        )
    }
}

/// `metric` must be one the base job's trials report.
fn check_metric(metric: &str, base: &JobSpec) -> Result<(), String> {
    let metrics = base.reported_metrics();
    if metrics.iter().any(|m| m == metric) {
        return Ok(());
    }
    let needs = if metric.starts_with("test_") && base.dataset.test.is_none() {
        " (test_* metrics need a test split, [job.dataset.test])"
    } else if metric.starts_with("val_") && !base.dataset.has_validation() {
        " (val_* metrics need a validation set: dataset.validation_fraction, \
         dataset.validation or dataset.folds)"
    } else {
        ""
    };
    Err(format!(
        "the job does not report `{metric}`{needs}; it reports {}",
        metrics.join(", ")
    ))
}

/// Checks that the job accepts one parameter's path with each of its
/// [`representatives`], so a bad path or value fails at submit time and
/// not in a trial (its domain was checked as it was read). The error does
/// not repeat the parameter name (the caller places it at the parameter).
fn check_param(
    name: &str,
    param: &Param,
    job: &toml::Table,
    fixed: &BTreeMap<String, Value>,
) -> Result<(), String> {
    if let Some((_, sweep_key)) = SET_BY_SWEEP.iter().find(|(key, _)| *key == name) {
        return Err(format!("{name} is set by sweep.{sweep_key}"));
    }
    for value in representatives(param) {
        let mut overrides = fixed.clone();
        overrides.insert(name.into(), value.clone());
        apply_overrides(job, &overrides).map_err(|e| {
            if e.path == FieldPath::parse_dotted(name) {
                format!("value {value}: {}", e.message)
            } else {
                format!("value {value}: {}: {}", e.path, e.message)
            }
        })?;
    }
    Ok(())
}

/// Values that stand for a domain when checking it against the job: both
/// ends of a range, every choice.
fn representatives(param: &Param) -> Vec<Value> {
    match param {
        Param::Uniform { low, high } | Param::LogUniform { low, high } => {
            vec![Value::from(*low), Value::from(*high)]
        }
        Param::Int {
            low, high, step, ..
        } => {
            vec![
                Value::from(*low),
                Value::from(low + (high - low) / step * step),
            ]
        }
        Param::Choice { values } => values.clone(),
    }
}

/// The serialised form: the source, parsed again on the way back.
#[derive(Serialize, Deserialize)]
struct StoredSweep {
    origin: String,
    toml: String,
}

impl From<SweepSpec> for StoredSweep {
    fn from(spec: SweepSpec) -> Self {
        Self {
            origin: spec.origin,
            toml: spec.source,
        }
    }
}

impl TryFrom<StoredSweep> for SweepSpec {
    type Error = SpecError;

    fn try_from(stored: StoredSweep) -> Result<Self, SpecError> {
        Self::parse(&stored.toml, &stored.origin)
    }
}

// What the file says, before checking; defaults are the documented ones.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    sweep: RawSweep,
    job: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    name: String,
    searcher: SearcherKind,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    max_trials: Option<u32>,
    #[serde(default)]
    max_concurrent_trials: u32,
    #[serde(default)]
    workers_per_trial: Option<u32>,
    #[serde(default)]
    max_epochs: Option<u32>,
    #[serde(default = "default_max_failures")]
    max_failures: u32,
    /// Omitted: `val_accuracy` (max) when the job holds out a validation
    /// set; required otherwise.
    #[serde(default)]
    objective: Option<Objective>,
    #[serde(default = "default_eta")]
    eta: u32,
    #[serde(default = "default_min_epochs")]
    min_epochs: u32,
    #[serde(default)]
    stopper: Stopper,
    #[serde(default = "default_grid_points")]
    grid_points: u32,
    #[serde(default)]
    tpe: TpeOptions,
    #[serde(default)]
    params: BTreeMap<String, Param>,
    #[serde(default)]
    cross_validation: Option<CrossValidation>,
}

/// `cross_validation = { folds = k }`: each trial trains k folds (fold i
/// validates on the i-th of k stratified, seeded folds of the training
/// split and trains on the rest), and its objective is their mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossValidation {
    pub folds: u32,
}

/// Checks that `base` can be cross-validated with `cv` and puts fold 0 in
/// it. Errors are (field path, message).
fn check_cross_validation(
    cv: CrossValidation,
    base: &mut JobSpec,
) -> Result<(), (Vec<&'static str>, String)> {
    let folds_field = vec!["sweep", "cross_validation", "folds"];
    if cv.folds < 2 {
        return Err((folds_field, format!("must be at least 2, got {}", cv.folds)));
    }
    if let ModelSpec::Synthetic { .. } = base.model {
        let message = "needs a job that trains on data (a synthetic model reads none)";
        return Err((vec!["sweep", "cross_validation"], message.into()));
    }
    let dataset = &base.dataset;
    let held_out = [
        ("validation_fraction", dataset.validation_fraction.is_some()),
        ("validation", dataset.validation.is_some()),
        ("folds", dataset.folds.is_some()),
    ];
    if let Some((field, _)) = held_out.iter().find(|(_, given)| *given) {
        let message = "cannot be combined with sweep.cross_validation, which validates \
                       each fold on its own part of the training split"
            .to_string();
        return Err((vec!["job", "dataset", field], message));
    }
    base.dataset.folds = Some(FoldSpec {
        count: cv.folds,
        index: 0,
    });
    // More folds than training examples, and the like.
    base.validate().map_err(|e| (folds_field, e.message))
}

impl RawSweep {
    fn searcher(
        &self,
        at: &impl Fn(&[&str], String) -> SpecError,
    ) -> Result<SearcherSpec, SpecError> {
        Ok(match self.searcher {
            SearcherKind::Grid if !(2..=MAX_GRID_POINTS).contains(&self.grid_points) => {
                return Err(at(
                    &["sweep", "grid_points"],
                    format!(
                        "must be between 2 and {MAX_GRID_POINTS}, got {}",
                        self.grid_points
                    ),
                ))
            }
            SearcherKind::Grid => SearcherSpec::Grid {
                points: self.grid_points,
            },
            SearcherKind::Random => SearcherSpec::Random,
            SearcherKind::Asha => SearcherSpec::Asha {
                eta: self.eta,
                min_epochs: self.min_epochs,
            },
            SearcherKind::Hyperband => SearcherSpec::Hyperband {
                eta: self.eta,
                min_epochs: self.min_epochs,
            },
            SearcherKind::Tpe => SearcherSpec::Tpe {
                options: self.tpe.clone(),
            },
        })
    }
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SearcherKind {
    Grid,
    Random,
    Asha,
    Hyperband,
    Tpe,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Stopper {
    #[default]
    None,
    Asha,
}

fn default_max_failures() -> u32 {
    2
}
fn default_eta() -> u32 {
    3
}
fn default_min_epochs() -> u32 {
    1
}
fn default_grid_points() -> u32 {
    3
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"[sweep]
name = "fmnist"
searcher = "asha"
max_trials = 12
workers_per_trial = 1
max_epochs = 9
objective = { metric = "test_accuracy", mode = "max" }

[sweep.params]
"optimizer.lr" = { kind = "log_uniform", low = 0.001, high = 0.3 }
"optimizer.momentum" = { kind = "uniform", low = 0.5, high = 0.99 }
"batch_size" = { kind = "choice", values = [32, 64, 128] }
"model.hidden" = { kind = "int", low = 64, high = 256, step = 64 }

[job]
name = "base"
workers = 4
epochs = 1

[job.dataset]
format = "idx"
classes = 10
train = { images = "i.gz", labels = "l.gz" }
test = { images = "ti.gz", labels = "tl.gz" }

[job.model]
kind = "cnn"
"#;

    /// The error for GOOD with `from` replaced by `to`.
    fn error(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        SweepSpec::parse(&GOOD.replacen(from, to, 1), "sweep.toml")
            .unwrap_err()
            .to_string()
    }

    fn assert_error(from: &str, to: &str, expected: &str) {
        let message = error(from, to);
        assert!(
            message.starts_with(expected),
            "{message}\nexpected {expected}"
        );
    }

    #[test]
    fn a_good_sweep_parses_and_makes_trial_jobs() {
        let spec = SweepSpec::parse(GOOD, "sweep.toml").unwrap();
        assert!(matches!(
            spec.searcher,
            SearcherSpec::Asha {
                eta: 3,
                min_epochs: 1
            }
        ));
        assert_eq!(spec.objective.mode, Mode::Max);
        assert_eq!((spec.workers_per_trial, spec.max_epochs), (1, 9));
        assert_eq!(spec.max_concurrent_trials, None);
        assert_eq!(spec.params.len(), 4);
        let config = BTreeMap::from([
            ("optimizer.lr".to_string(), Value::from(0.02)),
            ("batch_size".to_string(), Value::from(32)),
        ]);
        let job = spec.trial_job(&config).unwrap();
        assert_eq!((job.workers, job.epochs, job.batch_size), (1, 9, 32));
        assert_eq!(job.optimizer.lr, 0.02);
        let bad = BTreeMap::from([("optimizer.lr".to_string(), Value::from(-1.0))]);
        let err = spec.trial_job(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("sweep.toml: trial: optimizer.lr: must be above 0"),
            "{err}"
        );
    }

    #[test]
    fn sweeps_round_trip_through_json_as_their_source() {
        let spec = SweepSpec::parse(GOOD, "sweep.toml").unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        let back: SweepSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back.source, GOOD);
        assert_eq!(back.params, spec.params);
        let tampered = json.replace("max_trials = 12", "max_trials = 0");
        let err = serde_json::from_str::<SweepSpec>(&tampered).unwrap_err();
        assert!(err.to_string().contains("sweep.max_trials"), "{err}");
    }

    #[test]
    fn malformed_toml_is_placed() {
        assert_error("max_trials = 12", "max_trials = ", "sweep.toml:4:14: ");
    }

    #[test]
    fn bad_parameter_domains_point_at_the_parameter() {
        let lr = r#""optimizer.lr" = { kind = "log_uniform", low = 0.001, high = 0.3 }"#;
        let field = "sweep.toml:10:1: sweep.params.\"optimizer.lr\": ";
        for (to, expected) in [
            (
                r#""optimizer.lr" = { kind = "gaussian", low = 0.001 }"#,
                "sweep.toml:10:27: sweep.params.\"optimizer.lr\".kind: unknown variant `gaussian`",
            ),
            (
                r#""optimizer.lr" = { kind = "uniform", low = 0.3, high = 0.3 }"#,
                "empty range",
            ),
            (
                r#""optimizer.lr" = { kind = "log_uniform", low = 0.0, high = 0.3 }"#,
                "log scale needs bounds above 0",
            ),
            (
                r#""optimizer.lr" = { kind = "choice", values = [] }"#,
                "choice needs at least one value",
            ),
            (
                r#""optimizer.lrr" = { kind = "uniform", low = 0.1, high = 0.3 }"#,
                "value 0.1: override path `optimizer.lrr` does not exist in the job",
            ),
            (
                r#""optimizer.lr" = { kind = "choice", values = [0.1, -0.1] }"#,
                "value -0.1: must be above 0",
            ),
        ] {
            let expected = if expected.starts_with("sweep.toml") {
                expected.to_string()
            } else {
                format!("{field}{}", expected)
            }
            .replace(
                "\"optimizer.lr\"",
                if to.contains("lrr") {
                    "\"optimizer.lrr\""
                } else {
                    "\"optimizer.lr\""
                },
            );
            assert_error(lr, to, &expected);
        }
        assert_error(
            r#""model.hidden" = { kind = "int", low = 64, high = 256, step = 64 }"#,
            r#""model.hidden" = { kind = "int", low = 0, high = 256, step = 64, log = true }"#,
            "sweep.toml:13:1: sweep.params.\"model.hidden\": log scale needs bounds above 0",
        );
        assert_error(
            r#""batch_size" = { kind = "choice", values = [32, 64, 128] }"#,
            r#""epochs" = { kind = "choice", values = [1, 2] }"#,
            "sweep.toml:12:1: sweep.params.epochs: epochs is set by sweep.max_epochs",
        );
        assert_error(
            r#""batch_size" = { kind = "choice", values = [32, 64, 128] }"#,
            r#""model.channels" = { kind = "choice", values = [[16, 32], [8]] }"#,
            "sweep.toml:12:1: sweep.params.\"model.channels\": value [8]: model: invalid length 1",
        );
    }

    #[test]
    fn tpe_settings_read_into_its_options_and_are_checked_as_they_are_read() {
        let tpe = |settings: &str| {
            GOOD.replacen(
                "searcher = \"asha\"",
                &format!("searcher = \"tpe\"\ntpe = {{ {settings} }}"),
                1,
            )
        };
        let spec = SweepSpec::parse(&tpe("startup_trials = 4, gamma = 0.25"), "s").unwrap();
        let SearcherSpec::Tpe { options } = spec.searcher else {
            panic!("{:?}", spec.searcher);
        };
        assert_eq!(
            options,
            TpeOptions {
                startup_trials: 4,
                gamma: 0.25,
                ..TpeOptions::default()
            }
        );
        for (settings, expected) in [
            (
                "gamma = 1.0",
                "sweep.toml:4:17: sweep.tpe.gamma: must lie in (0, 1), got 1",
            ),
            (
                "candidates = 0",
                "sweep.toml:4:22: sweep.tpe.candidates: must be at least 1",
            ),
            (
                "max_good = 5",
                "sweep.toml:4:9: sweep.tpe.max_good: unknown field `max_good`",
            ),
        ] {
            let message = SweepSpec::parse(&tpe(settings), "sweep.toml")
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with(expected),
                "{message}\nexpected {expected}"
            );
        }
    }

    #[test]
    fn a_parameter_written_as_a_table_is_placed_at_its_header() {
        let text = GOOD.replacen(
            "[job]\n",
            "[sweep.params.\"model.dropout\"]\nkind = \"uniform\"\nlow = 0.5\nhigh = 0.1\n\n[job]\n",
            1,
        );
        let message = SweepSpec::parse(&text, "sweep.toml")
            .unwrap_err()
            .to_string();
        let expected = "sweep.toml:15:1: sweep.params.\"model.dropout\": empty range [0.5, 0.1]";
        assert!(
            message.starts_with(expected),
            "{message}\nexpected {expected}"
        );
    }

    #[test]
    fn the_objective_defaults_to_validation_accuracy_when_the_job_holds_out_validation() {
        // (What the coordinator warns of a test objective is tested with
        // its Template, coordinator/src/sweep/template.rs.)
        let objective_line = "objective = { metric = \"test_accuracy\", mode = \"max\" }\n";
        let held_out = GOOD.replacen(objective_line, "", 1).replacen(
            "classes = 10",
            "classes = 10\nvalidation_fraction = 0.1",
            1,
        );
        let spec = SweepSpec::parse(&held_out, "sweep.toml").unwrap();
        assert_eq!(spec.objective, Objective::validation_accuracy());
        assert!(!spec.objective.selects_on_test());
        // Without a validation set there is nothing to default to.
        assert_error(
            objective_line,
            "",
            "sweep.toml:1:2: sweep.objective: required when the job holds out no validation set",
        );
        // A test objective is allowed (the coordinator warns of it).
        let on_test = GOOD.replacen("classes = 10", "classes = 10\nvalidation_fraction = 0.1", 1);
        let spec = SweepSpec::parse(&on_test, "sweep.toml").unwrap();
        assert!(spec.objective.selects_on_test());
    }

    #[test]
    fn objectives_must_be_metrics_this_job_reports() {
        let with = |dataset_line: &str, metric: &str| {
            let text = GOOD
                .replacen("classes = 10", &format!("classes = 10\n{dataset_line}"), 1)
                .replacen("\"test_accuracy\"", &format!("\"{metric}\""), 1);
            SweepSpec::parse(&text, "sweep.toml").map(|s| s.objective.metric)
        };
        for metric in [
            "val_accuracy",
            "val_loss",
            "val_macro_f1",
            "val_recall_9",
            "test_recall_0",
        ] {
            assert_eq!(with("validation_fraction = 0.2", metric).unwrap(), metric);
        }
        for (line, metric, expected) in [
            (
                "",
                "val_accuracy",
                "sweep.toml:7:15: sweep.objective.metric: the job does not report `val_accuracy` \
                 (val_* metrics need a validation set",
            ),
            (
                "validation_fraction = 0.2",
                "val_recall_10",
                "sweep.toml:7:15: sweep.objective.metric: the job does not report `val_recall_10`;",
            ),
            (
                "validation_fraction = 0.2",
                "val_roc_auc",
                "sweep.toml:7:15: sweep.objective.metric: the job does not report `val_roc_auc`;",
            ),
            (
                "folds = { count = 5, index = 0 }",
                "val_acc",
                "sweep.toml:7:15: sweep.objective.metric: the job does not report `val_acc`;",
            ),
        ] {
            let message = with(line, metric).unwrap_err().to_string();
            assert!(
                message.starts_with(expected),
                "{message}\nexpected {expected}"
            );
        }
        let binary = GOOD.replacen("classes = 10", "classes = 2\nvalidation_fraction = 0.2", 1);
        let text = binary.replacen("\"test_accuracy\"", "\"val_roc_auc\"", 1);
        assert_eq!(
            SweepSpec::parse(&text, "sweep.toml")
                .unwrap()
                .objective
                .metric,
            "val_roc_auc"
        );
    }

    /// GOOD as a random search cross-validated with `folds` folds, its
    /// objective left to the default.
    fn cross_validated(folds: &str) -> String {
        GOOD.replacen("searcher = \"asha\"", "searcher = \"random\"", 1)
            .replacen(
                "objective = { metric = \"test_accuracy\", mode = \"max\" }",
                &format!("cross_validation = {{ folds = {folds} }}"),
                1,
            )
    }

    #[test]
    fn cross_validation_defaults_to_validation_accuracy_over_the_folds() {
        let spec = SweepSpec::parse(&cross_validated("3"), "sweep.toml").unwrap();
        assert_eq!(spec.cross_validation, Some(CrossValidation { folds: 3 }));
        assert_eq!(spec.objective, Objective::validation_accuracy());
        // Trial jobs hold no fold: the leader sets each fold's.
        let job = spec.trial_job(&BTreeMap::new()).unwrap();
        assert_eq!(job.dataset.folds, None);
    }

    #[test]
    fn bad_cross_validation_names_the_field_and_line() {
        let cases = [
            (
                cross_validated("1"),
                "sweep.toml:7:22: sweep.cross_validation.folds: must be at least 2, got 1",
            ),
            (
                cross_validated("3").replacen("searcher = \"random\"", "searcher = \"asha\"", 1),
                "sweep.toml:7:1: sweep.cross_validation: does not combine with asha, hyperband \
                 or stopper",
            ),
            (
                cross_validated("3").replacen(
                    "classes = 10\n",
                    "classes = 10\nvalidation_fraction = 0.1\n",
                    1,
                ),
                "sweep.toml:23:1: job.dataset.validation_fraction: cannot be combined with \
                 sweep.cross_validation",
            ),
            (
                cross_validated("3").replacen(
                    "classes = 10\n",
                    "classes = 10\nlimit_train = 2\n",
                    1,
                ),
                "sweep.toml:7:22: sweep.cross_validation.folds: 3 folds of 2 training examples",
            ),
            (
                cross_validated("3, count = 2"),
                "sweep.toml:7:33: sweep.cross_validation.count: unknown field `count`",
            ),
        ];
        for (text, expected) in cases {
            let message = SweepSpec::parse(&text, "sweep.toml")
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with(expected),
                "{message}\nexpected {expected}"
            );
        }
    }

    #[test]
    fn bad_sweep_settings_point_at_the_setting() {
        assert_error(
            "searcher = \"asha\"",
            "searcher = \"bayes\"",
            "sweep.toml:3:12: sweep.searcher: unknown variant `bayes`",
        );
        assert_error(
            "mode = \"max\"",
            "mode = \"best\"",
            "sweep.toml:7:48: sweep.objective.mode: unknown variant `best`",
        );
        assert_error(
            "metric = \"test_accuracy\"",
            "metric = \"objective\"",
            "sweep.toml:7:15: sweep.objective.metric: the job does not report `objective`; \
             it reports train_loss, test_loss, test_accuracy, test_macro_f1, test_recall_0,",
        );
        assert_error(
            "test = { images = \"ti.gz\", labels = \"tl.gz\" }\n",
            "",
            "sweep.toml:7:15: sweep.objective.metric: the job does not report `test_accuracy` \
             (test_* metrics need a test split, [job.dataset.test])",
        );
        assert_error(
            "max_trials = 12",
            "max_trials = 0",
            "sweep.toml:4:1: sweep.max_trials: must be at least 1",
        );
        assert_error(
            "max_trials = 12\n",
            "",
            "sweep.toml:1:2: sweep.max_trials: required",
        );
        assert_error(
            "max_epochs = 9",
            "max_epochs = 9\nmin_epochs = 10",
            "sweep.toml:7:1: sweep.min_epochs: must lie in [1, max_epochs = 9], got 10",
        );
        assert_error(
            "max_epochs = 9",
            "max_epochs = 9\neta = 1",
            "sweep.toml:7:1: sweep.eta: reduction factor eta must be at least 2",
        );
        assert_error(
            "max_epochs = 9",
            "max_epochs = 9\nstopper = \"asha\"",
            "sweep.toml:7:1: sweep.stopper: asha and hyperband stop trials themselves",
        );
        assert_error(
            "max_epochs = 9",
            "max_epochs = 0",
            "sweep.toml:6:1: sweep.max_epochs: must be at least 1",
        );
        assert_error(
            "name = \"fmnist\"",
            "name = \"fmnist\"\nbogus = 1",
            "sweep.toml:3:1: sweep.bogus: unknown field `bogus`",
        );
    }

    #[test]
    fn base_job_errors_point_into_the_job_table() {
        assert_error(
            "classes = 10",
            "classes = 1",
            "sweep.toml:22:1: job.dataset.classes: must be at least 2",
        );
        assert_error(
            "kind = \"cnn\"",
            "kind = \"rnn\"",
            "sweep.toml:27:1: job.model.kind: unknown variant `rnn`",
        );
        assert_error(
            "[job.model]\nkind = \"cnn\"\n",
            "",
            "sweep.toml:15:2: job.model: missing field `model`",
        );
        // The sweep supplies epochs, so the base job may leave them out.
        let without_epochs = GOOD.replace("epochs = 1\n", "");
        assert_eq!(
            SweepSpec::parse(&without_epochs, "s").unwrap().max_epochs,
            9
        );
    }

    #[test]
    fn grid_sweeps_default_to_the_whole_grid() {
        let grid = GOOD
            .replace(
                "searcher = \"asha\"",
                "searcher = \"grid\"\ngrid_points = 2",
            )
            .replace("max_trials = 12\n", "");
        let spec = SweepSpec::parse(&grid, "s").unwrap();
        // lr 2 × momentum 2 × batch 3 × hidden 4.
        assert_eq!(spec.max_trials, 48);
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = SweepSpec::load(Path::new("/nonexistent/sweep.toml")).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/sweep.toml: "),
            "{err}"
        );
    }

    /// Every file in examples/ parses: sweeps (with a `[sweep]` table) as
    /// sweeps, the rest as jobs.
    #[test]
    fn every_example_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
            if table.contains_key("sweep") {
                let spec = SweepSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(spec.max_trials > 0);
            } else {
                JobSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
            }
            seen += 1;
        }
        assert!(seen >= 4, "{seen} examples in {}", dir.display());
    }
}
