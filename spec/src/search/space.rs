//! Search spaces: parameter kinds, validation, sampling and grids.
//!
//! A [`Param`] reads from a spec as it is written there
//! (`{ kind = "log_uniform", low = 0.001, high = 0.3 }`) and is checked as
//! it is read: a deserialised parameter always has a valid domain.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// One hyperparameter's domain.
///
/// Serde reads and writes it tagged by `kind` (`uniform`, `log_uniform`,
/// `int`, `choice`); an `int` may leave out `step` (1) and `log` (false).
/// Deserialising checks the domain ([`Param::check`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    remote = "Self",
    tag = "kind",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Param {
    Uniform {
        low: f64,
        high: f64,
    },
    LogUniform {
        low: f64,
        high: f64,
    },
    /// Integers `low, low+step, …, ≤ high`; with `log`, sampled uniformly in
    /// log space and rounded onto that lattice.
    Int {
        low: i64,
        high: i64,
        #[serde(default = "default_step")]
        step: i64,
        #[serde(default)]
        log: bool,
    },
    Choice {
        values: Vec<Value>,
    },
}

fn default_step() -> i64 {
    1
}

// `remote = "Self"` gives the derived code as inherent functions, so that
// these impls can wrap them: reading checks the domain.
impl Serialize for Param {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Param::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for Param {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let param = Param::deserialize(deserializer)?;
        param.check().map_err(serde::de::Error::custom)?;
        Ok(param)
    }
}

/// What is wrong with a domain.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DomainError {
    #[error("empty range [{low}, {high}] (low must be below high)")]
    EmptyRange { low: String, high: String },
    #[error("log scale needs bounds above 0, got low {low}")]
    NonPositiveLogBound { low: String },
    #[error("step must be positive, got {step}")]
    BadStep { step: i64 },
    #[error("choice needs at least one value")]
    EmptyChoice,
    #[error("bound {value} is not finite")]
    NotFinite { value: f64 },
}

/// What is wrong with a parameter, naming it.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("parameter {name}: {error}")]
pub struct SpaceError {
    pub name: String,
    pub error: DomainError,
}

impl Param {
    /// Checks the domain.
    pub fn check(&self) -> Result<(), DomainError> {
        let empty = |low: String, high: String| DomainError::EmptyRange { low, high };
        match self {
            Param::Uniform { low, high } | Param::LogUniform { low, high } => {
                for value in [*low, *high] {
                    if !value.is_finite() {
                        return Err(DomainError::NotFinite { value });
                    }
                }
                if low >= high {
                    return Err(empty(low.to_string(), high.to_string()));
                }
                if matches!(self, Param::LogUniform { .. }) && *low <= 0.0 {
                    return Err(DomainError::NonPositiveLogBound {
                        low: low.to_string(),
                    });
                }
            }
            Param::Int {
                low,
                high,
                step,
                log,
            } => {
                if low > high {
                    return Err(empty(low.to_string(), high.to_string()));
                }
                if *step <= 0 {
                    return Err(DomainError::BadStep { step: *step });
                }
                if *log && *low <= 0 {
                    return Err(DomainError::NonPositiveLogBound {
                        low: low.to_string(),
                    });
                }
            }
            Param::Choice { values } => {
                if values.is_empty() {
                    return Err(DomainError::EmptyChoice);
                }
            }
        }
        Ok(())
    }

    /// Checks the domain; `name` is used in the error.
    pub fn validate(&self, name: &str) -> Result<(), SpaceError> {
        self.check().map_err(|error| SpaceError {
            name: name.into(),
            error,
        })
    }

    /// One value drawn from the domain.
    pub fn sample(&self, rng: &mut impl Rng) -> Value {
        match self {
            Param::Uniform { low, high } => Value::from(rng.random_range(*low..*high)),
            Param::LogUniform { low, high } => {
                Value::from(rng.random_range(low.ln()..high.ln()).exp())
            }
            Param::Int {
                low,
                high,
                step,
                log,
            } => {
                // Lattice index range 0..=last.
                let last = lattice_len(*low, *high, *step) - 1;
                let index = if *log {
                    let x = rng
                        .random_range((*low as f64).ln()..=(*high as f64).ln())
                        .exp();
                    (((x - *low as f64) / *step as f64).round() as u64).min(last)
                } else {
                    // Drawn as i64 where it fits: the stream of samples
                    // stays what earlier versions drew for the same seed.
                    match i64::try_from(last) {
                        Ok(last) => rng.random_range(0..=last) as u64,
                        Err(_) => rng.random_range(0..=last),
                    }
                };
                self.grid_value(0, index)
            }
            Param::Choice { values } => values[rng.random_range(0..values.len())].clone(),
        }
    }

