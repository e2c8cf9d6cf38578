//! Read-back benchmark: run a sweep of N instant trials (default 100,000)
//! on a local cluster, then time reading the whole sweep back through the
//! paged `GetSweep` (the CLI's `sweep status` path), from the leader's
//! memory and, after a failover, from etcd. Run through
//! scripts/bench/readback.sh.

use std::time::{Duration, Instant};

use ringleader_coordinator::sweep::client as sweeps;
use ringleader_tests::sweeps::{client, must_finish_sweep, must_submit, BraninSweep};
use ringleader_tests::TestCluster;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

async fn time_reads(
    args: &ringleader_coordinator::client::Connection,
    id: &str,
    n: u32,
) -> Vec<Duration> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let view = sweeps::get(args, id).await.expect("the sweep reads back");
        times.push(started.elapsed());
        assert_eq!(view.trials.len(), n as usize, "every trial read back");
    }
    times
}

#[tokio::main]
async fn main() {
    let trials: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let workers = 4;
    let mut cluster = TestCluster::must_start_formed(2, workers).await;
    let spec = BraninSweep {
        searcher: "random",
        max_trials: trials,
        workers_per_trial: 1,
        max_concurrent: workers as u32,
        max_epochs: 1,
        max_failures: 0,
        epoch_ms: 0,
    }
    .spec();
    let args = client(&cluster);
    let started = Instant::now();
    let id = must_submit(&cluster, "readback.toml", &spec).await;
    must_finish_sweep(&args, &id, Duration::from_secs(3600)).await;
    let ran = started.elapsed();
    println!(
        "{trials} trials on {workers} workers in {:.1} s ({:.0} trials/s)",
        ran.as_secs_f64(),
        f64::from(trials) / ran.as_secs_f64()
    );
    let bytes: usize = sweeps::get(&args, &id)
        .await
        .expect("read")
        .trials
        .iter()
        .map(|t| serde_json::to_string(t).map_or(0, |j| j.len()))
        .sum();
    println!("trial records: {:.1} MB of JSON", bytes as f64 / 1e6);
    let finished = time_reads(&args, &id, trials).await;
    println!(
        "read back (finished sweep, paged from etcd): median {:.2} s over 5 reads",
        median(finished).as_secs_f64()
    );
    let old = cluster.kill_leader().await;
    let over = Instant::now();
    cluster
        .must_fail_over(&old, workers, Duration::from_secs(120))
        .await;
    println!(
        "failover with the sweep stored: new leader serving in {:.2} s",
        over.elapsed().as_secs_f64()
    );
    let after = time_reads(&args, &id, trials).await;
    println!(
        "read back after the failover: median {:.2} s over 5 reads",
        median(after).as_secs_f64()
    );
}
