//! Failover benchmark: SIGKILL the leader of a local cluster again and
//! again; time from the kill until a new leader serves with every worker
//! re-registered. Run through scripts/bench/failover.sh.

use std::time::{Duration, Instant};

use ringleader_tests::TestCluster;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let kills: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let coordinators = 3;
    let workers = 4;
    let mut cluster = TestCluster::start(coordinators, workers).await;
    cluster.must_form(Duration::from_secs(60)).await;
    println!(
        "cluster: {coordinators} coordinators, {workers} workers, lease TTL {:?}",
        ringleader_tests::LEASE_TTL
    );
    let mut times = Vec::with_capacity(kills);
    for round in 1..=kills {
        // Every coordinator must stand in the election before the kill.
        ringleader_tests::wait_until(
            "all coordinators campaigning",
            Duration::from_secs(30),
            || async {
                let status = cluster
                    .cluster
                    .status(Duration::from_secs(1))
                    .await
                    .map_err(|e| e.to_string())?;
                (status.coordinators.len() == coordinators)
                    .then_some(())
                    .ok_or_else(|| "not yet".to_string())
            },
        )
        .await;
        let old = cluster.kill_leader().await;
        let killed_at = Instant::now();
        let status = cluster
            .must_fail_over(&old, workers, Duration::from_secs(30))
            .await;
        let took = killed_at.elapsed();
        println!(
            "kill {round:2}: {old} -> {} in {:.3} s",
            status.leader_address,
            took.as_secs_f64()
        );
        times.push(took);
        let index = cluster
            .cluster
            .coordinators()
            .iter()
            .position(|m| m.address == old)
            .expect("killed coordinator is ours");
        cluster.cluster.restart_coordinator(index).expect("restart");
    }
    times.sort();
    let median = if kills % 2 == 1 {
        times[kills / 2]
    } else {
        (times[kills / 2 - 1] + times[kills / 2]) / 2
    };
    let max = times[kills - 1];
    println!(
        "failover over {kills} kills: median {:.3} s, min {:.3} s, max {:.3} s",
        median.as_secs_f64(),
        times[0].as_secs_f64(),
        max.as_secs_f64()
    );
}
