//! TPE, the Tree-structured Parzen Estimator (Bergstra et al., "Algorithms
//! for Hyper-Parameter Optimization", NeurIPS 2011), by default in the
//! multivariate form of Falkner et al. (BOHB, ICML 2018) that Optuna's
//! `TPESampler` uses by default since 5.0.
//!
//! ```text
//!  observations ──sort by objective──▶ best γ·n  = "good" ──▶ l(x)  (Parzen)
//!                                      the rest = "bad"  ──▶ g(x)  (Parzen)
//!  draw candidates from l, keep the one maximising l(x)/g(x)
//! ```
//!
//! Each estimator is a mixture with one component per observation plus a
//! wide prior component. Multivariate: a component is a product of one
//! kernel per parameter, so a candidate keeps the parameter combination of
//! the observation it was drawn around, and l/g is the ratio of joint
//! densities. Independent (`multivariate = false`): one mixture per
//! parameter, each parameter chosen on its own. Continuous and integer
//! parameters use truncated Gaussian kernels (in log space for log scales);
//! choices use categorical kernels that put one extra count on the observed
//! option. Older observations weigh less once there are more than 25, and
//! the first `startup_trials` configurations are random, all as Optuna.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::space::{Param, Space};
use crate::Mode;

/// TPE settings (defaults as Optuna's: the best 10% count as good, at most
/// 25 of them; parameters modelled jointly).
///
/// A sweep spec's `[sweep.tpe]` table reads straight into it: omitted keys
/// keep their defaults, and `gamma` and `candidates` are checked as they
/// are read, so an error names the key and its line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TpeOptions {
    pub startup_trials: usize,
    /// Fraction of observations counted as good, in (0, 1).
    #[serde(deserialize_with = "fraction")]
    pub gamma: f64,
    /// At most this many observations count as good. Not read from specs
    /// (Optuna does not expose it either): it keeps its default there.
    #[serde(skip)]
    pub max_good: usize,
    /// Candidates drawn from l(x) per suggestion, at least 1.
    #[serde(deserialize_with = "at_least_one")]
    pub candidates: usize,
    /// Model the parameters jointly (one mixture over all of them) rather
    /// than one independent mixture per parameter.
    pub multivariate: bool,
}

impl Default for TpeOptions {
    fn default() -> Self {
        Self {
            startup_trials: 10,
            gamma: 0.1,
            max_good: 25,
            candidates: 24,
            multivariate: true,
        }
    }
}

fn fraction<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let gamma = f64::deserialize(deserializer)?;
    if gamma > 0.0 && gamma < 1.0 {
        Ok(gamma)
    } else {
        Err(D::Error::custom(format!("must lie in (0, 1), got {gamma}")))
    }
}

fn at_least_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    match usize::deserialize(deserializer)? {
        0 => Err(D::Error::custom("must be at least 1")),
        n => Ok(n),
    }
}

/// What TPE knows of a trial it proposed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TrialOutcome {
    /// Proposed and not finished (running, queued, or waiting to resume):
    /// counted among the bad, so parallel proposals spread out (Optuna's
    /// constant liar).
    Running,
    /// Stopped, or paused, after `epochs` epochs with `value` as its latest
    /// objective: ranked below every completed trial, those that got
    /// further first, then by value (Optuna's pruned trials).
    Pruned { epochs: u32, value: f64 },
    /// Finished with this objective.
    Completed(f64),
}

/// A TPE searcher over `space`.
///
/// Every suggestion is a function of the seed, the trial's number and what
/// is known of the trials of lower numbers: trials weigh by number, not by
/// when they were reported, and each suggestion draws from its own seeded
/// stream. A searcher rebuilt from stored trial records after a failover
/// therefore proposes exactly what the uninterrupted one would have.
pub struct Tpe {
    params: Vec<(String, Param)>,
    mode: Mode,
    options: TpeOptions,
    seed: u64,
    /// By trial number: each parameter's value in the estimators'
    /// coordinates (see [`Coordinate`]), and what became of the trial.
    trials: BTreeMap<u64, (Vec<f64>, TrialOutcome)>,
}

