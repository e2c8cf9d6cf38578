//! TPE quality benchmark: the best value of a test function after
//! `--trials` sequential suggest → evaluate → observe rounds of our TPE
//! (default options unless told), for each seed of `--seeds`, and the
//! median. Run through scripts/bench/tpe.sh, which puts Optuna's
//! TPESampler beside it (scripts/bench/tpe_quality.py).
//!
//! Usage: bench-tpe [--trials N] [--seeds FIRST..LAST] [--function hartmann6|branin]
//!                  [--independent] [--gamma G] [--json]

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use anyhow::{bail, Context};
use ringleader_spec::search::{Mode, Param, Space, Tpe, TpeOptions, TrialOutcome};
use ringleader_spec::synthetic::{branin, hartmann6};
use serde_json::{json, Value};

const USAGE: &str = "usage: bench-tpe [--trials N] [--seeds FIRST..LAST] \
                     [--function hartmann6|branin] [--independent] [--gamma G] [--json]";

/// A test function with its domain and known minimum.
#[derive(Clone, Copy)]
enum Function {
    /// 6 parameters in [0, 1]; minimum −3.32237 (Surjanovic & Bingham).
    Hartmann6,
    /// x1 ∈ [−5, 10], x2 ∈ [0, 15]; minimum 0.397887, reached three times.
    Branin,
}

impl Function {
    fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "hartmann6" => Ok(Self::Hartmann6),
            "branin" => Ok(Self::Branin),
            other => bail!("--function: expected hartmann6 or branin, got {other:?}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hartmann6 => "hartmann6",
            Self::Branin => "branin",
        }
    }

    fn optimum(self) -> f64 {
        match self {
            Self::Hartmann6 => -3.32237,
            Self::Branin => 0.397887,
        }
    }

    /// Parameter names and ranges, as Optuna's side of the benchmark
    /// declares them.
    fn bounds(self) -> Vec<(String, f64, f64)> {
        match self {
            Self::Hartmann6 => (1..=6).map(|i| (format!("x{i}"), 0.0, 1.0)).collect(),
            Self::Branin => vec![("x1".into(), -5.0, 10.0), ("x2".into(), 0.0, 15.0)],
        }
    }

    fn space(self) -> anyhow::Result<Space> {
        let params = self
            .bounds()
            .into_iter()
            .map(|(name, low, high)| (name, Param::Uniform { low, high }))
            .collect();
        Ok(Space::new(params)?)
    }

    fn value(self, config: &BTreeMap<String, Value>) -> anyhow::Result<f64> {
        let x: Vec<f64> = self
            .bounds()
            .iter()
            .map(|(name, _, _)| {
                config
                    .get(name)
                    .and_then(Value::as_f64)
                    .with_context(|| format!("TPE suggested no number for {name}: {config:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(match self {
            Self::Hartmann6 => hartmann6(&x.try_into().expect("six parameters")),
            Self::Branin => branin(x[0], x[1]),
        })
    }
}

/// The best value seen in `trials` rounds.
fn best_of_tpe(
    function: Function,
    seed: u64,
    trials: usize,
    options: &TpeOptions,
) -> anyhow::Result<f64> {
    let mut tpe = Tpe::new(function.space()?, Mode::Min, options.clone(), seed);
    let mut best = f64::INFINITY;
    for number in 0..trials as u64 {
        let config = tpe.next_config(number);
        let y = function.value(&config)?;
        best = best.min(y);
        tpe.observe(number, &config, TrialOutcome::Completed(y));
    }
    Ok(best)
}

fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn seed_range(text: &str) -> anyhow::Result<RangeInclusive<u64>> {
    let (first, last) = text
        .split_once("..")
        .with_context(|| format!("--seeds: expected FIRST..LAST, got {text:?}"))?;
    let parse = |s: &str| {
        s.parse::<u64>()
            .with_context(|| format!("--seeds: {s:?} is not a seed"))
    };
    let (first, last) = (parse(first)?, parse(last)?);
    if first > last {
        bail!("--seeds: {first}..{last} is empty");
    }
    Ok(first..=last)
}

fn main() -> anyhow::Result<()> {
    let mut trials = 100usize;
    let mut seeds = 1..=5u64;
    let mut function = Function::Hartmann6;
    let mut as_json = false;
    let mut options = TpeOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--json" => as_json = true,
            "--independent" => options.multivariate = false,
            "--trials" => {
                let v = value()?;
                trials = v.parse().with_context(|| format!("--trials: {v:?}"))?;
            }
            "--seeds" => seeds = seed_range(&value()?)?,
            "--function" => function = Function::parse(&value()?)?,
            "--gamma" => {
                let v = value()?;
                options.gamma = v.parse().with_context(|| format!("--gamma: {v:?}"))?;
            }
            _ => bail!("{USAGE}"),
        }
    }
    let system = if options.multivariate {
        "ringleader-tpe-multivariate"
    } else {
        "ringleader-tpe-independent"
    };
    let start = std::time::Instant::now();
    let best = seeds
        .clone()
        .map(|s| best_of_tpe(function, s, trials, &options))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let med = median(&best);
    if as_json {
        println!(
            "{}",
            json!({
                "system": system,
                "function": function.name(),
                "trials": trials,
                "gamma": options.gamma,
                "startup_trials": options.startup_trials,
                "seeds": seeds.collect::<Vec<_>>(),
                "best": best,
                "median": med,
                "optimum": function.optimum(),
                "seconds": start.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!(
            "{system} (gamma {}), {}, {trials} trials (optimum {})",
            options.gamma,
            function.name(),
            function.optimum()
        );
        for (s, b) in seeds.zip(&best) {
            println!("  seed {s}: best {b:.5}");
        }
        println!("  median: {med:.5}");
    }
    Ok(())
}