    /// How many grid points this axis has: every lattice point or choice;
    /// `points` evenly spaced values for continuous domains. Computed, not
    /// enumerated: an integer range of 10^18 costs nothing until it is
    /// walked.
    pub fn grid_len(&self, points: usize) -> u64 {
        match self {
            Param::Uniform { .. } | Param::LogUniform { .. } => points.max(2) as u64,
            Param::Int {
                low, high, step, ..
            } => lattice_len(*low, *high, *step),
            Param::Choice { values } => values.len() as u64,
        }
    }

    /// Grid point `index` (< [`Param::grid_len`]) of this axis; evenly
    /// spaced in log space for log scales.
    pub fn grid_value(&self, points: usize, index: u64) -> Value {
        let points = points.max(2);
        let spaced = |a: f64, b: f64| a + (b - a) * index as f64 / (points - 1) as f64;
        match self {
            Param::Uniform { low, high } => Value::from(spaced(*low, *high)),
            Param::LogUniform { low, high } => Value::from(spaced(low.ln(), high.ln()).exp()),
            Param::Int { low, step, .. } => {
                let value = i128::from(*low) + i128::from(*step) * i128::from(index);
                Value::from(i64::try_from(value).unwrap_or(i64::MAX))
            }
            Param::Choice { values } => values[index as usize].clone(),
        }
    }
}

/// Points `low, low+step, …, ≤ high` (the domain is validated: step > 0,
/// low ≤ high); in i128 so that extreme bounds cannot overflow.
fn lattice_len(low: i64, high: i64, step: i64) -> u64 {
    let span = (i128::from(high) - i128::from(low)) / i128::from(step.max(1));
    u64::try_from(span + 1).unwrap_or(u64::MAX)
}

/// Named parameters; iteration is in name order so sampling is reproducible.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Space {
    params: BTreeMap<String, Param>,
}

impl Space {
    /// Validates every parameter; the first bad one is the error.
    pub fn new(params: BTreeMap<String, Param>) -> Result<Self, SpaceError> {
        for (name, param) in &params {
            param.validate(name)?;
        }
        Ok(Self { params })
    }

    pub fn params(&self) -> &BTreeMap<String, Param> {
        &self.params
    }
}

/// Independent random configurations from a seed.
pub struct Random {
    space: Space,
    rng: ChaCha8Rng,
}