impl Tpe {
    pub fn new(space: Space, mode: Mode, options: TpeOptions, seed: u64) -> Self {
        Self {
            params: space
                .params()
                .iter()
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
            mode,
            options,
            seed,
            trials: BTreeMap::new(),
        }
    }

    /// Records (or updates) what is known of trial `number`. Completed
    /// trials with a NaN objective, and configurations that are not points
    /// of the space, are forgotten.
    pub fn observe(
        &mut self,
        number: u64,
        config: &BTreeMap<String, Value>,
        outcome: TrialOutcome,
    ) {
        let point: Option<Vec<f64>> = self
            .params
            .iter()
            .map(|(name, param)| param.coordinate(config.get(name)?))
            .collect();
        match point {
            Some(point) if !matches!(outcome, TrialOutcome::Completed(v) if v.is_nan()) => {
                self.trials.insert(number, (point, outcome));
            }
            _ => self.forget(number),
        }
    }

    /// Drops trial `number` (it failed, or was cancelled before it ran).
    pub fn forget(&mut self, number: u64) {
        self.trials.remove(&number);
    }

    /// The configuration of trial `number`, which counts as running until
    /// it is observed.
    pub fn next_config(&mut self, number: u64) -> BTreeMap<String, Value> {
        let mut rng = ChaCha8Rng::seed_from_u64(suggestion_seed(self.seed, number));
        let point = match self.split() {
            Some((good, bad)) => self.suggest(&good, &bad, &mut rng),
            None => self
                .params
                .iter()
                .map(|(_, p)| {
                    p.coordinate(&p.sample(&mut rng))
                        .expect("a sampled value is a point of its parameter")
                })
                .collect(),
        };
        let config = self
            .params
            .iter()
            .zip(&point)
            .map(|((name, param), &x)| (name.clone(), param.value_at(x)))
            .collect();
        self.observe(number, &config, TrialOutcome::Running);
        config
    }

    /// The candidate maximising l(x)/g(x), per group of parameters (all of
    /// them together when multivariate).
    fn suggest(&self, good: &[&[f64]], bad: &[&[f64]], rng: &mut ChaCha8Rng) -> Vec<f64> {
        let all: Vec<usize> = (0..self.params.len()).collect();
        let groups: Vec<Vec<usize>> = if self.options.multivariate {
            vec![all]
        } else {
            all.into_iter().map(|i| vec![i]).collect()
        };
        let mut point = vec![0.0; self.params.len()];
        for dims in groups {
            let l = Parzen::new(&self.params, &dims, good);
            let g = Parzen::new(&self.params, &dims, bad);
            let chosen = (0..self.options.candidates.max(1))
                .map(|_| l.sample(rng))
                .map(|x| {
                    let score = l.log_pdf(&x) - g.log_pdf(&x);
                    (x, score)
                })
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(x, _)| x)
                .expect("at least one candidate");
            for (&dim, x) in dims.iter().zip(chosen) {
                point[dim] = x;
            }
        }
        point
    }

    /// The good and the bad trials' points, each in trial-number order
    /// (which decides their weights), as Optuna splits them: the best
    /// ⌈γ·n⌉ (at most `max_good`) of the n finished trials are good,
    /// completed ones first, then pruned ones by epochs reached and value;
    /// running trials are bad. `None` during start-up.
    #[allow(clippy::type_complexity)]
    fn split(&self) -> Option<(Vec<&[f64]>, Vec<&[f64]>)> {
        let ranked = |value: f64| match self.mode {
            Mode::Min => value,
            Mode::Max => -value,
        };
        // Sort keys: completed trials before pruned ones; pruned ones that
        // got further first; then the value (NaN last).
        let mut finished: Vec<(u64, (u8, i64, f64))> = self
            .trials
            .iter()
            .filter_map(|(&number, (_, outcome))| match *outcome {
                TrialOutcome::Running => None,
                TrialOutcome::Completed(v) => Some((number, (0, 0, ranked(v)))),
                TrialOutcome::Pruned { epochs, value } => {
                    let value = if value.is_nan() {
                        f64::INFINITY
                    } else {
                        ranked(value)
                    };
                    Some((number, (1, -i64::from(epochs), value)))
                }
            })
            .collect();
        let n = finished.len();
        if n < self.options.startup_trials.max(2) {
            return None;
        }
        finished.sort_by(|(a, ka), (b, kb)| {
            (ka.0, ka.1)
                .cmp(&(kb.0, kb.1))
                .then(ka.2.total_cmp(&kb.2))
                .then(a.cmp(b))
        });
        let good_count = ((self.options.gamma * n as f64).ceil() as usize)
            .min(self.options.max_good)
            .clamp(1, n - 1);
        let good: std::collections::BTreeSet<u64> = finished[..good_count]
            .iter()
            .map(|(number, _)| *number)
            .collect();
        let (mut l, mut g) = (Vec::new(), Vec::new());
        for (number, (point, _)) in &self.trials {
            if good.contains(number) {
                l.push(point.as_slice());
            } else {
                g.push(point.as_slice());
            }
        }
        Some((l, g))
    }
}

