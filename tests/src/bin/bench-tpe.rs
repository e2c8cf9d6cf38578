//! TPE quality benchmark: the best Hartmann-6 value after 100 sequential
//! trials of our TPE (default options: 10 random start-up trials, γ 0.25,
//! 24 candidates), for seeds 1..=5, and the median. Run through
//! scripts/bench/sweep.sh, which puts Optuna's TPESampler beside it
//! (scripts/bench/tpe_quality.py).
//!
//! Usage: bench-tpe [TRIALS] [SEEDS] [--gamma G] [--json]
//! (`--gamma` overrides the good fraction, to compare with Optuna's rule of
//! the best 10 %, at most 25.)

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use ringleader_coordinator::search::{Mode, Param, Space, Tpe, TpeOptions};
use serde_json::{json, Value};

// The objective the workers evaluate, compiled in from its one source
// (ringleader-spec is not a dependency of this crate; this file has no
// imports of its own).
#[path = "../../../spec/src/synthetic.rs"]
#[allow(dead_code)]
mod synthetic;

const DIMS: usize = 6;
/// Hartmann-6's global minimum (Surjanovic & Bingham).
const OPTIMUM: f64 = -3.32237;

fn unit_cube() -> anyhow::Result<Space> {
    let params = (1..=DIMS)
        .map(|i| {
            (
                format!("x{i}"),
                Param::Uniform {
                    low: 0.0,
                    high: 1.0,
                },
            )
        })
        .collect();
    Ok(Space::new(params)?)
}

fn point(config: &BTreeMap<String, Value>) -> anyhow::Result<[f64; DIMS]> {
    let mut x = [0.0; DIMS];
    for (i, v) in x.iter_mut().enumerate() {
        let name = format!("x{}", i + 1);
        *v = config
            .get(&name)
            .and_then(Value::as_f64)
            .with_context(|| format!("TPE suggested no number for {name}: {config:?}"))?;
    }
    Ok(x)
}

/// The best value seen in `trials` sequential suggest → evaluate → observe
/// rounds.
fn best_of_tpe(seed: u64, trials: usize, options: &TpeOptions) -> anyhow::Result<f64> {
    let mut tpe = Tpe::new(unit_cube()?, Mode::Min, options.clone(), seed);
    let mut best = f64::INFINITY;
    for _ in 0..trials {
        let config = tpe.next_config();
        let y = synthetic::hartmann6(&point(&config)?);
        best = best.min(y);
        tpe.observe(config, y);
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

fn main() -> anyhow::Result<()> {
    let mut trials = 100usize;
    let mut seeds = 5u64;
    let mut as_json = false;
    let mut options = TpeOptions::default();
    let mut positional = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--json" {
            as_json = true;
            continue;
        }
        if arg == "--gamma" {
            let g = args.next().context("--gamma needs a value")?;
            options.gamma = g.parse().with_context(|| format!("--gamma: {g:?}"))?;
            continue;
        }
        match positional {
            0 => trials = arg.parse().with_context(|| format!("TRIALS: {arg:?}"))?,
            1 => seeds = arg.parse().with_context(|| format!("SEEDS: {arg:?}"))?,
            _ => bail!("usage: bench-tpe [TRIALS] [SEEDS] [--gamma G] [--json]"),
        }
        positional += 1;
    }
    let start = std::time::Instant::now();
    let best = (1..=seeds)
        .map(|s| best_of_tpe(s, trials, &options))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let med = median(&best);
    if as_json {
        println!(
            "{}",
            json!({
                "system": "ringleader-tpe",
                "trials": trials,
                "gamma": options.gamma,
                "startup_trials": options.startup_trials,
                "seeds": (1..=seeds).collect::<Vec<_>>(),
                "best": best,
                "median": med,
                "optimum": OPTIMUM,
                "seconds": start.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!(
            "Ringleader TPE (gamma {}), Hartmann-6, {trials} trials (optimum {OPTIMUM})",
            options.gamma
        );
        for (s, b) in (1..=seeds).zip(&best) {
            println!("  seed {s}: best {b:.5}");
        }
        println!("  median: {med:.5}");
    }
    Ok(())
}
