//! The chaos test: a seeded random schedule of worker kills and restarts,
//! SIGTERMs, leader kills, etcd freezes and restarts during a sweep of
//! two-worker trials. Set RINGLEADER_CHAOS_SEED to replay a seed.

use std::time::Duration;

use ringleader_tests::chaos::{self, ChaosOptions};
use ringleader_tests::sweeps::BraninSweep;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sweep_completes_every_trial_once_with_the_fault_free_best() {
    let options = ChaosOptions {
        seed: chaos::seed_from_env(),
        coordinators: 2,
        workers: 5,
        sweep: BraninSweep {
            searcher: "random",
            max_trials: 14,
            workers_per_trial: 2,
            max_concurrent: 2,
            max_epochs: 6,
            max_failures: 50,
            epoch_ms: 500,
        },
        duration: Duration::from_secs(75),
        max_faults: 14,
        repeat: false,
        gap_ms: (300, 1500),
        finish_timeout: Duration::from_secs(90),
    };
    let report = chaos::run(options).await;
    println!("{}", report.summary());
    assert!(
        report.faults.len() >= 4,
        "seed {}: only {} faults injected",
        report.seed,
        report.faults.len()
    );
    assert_eq!(report.trials_lost, 0, "seed {}", report.seed);
    assert_eq!(report.duplicate_live_attempts, 0, "seed {}", report.seed);
    assert!(
        report.problems.is_empty(),
        "seed {}: {:#?}",
        report.seed,
        report.problems
    );
}