/// The seed of trial `number`'s suggestion (SplitMix64 of both).
fn suggestion_seed(seed: u64, number: u64) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    mix(mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ number)
}

/// Where a parameter's values live for the estimators: the value itself,
/// its logarithm on log scales, an option's index for choices.
trait Coordinate {
    fn coordinate(&self, value: &Value) -> Option<f64>;
    /// The parameter's value nearest to coordinate `x`.
    fn value_at(&self, x: f64) -> Value;
    /// Continuous coordinates: their range; `None` for choices.
    fn range(&self) -> Option<(f64, f64)>;
}

impl Coordinate for Param {
    fn coordinate(&self, value: &Value) -> Option<f64> {
        match self {
            Param::Uniform { .. } => value.as_f64(),
            Param::LogUniform { .. } => value.as_f64().filter(|x| *x > 0.0).map(f64::ln),
            Param::Int { log: false, .. } => value.as_f64(),
            Param::Int { log: true, .. } => value.as_f64().filter(|x| *x > 0.0).map(f64::ln),
            Param::Choice { values } => values.iter().position(|o| o == value).map(|i| i as f64),
        }
    }

    fn value_at(&self, x: f64) -> Value {
        match self {
            Param::Uniform { low, high } => x.clamp(*low, *high).into(),
            Param::LogUniform { low, high } => x.exp().clamp(*low, *high).into(),
            Param::Int {
                low,
                high,
                step,
                log,
            } => {
                let x = if *log { x.exp() } else { x };
                let index = ((x - *low as f64) / *step as f64).round() as i64;
                Value::from((low + index * step).clamp(*low, *high))
            }
            Param::Choice { values } => {
                let index = (x.round().max(0.0) as usize).min(values.len() - 1);
                values[index].clone()
            }
        }
    }

    fn range(&self) -> Option<(f64, f64)> {
        match self {
            Param::Uniform { low, high } => Some((*low, *high)),
            Param::LogUniform { low, high } => Some((low.ln(), high.ln())),
            Param::Int {
                low,
                high,
                log: false,
                ..
            } => Some((*low as f64, *high as f64)),
            Param::Int {
                low,
                high,
                log: true,
                ..
            } => Some(((*low as f64).ln(), (*high as f64).ln())),
            Param::Choice { .. } => None,
        }
    }
}

/// One parameter's kernels, one per component of a [`Parzen`] mixture.
enum Kernels {
    /// Gaussians truncated to `[low, high]`, with the log of the mass each
    /// keeps inside it.
    Continuous {
        mus: Vec<f64>,
        sigmas: Vec<f64>,
        log_masses: Vec<f64>,
        low: f64,
        high: f64,
    },
    /// Per component, the probability of each option.
    Choice { probabilities: Vec<Vec<f64>> },
}

/// A Parzen estimator over some of the parameters: a mixture with one
/// component per observation and a last, wide prior component; each
/// component a product of one kernel per parameter.
struct Parzen {
    /// Component weights, summing to 1.
    weights: Vec<f64>,
    kernels: Vec<Kernels>,
}

/// The newest observations that keep full weight (Optuna's default).
const FULL_WEIGHT_OBSERVATIONS: usize = 25;

