//! Search spaces: parameter kinds, validation, sampling and grids.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// One hyperparameter's domain.
#[derive(Clone, Debug, PartialEq)]
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
        step: i64,
        log: bool,
    },
    Choice(Vec<Value>),
}

/// What is wrong with a parameter, naming it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpaceError {
    #[error("parameter {name}: empty range [{low}, {high}] (low must be below high)")]
    EmptyRange {
        name: String,
        low: String,
        high: String,
    },
    #[error("parameter {name}: log scale needs bounds above 0, got low {low}")]
    NonPositiveLogBound { name: String, low: String },
    #[error("parameter {name}: step must be positive, got {step}")]
    BadStep { name: String, step: i64 },
    #[error("parameter {name}: choice needs at least one value")]
    EmptyChoice { name: String },
    #[error("parameter {name}: bound {value} is not finite")]
    NotFinite { name: String, value: f64 },
}

impl Param {
    /// Checks the domain; `name` is used in the error.
    pub fn validate(&self, name: &str) -> Result<(), SpaceError> {
        let empty = |low: String, high: String| SpaceError::EmptyRange {
            name: name.into(),
            low,
            high,
        };
        match self {
            Param::Uniform { low, high } | Param::LogUniform { low, high } => {
                for v in [*low, *high] {
                    if !v.is_finite() {
                        return Err(SpaceError::NotFinite {
                            name: name.into(),
                            value: v,
                        });
                    }
                }
                if low >= high {
                    return Err(empty(low.to_string(), high.to_string()));
                }
                if matches!(self, Param::LogUniform { .. }) && *low <= 0.0 {
                    return Err(SpaceError::NonPositiveLogBound {
                        name: name.into(),
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
                    return Err(SpaceError::BadStep {
                        name: name.into(),
                        step: *step,
                    });
                }
                if *log && *low <= 0 {
                    return Err(SpaceError::NonPositiveLogBound {
                        name: name.into(),
                        low: low.to_string(),
                    });
                }
            }
            Param::Choice(values) => {
                if values.is_empty() {
                    return Err(SpaceError::EmptyChoice { name: name.into() });
                }
            }
        }
        Ok(())
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
                let points = (high - low) / step; // lattice index range 0..=points
                let index = if *log {
                    let x = rng
                        .random_range((*low as f64).ln()..=(*high as f64).ln())
                        .exp();
                    (((x - *low as f64) / *step as f64).round() as i64).clamp(0, points)
                } else {
                    rng.random_range(0..=points)
                };
                Value::from(low + index * step)
            }
            Param::Choice(values) => values[rng.random_range(0..values.len())].clone(),
        }
    }

    /// Grid points: every lattice point or choice; `points` evenly spaced
    /// values (in log space for log scales) for continuous domains.
    pub fn grid(&self, points: usize) -> Vec<Value> {
        let points = points.max(2);
        let spaced =
            |a: f64, b: f64| (0..points).map(move |i| a + (b - a) * i as f64 / (points - 1) as f64);
        match self {
            Param::Uniform { low, high } => spaced(*low, *high).map(Value::from).collect(),
            Param::LogUniform { low, high } => spaced(low.ln(), high.ln())
                .map(|x| Value::from(x.exp()))
                .collect(),
            Param::Int {
                low, high, step, ..
            } => (*low..=*high)
                .step_by(*step as usize)
                .map(Value::from)
                .collect(),
            Param::Choice(values) => values.clone(),
        }
    }
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
/// varying slowest.
pub struct Grid {
    axes: Vec<(String, Vec<Value>)>,
    next: usize,
}

impl Grid {
    /// `points` is used for continuous parameters.
    pub fn new(space: &Space, points: usize) -> Self {
        let axes = space
            .params
            .iter()
            .map(|(n, p)| (n.clone(), p.grid(points)))
            .collect();
        Self { axes, next: 0 }
    }

    pub fn len(&self) -> usize {
        self.axes.iter().map(|(_, v)| v.len()).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next combination, or `None` once the grid is exhausted.
    pub fn next_config(&mut self) -> Option<BTreeMap<String, Value>> {
        if self.next >= self.len() {
            return None;
        }
        let mut rest = self.next;
        self.next += 1;
        let mut config = BTreeMap::new();
        for (name, values) in self.axes.iter().rev() {
            config.insert(name.clone(), values[rest % values.len()].clone());
            rest /= values.len();
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
                Param::Choice(vec![Value::from("sgd"), Value::from("adam")]),
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
        assert!(err(Param::Choice(vec![])).contains("at least one value"));
        assert!(err(Param::Uniform {
            low: f64::NAN,
            high: 1.0
        })
        .contains("not finite"));
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
                Param::Choice(vec![Value::from(true), Value::from(false)]),
            ),
        ]))
        .unwrap();
        let mut grid = Grid::new(&space, 3);
        assert_eq!(grid.len(), 6);
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
        .grid(3);
        assert!((lr[1].as_f64().unwrap() - 1e-2).abs() < 1e-12);
    }
}
