//! Chaos benchmark: the chaos test's seeded fault schedule for longer,
//! sweeps submitted back to back. Reports faults injected, trials completed
//! and lost, duplicate live attempts and recovery per fault kind. Run
//! through scripts/bench/chaos.sh [SECONDS] [MAX_FAULTS].

use std::time::Duration;

use ringleader_tests::chaos::{self, ChaosOptions};
use ringleader_tests::sweeps::BraninSweep;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(600);
    let max_faults: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let options = ChaosOptions {
        seed: chaos::seed_from_env(),
        coordinators: 2,
        workers: 5,
        sweep: BraninSweep {
            searcher: "random",
            max_trials: 12,
            workers_per_trial: 2,
            max_concurrent: 2,
            max_epochs: 6,
            max_failures: 50,
            epoch_ms: 400,
        },
        duration: Duration::from_secs(seconds),
        max_faults,
        repeat: true,
        gap_ms: (100, 1000),
        finish_timeout: Duration::from_secs(180),
    };
    let report = chaos::run(options).await;
    println!("{}", report.summary());
    if report.trials_lost > 0 || report.duplicate_live_attempts > 0 || !report.problems.is_empty() {
        std::process::exit(1);
    }
}