impl Parzen {
    /// The estimator of `set` (points in trial-number order) over the
    /// parameters `dims` of `params`.
    fn new(params: &[(String, Param)], dims: &[usize], set: &[&[f64]]) -> Self {
        let n = set.len();
        let components = n + 1;
        // Older observations ramp up to full weight; the prior weighs 1.
        let mut weights: Vec<f64> = (0..n)
            .map(|i| {
                let ramp = n.saturating_sub(FULL_WEIGHT_OBSERVATIONS);
                if i >= ramp {
                    1.0
                } else if ramp == 1 {
                    1.0 / n as f64
                } else {
                    let t = i as f64 / (ramp - 1) as f64;
                    1.0 / n as f64 + t * (1.0 - 1.0 / n as f64)
                }
            })
            .collect();
        weights.push(1.0);
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        let kernels = dims
            .iter()
            .map(|&dim| {
                let values: Vec<f64> = set.iter().map(|point| point[dim]).collect();
                match (&params[dim].1, params[dim].1.range()) {
                    (_, Some((low, high))) => Kernels::continuous(values, low, high),
                    (Param::Choice { values: options }, None) => {
                        Kernels::choice(&values, options.len())
                    }
                    (_, None) => unreachable!("only choices have no range"),
                }
            })
            .collect();
        debug_assert_eq!(weights.len(), components);
        Self { weights, kernels }
    }

    fn sample(&self, rng: &mut impl Rng) -> Vec<f64> {
        let k = sample_index(&self.weights, rng);
        self.kernels
            .iter()
            .map(|kernels| match kernels {
                Kernels::Continuous {
                    mus,
                    sigmas,
                    low,
                    high,
                    ..
                } => {
                    let (mu, sigma) = (mus[k], sigmas[k]);
                    (0..100)
                        .map(|_| mu + sigma * standard_normal(rng))
                        .find(|x| (*low..=*high).contains(x))
                        .unwrap_or_else(|| mu.clamp(*low, *high))
                }
                Kernels::Choice { probabilities } => sample_index(&probabilities[k], rng) as f64,
            })
            .collect()
    }

    /// log of the mixture's density at `x` (one coordinate per dimension).
    fn log_pdf(&self, x: &[f64]) -> f64 {
        let per_component: Vec<f64> = (0..self.weights.len())
            .map(|k| {
                self.weights[k].ln()
                    + self
                        .kernels
                        .iter()
                        .zip(x)
                        .map(|(kernels, &x)| kernels.log_pdf(k, x))
                        .sum::<f64>()
            })
            .collect();
        let max = per_component
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            return max;
        }
        max + per_component
            .iter()
            .map(|l| (l - max).exp())
            .sum::<f64>()
            .ln()
    }
}

impl Kernels {
    /// One Gaussian per value plus the prior N(mid, span). Bandwidths: each
    /// value's larger gap to its neighbours ([`neighbour_gaps`]), clipped to
    /// [span / min(100, 1 + components), span] (Optuna's rule, in both of
    /// its modes).
    fn continuous(values: Vec<f64>, low: f64, high: f64) -> Self {
        let span = high - low;
        let n = values.len();
        let mut sigmas = neighbour_gaps(&values, low, high);
        let min_sigma = span / (100.0f64).min(1.0 + (n + 1) as f64);
        sigmas
            .iter_mut()
            .for_each(|s| *s = s.clamp(min_sigma, span));
        let mut mus = values;
        mus.push(low + span / 2.0);
        sigmas.push(span);
        let log_masses = mus
            .iter()
            .zip(&sigmas)
            .map(|(&mu, &sigma)| {
                let mass = normal_cdf((high - mu) / sigma) - normal_cdf((low - mu) / sigma);
                mass.max(1e-12).ln()
            })
            .collect();
        Kernels::Continuous {
            mus,
            sigmas,
            log_masses,
            low,
            high,
        }
    }