impl Random {
    pub fn new(space: Space, seed: u64) -> Self {
        Self {
            space,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn next_config(&mut self) -> BTreeMap<String, Value> {
        self.space
            .params
            .iter()
            .map(|(name, p)| (name.clone(), p.sample(&mut self.rng)))
            .collect()
    }
}

/// Every combination of the parameters' grid points, first parameter
/// varying slowest. Combinations are made one at a time from their index,
/// so a grid of any size costs the memory of its axes' descriptions.
pub struct Grid {
    /// (name, domain, points on this axis).
    axes: Vec<(String, Param, u64)>,
    points: usize,
    /// Combinations in all; `None` when that exceeds `u64`.
    size: Option<u64>,
    next: u64,
}

impl Grid {
    /// `points` is used for continuous parameters.
    pub fn new(space: &Space, points: usize) -> Self {
        let axes: Vec<(String, Param, u64)> = space
            .params
            .iter()
            .map(|(n, p)| (n.clone(), p.clone(), p.grid_len(points)))
            .collect();
        let size = axes
            .iter()
            .try_fold(1u64, |size, (_, _, len)| size.checked_mul(*len));
        Self {
            axes,
            points,
            size,
            next: 0,
        }
    }

    /// Combinations in the grid, or `None` when there are more than
    /// `u64::MAX`.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The next combination, or `None` once the grid is exhausted.
    pub fn next_config(&mut self) -> Option<BTreeMap<String, Value>> {
        if self.size.is_some_and(|size| self.next >= size) {
            return None;
        }
        let mut rest = self.next;
        self.next += 1;
        let mut config = BTreeMap::new();
        for (name, param, len) in self.axes.iter().rev() {
            config.insert(name.clone(), param.grid_value(self.points, rest % len));
            rest /= len;
        }
        Some(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Space {
        Space::new(BTreeMap::from([
            (
                "lr".to_string(),
                Param::LogUniform {
                    low: 1e-4,
                    high: 1e-1,
                },
            ),
            (
                "momentum".to_string(),
                Param::Uniform {
                    low: 0.8,
                    high: 0.99,
                },
            ),
            (
                "batch".to_string(),
                Param::Int {
                    low: 32,
                    high: 256,
                    step: 32,
                    log: true,
                },
            ),
            (
                "opt".to_string(),
                Param::Choice {
                    values: vec![Value::from("sgd"), Value::from("adam")],
                },
            ),
        ]))
        .unwrap()
    }

    #[test]
    fn bad_domains_name_the_parameter() {
        let err = |p: Param| p.validate("x").unwrap_err().to_string();
        assert!(err(Param::Uniform {
            low: 1.0,
            high: 1.0
        })
        .contains("parameter x: empty range"));
        assert!(err(Param::LogUniform {
            low: 0.0,
            high: 1.0
        })
        .contains("log scale needs bounds above 0"));
        assert!(err(Param::Int {
            low: 1,
            high: 5,
            step: 0,
            log: false
        })
        .contains("step must be positive"));
        assert!(err(Param::Choice { values: vec![] }).contains("at least one value"));
        assert!(err(Param::Uniform {
            low: f64::NAN,
            high: 1.0
        })
        .contains("not finite"));
    }

    #[test]
    fn params_read_and_write_tagged_by_kind_and_are_checked_as_they_are_read() {
        let int: Param = serde_json::from_str(r#"{"kind": "int", "low": 1, "high": 9}"#).unwrap();
        let expected = Param::Int {
            low: 1,
            high: 9,
            step: 1,
            log: false,
        };
        assert_eq!(int, expected);
        for param in [int, space().params()["opt"].clone()] {
            let json = serde_json::to_value(&param).unwrap();
            assert_eq!(serde_json::from_value::<Param>(json).unwrap(), param);
        }
        let err = |json: &str| serde_json::from_str::<Param>(json).unwrap_err().to_string();
        assert!(
            err(r#"{"kind": "uniform", "low": 1.0, "high": 1.0}"#)
                .starts_with("empty range [1, 1] (low must be below high)"),
            "{}",
            err(r#"{"kind": "uniform", "low": 1.0, "high": 1.0}"#)
        );
        assert!(err(r#"{"kind": "choice", "values": []}"#).contains("at least one value"));
        assert!(err(r#"{"kind": "gaussian"}"#).contains("unknown variant `gaussian`"));
        assert!(
            err(r#"{"kind": "int", "low": 1, "high": 2, "by": 1}"#).contains("unknown field `by`")
        );
    }

    #[test]
    fn samples_stay_in_their_domains_and_replay_from_the_seed() {
        let mut a = Random::new(space(), 7);
        let mut b = Random::new(space(), 7);
        for _ in 0..500 {
            let config = a.next_config();
            assert_eq!(config, b.next_config());
            let lr = config["lr"].as_f64().unwrap();
            assert!((1e-4..1e-1).contains(&lr), "{lr}");
            let m = config["momentum"].as_f64().unwrap();
            assert!((0.8..0.99).contains(&m));
            let batch = config["batch"].as_i64().unwrap();
            assert!((32..=256).contains(&batch) && batch % 32 == 0, "{batch}");
            assert!(["sgd", "adam"].contains(&config["opt"].as_str().unwrap()));
        }
        assert_ne!(
            Random::new(space(), 8).next_config(),
            Random::new(space(), 7).next_config()
        );
    }

    #[test]
    fn grid_enumerates_every_combination_once() {
        let space = Space::new(BTreeMap::from([
            (
                "a".to_string(),
                Param::Int {
                    low: 1,
                    high: 3,
                    step: 1,
                    log: false,
                },
            ),
            (
                "b".to_string(),
                Param::Choice {
                    values: vec![Value::from(true), Value::from(false)],
                },
            ),
        ]))
        .unwrap();
        let mut grid = Grid::new(&space, 3);
        assert_eq!(grid.size(), Some(6));
        let mut seen = Vec::new();
        while let Some(c) = grid.next_config() {
            seen.push((c["a"].as_i64().unwrap(), c["b"].as_bool().unwrap()));
        }
        assert_eq!(
            seen,
            [
                (1, true),
                (1, false),
                (2, true),
                (2, false),
                (3, true),
                (3, false)
            ]
        );
        let lr = Param::LogUniform {
            low: 1e-3,
            high: 1e-1,
        }
        .grid_value(3, 1);
        assert!((lr.as_f64().unwrap() - 1e-2).abs() < 1e-12);
    }

    #[test]
    fn a_huge_grid_is_sized_without_being_built() {
        let wide = |low, high| Param::Int {
            low,
            high,
            step: 1,
            log: false,
        };
        let space = Space::new(BTreeMap::from([
            ("a".to_string(), wide(i64::MIN, i64::MAX)),
            ("b".to_string(), wide(0, 1)),
        ]))
        .unwrap();
        let mut grid = Grid::new(&space, 4_000_000_000);
        assert_eq!(grid.size(), None, "2^64 · 2 combinations overflow u64");
        let first = grid.next_config().unwrap();
        assert_eq!(first["a"], i64::MIN);
        assert_eq!(first["b"], 0);
        assert_eq!(grid.next_config().unwrap()["b"], 1);
        let space = Space::new(BTreeMap::from([
            (
                "x".to_string(),
                Param::Uniform {
                    low: 0.0,
                    high: 1.0,
                },
            ),
            ("y".to_string(), wide(0, 999_999)),
        ]))
        .unwrap();
        assert_eq!(
            Grid::new(&space, 4_000_000_000).size(),
            Some(4_000_000_000_000_000)
        );
    }
}
