//! The leader at scale, by simulation: the real scheduler stepped by the
//! in-memory store and network of `ringleader_coordinator::sweep::sim`,
//! with `--workers` simulated workers and `--trials` random-search trials
//! of an instant objective (9 epochs of Branin in virtual time) split over
//! sweeps of at most 250,000. No faults: this measures the leader's own
//! cost, the time spent inside its steps, per input it takes.
//!
//! Prints, for the windows ending at 1%, 10% and 100% of the trials
//! (10k, 100k and 1M by default), the leader's cost per event in that
//! window, and the etcd bytes written per trial over the run.
//!
//! Usage: bench-leader [--workers 10000] [--trials 1000000] [--seed 1]

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ringleader_coordinator::sweep::sim::{branin_spec, Faults, Options, Simulation, Stats};

/// The allocator the `ringleader` binary uses (see coordinator/src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: bench-leader [--workers N] [--trials N] [--seed N]";
const MAX_PER_SWEEP: u64 = 250_000;

fn main() -> anyhow::Result<()> {
    let (mut workers, mut trials, mut seed) = (10_000usize, 1_000_000u64, 1u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--workers" => workers = value.parse().context("--workers")?,
            "--trials" => trials = value.parse().context("--trials")?,
            "--seed" => seed = value.parse().context("--seed")?,
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    let started = Instant::now();
    let mut sim = Simulation::new(Options {
        seed,
        workers,
        faults: Faults::NONE,
        check_every_step: false,
    });
    let mut left = trials;
    while left > 0 {
        let n = left.min(MAX_PER_SWEEP);
        sim.submit(&branin_spec("random", n as u32, 1, 0));
        left -= n;
    }
    let checkpoints = [trials / 100, trials / 10, trials];
    let mut windows = Vec::new();
    for end in checkpoints {
        let start_at = end - end / 10;
        run_until(&mut sim, start_at);
        let before = sim.stats.clone();
        run_until(&mut sim, end);
        windows.push((start_at, end, before, sim.stats.clone()));
    }
    while !sim.all_finished() {
        sim.advance();
    }
    println!(
        "leader simulation: {workers} workers, {trials} trials (random search, 9 instant epochs), seed {seed}"
    );
    println!(
        "{:>22} {:>12} {:>14} {:>12}",
        "trials (window)", "events", "per event", "events/s"
    );
    for (from, to, a, b) in &windows {
        let events = b.events - a.events;
        let time = b.leader_time - a.leader_time;
        println!(
            "{:>22} {:>12} {:>11.2} µs {:>12.0}",
            format!("{from}..{to}"),
            events,
            micros(time) / events as f64,
            events as f64 / time.as_secs_f64()
        );
    }
    let total: &Stats = &sim.stats;
    println!(
        "whole run: {} events, {:.2} µs per event in the leader, {:.1} s of leader time, {:.1} s virtual, {:.1} s wall",
        total.events,
        micros(total.leader_time) / total.events as f64,
        total.leader_time.as_secs_f64(),
        sim.elapsed_ms() as f64 / 1000.0,
        started.elapsed().as_secs_f64()
    );
    println!(
        "etcd: {} puts, {:.1} per trial, {:.0} bytes per trial (keys and JSON values)",
        total.puts,
        total.puts as f64 / trials as f64,
        total.bytes_written as f64 / trials as f64
    );
    let per_event = |w: &(u64, u64, Stats, Stats)| {
        micros(w.3.leader_time - w.2.leader_time) / (w.3.events - w.2.events) as f64
    };
    println!(
        "per-event cost, last window / first window: {:.2}x",
        per_event(&windows[2]) / per_event(&windows[0])
    );
    Ok(())
}

fn run_until(sim: &mut Simulation, attempts: u64) {
    while sim.stats.attempts_done < attempts && !sim.all_finished() {
        sim.advance();
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