    /// Each observed option's component puts one extra count on it over a
    /// prior of 1 spread across the options; the prior component is
    /// uniform.
    fn choice(values: &[f64], options: usize) -> Self {
        let components = values.len() + 1;
        let flat = 1.0 / components as f64;
        let mut probabilities: Vec<Vec<f64>> = values
            .iter()
            .map(|&v| {
                let mut row = vec![flat; options];
                row[v as usize] += 1.0;
                let total: f64 = row.iter().sum();
                row.iter().map(|p| p / total).collect()
            })
            .collect();
        probabilities.push(vec![1.0 / options as f64; options]);
        Kernels::Choice { probabilities }
    }

    fn log_pdf(&self, component: usize, x: f64) -> f64 {
        match self {
            Kernels::Continuous {
                mus,
                sigmas,
                log_masses,
                ..
            } => {
                let (mu, sigma) = (mus[component], sigmas[component]);
                let z = (x - mu) / sigma;
                -0.5 * z * z
                    - sigma.ln()
                    - 0.5 * (2.0 * std::f64::consts::PI).ln()
                    - log_masses[component]
            }
            Kernels::Choice { probabilities } => {
                probabilities[component][x as usize].max(1e-300).ln()
            }
        }
    }
}

/// Each value's larger distance to its neighbours in sorted order, the
/// range's ends bounding the outermost ones (Optuna's univariate rule).
/// With more than one value, the outermost values' gaps ignore the ends.
fn neighbour_gaps(values: &[f64], low: f64, high: f64) -> Vec<f64> {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let sorted: Vec<f64> = std::iter::once(low)
        .chain(order.iter().map(|&i| values[i]))
        .chain(std::iter::once(high))
        .collect();
    let mut gaps: Vec<f64> = (1..=n)
        .map(|i| (sorted[i] - sorted[i - 1]).max(sorted[i + 1] - sorted[i]))
        .collect();
    if n >= 2 {
        gaps[0] = sorted[2] - sorted[1];
        gaps[n - 1] = sorted[n] - sorted[n - 1];
    }
    let mut by_value = vec![0.0; n];
    for (rank, &i) in order.iter().enumerate() {
        by_value[i] = gaps[rank];
    }
    by_value
}

fn sample_index(weights: &[f64], rng: &mut impl Rng) -> usize {
    let mut u: f64 = rng.random_range(0.0..1.0);
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

fn standard_normal(rng: &mut impl Rng) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Φ(z) through erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    0.5 * (1.0 + if x >= 0.0 { erf } else { -erf })
}
#[cfg(test)]
mod tests {
    use super::super::space::Random;
    use super::*;
    use crate::synthetic::hartmann6;

    fn unit_cube(dims: usize) -> Space {
        Space::new(
            (0..dims)
                .map(|i| {
                    (
                        format!("x{i}"),
                        Param::Uniform {
                            low: 0.0,
                            high: 1.0,
                        },
                    )
                })
                .collect(),
        )
        .unwrap()
    }

    fn point(config: &BTreeMap<String, Value>) -> [f64; 6] {
        let mut x = [0.0; 6];
        for (i, v) in x.iter_mut().enumerate() {
            *v = config[&format!("x{i}")].as_f64().unwrap();
        }
        x
    }

    fn best_of_random(seed: u64, trials: usize) -> f64 {
        let mut random = Random::new(unit_cube(6), seed);
        (0..trials)
            .map(|_| hartmann6(&point(&random.next_config())))
            .fold(f64::INFINITY, f64::min)
    }

    fn best_of_tpe(seed: u64, trials: usize) -> f64 {
        let mut tpe = Tpe::new(unit_cube(6), Mode::Min, TpeOptions::default(), seed);
        let mut best = f64::INFINITY;
        for number in 0..trials as u64 {
            let config = tpe.next_config(number);
            let y = hartmann6(&point(&config));
            best = best.min(y);
            tpe.observe(number, &config, TrialOutcome::Completed(y));
        }
        best
    }

    fn median(mut xs: Vec<f64>) -> f64 {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    }

    #[test]
    fn tpe_beats_random_search_on_hartmann6_at_100_trials() {
        let seeds = [1, 2, 3, 4, 5];
        let tpe = median(seeds.iter().map(|&s| best_of_tpe(s, 100)).collect());
        let random = median(seeds.iter().map(|&s| best_of_random(s, 100)).collect());
        eprintln!(
            "median best after 100 trials: TPE {tpe:.4}, random {random:.4} (optimum -3.3224)"
        );
        assert!(tpe < random, "TPE {tpe} should beat random {random}");
    }

    /// Good points at (0.2, 0.2) and (0.8, 0.8), bad ones at the other two
    /// corners: each coordinate alone looks the same in both sets, so only
    /// an estimator that keeps the coordinates together tells them apart.
    #[test]
    fn the_multivariate_estimator_keeps_parameters_together() {
        let corners = |pairs: &[(f64, f64)]| -> Vec<(Vec<f64>, f64)> {
            (0..8)
                .flat_map(|_| pairs.iter().map(|&(x, y)| (vec![x, y], 0.0)))
                .collect()
        };
        let good = corners(&[(0.2, 0.2), (0.8, 0.8)]);
        let bad = corners(&[(0.2, 0.8), (0.8, 0.2)]);
        let params: Vec<(String, Param)> = unit_cube(2)
            .params()
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        fn refs(set: &[(Vec<f64>, f64)]) -> Vec<&[f64]> {
            set.iter().map(|(point, _)| point.as_slice()).collect()
        }
        let (l, g) = (
            Parzen::new(&params, &[0, 1], &refs(&good)),
            Parzen::new(&params, &[0, 1], &refs(&bad)),
        );
        let ratio = |x: f64, y: f64| l.log_pdf(&[x, y]) - g.log_pdf(&[x, y]);
        assert!(ratio(0.2, 0.2) > 1.0 && ratio(0.8, 0.8) > 1.0);
        assert!(ratio(0.2, 0.8) < -1.0 && ratio(0.8, 0.2) < -1.0);
        // Drawn from l, a candidate stays on the diagonal unless it comes
        // from the prior component (1 in 17).
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let off_diagonal = (0..1000)
            .map(|_| l.sample(&mut rng))
            .filter(|x| (x[0] - 0.5).signum() != (x[1] - 0.5).signum())
            .count();
        assert!(
            off_diagonal < 100,
            "{off_diagonal} of 1000 off the diagonal"
        );
        // One mixture per coordinate cannot see the difference.
        let (lx, gx) = (
            Parzen::new(&params, &[0], &refs(&good)),
            Parzen::new(&params, &[0], &refs(&bad)),
        );
        let marginal = lx.log_pdf(&[0.2]) - gx.log_pdf(&[0.2]);
        assert!(marginal.abs() < 1e-9, "{marginal}");
    }

    /// The mixture is a density: it integrates to 1 over its domain (by the
    /// midpoint rule on a grid), jointly and per parameter, with the
    /// weights of more than 25 observations ramped.
    #[test]
    fn parzen_estimators_integrate_to_one() {
        let params: Vec<(String, Param)> = vec![
            (
                "a".into(),
                Param::Uniform {
                    low: -1.0,
                    high: 2.0,
                },
            ),
            (
                "b".into(),
                Param::LogUniform {
                    low: 1e-3,
                    high: 1.0,
                },
            ),
            (
                "c".into(),
                Param::Choice {
                    values: vec![Value::from(1), Value::from(2), Value::from(3)],
                },
            ),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let observations: Vec<(Vec<f64>, f64)> = (0..30)
            .map(|i| {
                let point = params
                    .iter()
                    .map(|(_, p)| p.coordinate(&p.sample(&mut rng)).unwrap())
                    .collect();
                (point, i as f64)
            })
            .collect();
        let set: Vec<&[f64]> = observations.iter().map(|(p, _)| p.as_slice()).collect();
        let steps = 400;
        let grid = |(low, high): (f64, f64)| -> Vec<(f64, f64)> {
            let h = (high - low) / steps as f64;
            (0..steps)
                .map(|i| (low + (i as f64 + 0.5) * h, h))
                .collect()
        };
        let (a, b) = (
            grid(params[0].1.range().unwrap()),
            grid(params[1].1.range().unwrap()),
        );
        let joint = Parzen::new(&params, &[0, 1, 2], &set);
        let mut total = 0.0;
        for &(x, hx) in &a {
            for &(y, hy) in &b {
                for c in 0..3 {
                    total += joint.log_pdf(&[x, y, c as f64]).exp() * hx * hy;
                }
            }
        }
        assert!((total - 1.0).abs() < 1e-3, "joint mass {total}");
        let alone = Parzen::new(&params, &[1], &set);
        let mass: f64 = b.iter().map(|&(y, h)| alone.log_pdf(&[y]).exp() * h).sum();
        assert!((mass - 1.0).abs() < 1e-4, "marginal mass {mass}");
    }

    #[test]
    fn weights_ramp_as_optunas_and_gaps_follow_the_neighbours() {
        // Optuna's default_weights(30): linspace(1/30, 1, 5) then 25 ones,
        // then the prior's 1, normalised.
        let params = vec![(
            "x".to_string(),
            Param::Uniform {
                low: 0.0,
                high: 1.0,
            },
        )];
        let observations: Vec<(Vec<f64>, f64)> =
            (0..30).map(|i| (vec![i as f64 / 30.0], 0.0)).collect();
        let set: Vec<&[f64]> = observations.iter().map(|(p, _)| p.as_slice()).collect();
        let parzen = Parzen::new(&params, &[0], &set);
        let first = 1.0 / 30.0;
        let ramp: Vec<f64> = (0..5)
            .map(|i| first + i as f64 * (1.0 - first) / 4.0)
            .collect();
        let total: f64 = ramp.iter().sum::<f64>() + 26.0;
        for (i, expected) in ramp.iter().chain(&[1.0; 26]).enumerate() {
            assert!(
                (parzen.weights[i] - expected / total).abs() < 1e-12,
                "weight {i}: {} vs {}",
                parzen.weights[i],
                expected / total
            );
        }
        // Values 0.5, 0.1, 0.3 on [0, 1]: sorted 0.1, 0.3, 0.5; the ends'
        // gaps ignore the range's ends; the middle one takes its larger gap.
        let gaps = neighbour_gaps(&[0.5, 0.1, 0.3], 0.0, 1.0);
        let expected = [0.2, 0.2, 0.2];
        for (g, e) in gaps.iter().zip(expected) {
            assert!((g - e).abs() < 1e-12, "{gaps:?}");
        }
        let gaps = neighbour_gaps(&[0.7, 0.1, 0.2], 0.0, 1.0);
        let expected = [0.5, 0.1, 0.5];
        for (g, e) in gaps.iter().zip(expected) {
            assert!((g - e).abs() < 1e-12, "{gaps:?}");
        }
        assert_eq!(neighbour_gaps(&[0.3], 0.0, 1.0), vec![0.7]);
    }

    /// Trial n's configuration is x0 = n / 100, so a point names its trial.
    fn numbered(number: u64) -> BTreeMap<String, Value> {
        BTreeMap::from([("x0".to_string(), Value::from(number as f64 / 100.0))])
    }

    fn trial_numbers(points: &[&[f64]]) -> Vec<u64> {
        points
            .iter()
            .map(|p| (p[0] * 100.0).round() as u64)
            .collect()
    }

    #[test]
    fn pruned_trials_rank_below_completed_ones_and_running_ones_count_as_bad() {
        let options = TpeOptions {
            startup_trials: 2,
            gamma: 0.5,
            ..TpeOptions::default()
        };
        let mut tpe = Tpe::new(unit_cube(1), Mode::Max, options, 1);
        let outcomes = [
            (
                0,
                TrialOutcome::Pruned {
                    epochs: 3,
                    value: 0.1,
                },
            ),
            (1, TrialOutcome::Completed(0.2)),
            (
                2,
                TrialOutcome::Pruned {
                    epochs: 9,
                    value: 0.05,
                },
            ),
            (
                3,
                TrialOutcome::Pruned {
                    epochs: 9,
                    value: 0.5,
                },
            ),
            (4, TrialOutcome::Running),
            (5, TrialOutcome::Completed(0.9)),
            (
                6,
                TrialOutcome::Pruned {
                    epochs: 1,
                    value: 0.99,
                },
            ),
            (
                7,
                TrialOutcome::Pruned {
                    epochs: 9,
                    value: f64::NAN,
                },
            ),
        ];
        for (number, outcome) in outcomes {
            tpe.observe(number, &numbered(number), outcome);
        }
        // 7 finished, the best ⌈0.5·7⌉ = 4: both completed trials (5 then
        // 1, though 6 and 3 reported more), then the pruned ones that got
        // furthest (9 epochs: 3 before 2 by value, NaN last), in number order.
        let (good, bad) = tpe.split().expect("past start-up");
        assert_eq!(trial_numbers(&good), vec![1, 2, 3, 5]);
        assert_eq!(trial_numbers(&bad), vec![0, 4, 6, 7]);
        // Completing a paused trial moves it up; a NaN completion or a
        // failure drops it.
        tpe.observe(6, &numbered(6), TrialOutcome::Completed(0.3));
        tpe.observe(7, &numbered(7), TrialOutcome::Completed(f64::NAN));
        tpe.forget(4);
        let (good, bad) = tpe.split().expect("past start-up");
        assert_eq!(trial_numbers(&good), vec![1, 5, 6]);
        assert_eq!(trial_numbers(&bad), vec![0, 2, 3]);
    }

    /// A sweep of 30 trials, 3 at a time, whose reports arrive out of
    /// order; then a searcher rebuilt from the trials' final records (as a
    /// new leader does after a failover) must propose what this one does.
    #[test]
    fn a_rebuilt_searcher_proposes_what_the_uninterrupted_one_would() {
        let space = unit_cube(6);
        let mut live = Tpe::new(space.clone(), Mode::Min, TpeOptions::default(), 5);
        let mut records: BTreeMap<u64, (BTreeMap<String, Value>, TrialOutcome)> = BTreeMap::new();
        let mut in_flight: Vec<u64> = Vec::new();
        for number in 0..30u64 {
            let config = live.next_config(number);
            records.insert(number, (config, TrialOutcome::Running));
            in_flight.push(number);
            if in_flight.len() == 3 {
                // The newest finishes first, then the oldest; one stays.
                for finished in [in_flight.remove(2), in_flight.remove(0)] {
                    let (config, outcome) = records.get_mut(&finished).unwrap();
                    let y = hartmann6(&point(config));
                    *outcome = if finished % 4 == 0 {
                        TrialOutcome::Pruned {
                            epochs: 1,
                            value: y,
                        }
                    } else {
                        TrialOutcome::Completed(y)
                    };
                    live.observe(finished, config, *outcome);
                }
            }
        }
        let mut rebuilt = Tpe::new(space, Mode::Min, TpeOptions::default(), 5);
        for (number, (config, outcome)) in &records {
            rebuilt.observe(*number, config, *outcome);
        }
        for number in 30..35 {
            assert_eq!(live.next_config(number), rebuilt.next_config(number));
        }
    }

    #[test]
    fn suggestions_stay_in_the_domain_and_replay_from_the_seed() {
        let space = Space::new(BTreeMap::from([
            (
                "lr".to_string(),
                Param::LogUniform {
                    low: 1e-4,
                    high: 1e-1,
                },
            ),
            (
                "layers".to_string(),
                Param::Int {
                    low: 1,
                    high: 8,
                    step: 1,
                    log: false,
                },
            ),
            (
                "act".to_string(),
                Param::Choice {
                    values: vec![Value::from("relu"), Value::from("gelu")],
                },
            ),
        ]))
        .unwrap();
        let run = |seed| {
            let mut tpe = Tpe::new(space.clone(), Mode::Max, TpeOptions::default(), seed);
            let mut seen = Vec::new();
            for number in 0..40 {
                let c = tpe.next_config(number);
                let lr = c["lr"].as_f64().unwrap();
                assert!((1e-4..=1e-1).contains(&lr));
                assert!((1..=8).contains(&c["layers"].as_i64().unwrap()));
                let score = -lr.ln().abs() + if c["act"] == "gelu" { 1.0 } else { 0.0 };
                tpe.observe(number, &c, TrialOutcome::Completed(score));
                seen.push(c);
            }
            seen
        };
        assert_eq!(run(3), run(3));
    }
}
