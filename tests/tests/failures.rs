//! Failures mid-sweep on a real local cluster (etcd, coordinators and
//! worker processes), one test per kind: a worker SIGKILLed, the leader
//! SIGKILLed again and again, etcd frozen for longer than the lease TTL,
//! etcd restarted from its data directory, a worker shut down with SIGTERM.
//! Every sweep must still finish with each trial completed exactly once and
//! the objectives of a fault-free run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ringleader_coordinator::sweep::records::AttemptOutcome;
use ringleader_coordinator::sweep::scheduler::Now;
use ringleader_coordinator::sweep::TrialState;
use ringleader_tests::sweeps::{
    client, must_finish_sweep, must_submit, sweep_problems, wait_for_sweep, BraninSweep,
};
use ringleader_tests::{wait_until, TestCluster, LEASE_TTL};

const FINISH: Duration = Duration::from_secs(120);

fn assert_no_problems(view: &ringleader_coordinator::sweep::client::SweepView, spec: &str) {
    let problems = sweep_problems(view, spec);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Running trials with at least `epochs` checkpointed: trial → (live
/// attempt number, its workers, epochs done).
type Running = BTreeMap<u64, (u32, Vec<String>, u32)>;

fn running_with(view: &ringleader_coordinator::sweep::client::SweepView, epochs: u32) -> Running {
    view.trials
        .iter()
        .filter(|t| t.state == TrialState::Running && t.epochs_done >= epochs)
        .filter_map(|t| {
            t.live_attempt()
                .map(|a| (t.number, (a.number, a.workers.clone(), t.epochs_done)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_worker_fails_its_attempt_and_the_trial_resumes_from_its_checkpoint() {
    let mut cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let sweep = BraninSweep {
        searcher: "random",
        max_trials: 3,
        workers_per_trial: 2,
        max_concurrent: 1,
        max_epochs: 8,
        max_failures: 1,
        epoch_ms: 300,
    };
    let spec = sweep.spec();
    let id = must_submit(&cluster, "sweep.toml", &spec).await;
    let running = wait_for_sweep(&args, &id, "trial 0 two epochs in", FINISH, |view| {
        let running = running_with(view, 2);
        running
            .get(&0)
            .cloned()
            .ok_or_else(|| format!("running: {running:?}"))
    })
    .await;
    let (attempt, workers, checkpointed) = running;
    assert_eq!(attempt, 1);
    // Rank 0: it reports epochs and writes the checkpoints.
    let victim = workers[0].clone();
    let index = cluster.worker_index(&victim);
    let killed_at = Now::system().unix_ms;
    cluster.cluster.workers()[index].process.kill();

    let view = wait_for_sweep(&args, &id, "trial 0's second attempt", FINISH, |view| {
        let t = &view.trials[0];
        if t.attempts.len() >= 2 {
            Ok(t.clone())
        } else {
            Err(format!("{:?}", t.attempts))
        }
    })
    .await;
    let failed = &view.attempts[0];
    assert_eq!(failed.outcome, Some(AttemptOutcome::Failed), "{failed:?}");
    let error = failed.error.clone().unwrap_or_default();
    assert!(error.contains(&victim), "error {error:?} names no {victim}");
    let detected = failed.ended_unix_ms.expect("ended") - killed_at;
    assert!(detected <= 5_500, "declared lost after {detected} ms");
    let retry = &view.attempts[1];
    assert!(
        retry.start_epoch >= checkpointed && retry.start_epoch > 0,
        "attempt 2 starts at epoch {} although {checkpointed} were checkpointed",
        retry.start_epoch
    );
    assert!(!retry.workers.contains(&victim), "{:?}", retry.workers);
    assert!(cluster
        .dir()
        .join("checkpoints")
        .join(&id)
        .join("trial-000000")
        .exists());

    // The worker comes back under the same id and is given work again.
    let restarted_at = Now::system().unix_ms;
    cluster.restart_worker(&victim);
    wait_for_sweep(
        &args,
        &id,
        "the restarted worker to get work",
        FINISH,
        |view| {
            let busy = view
                .trials
                .iter()
                .flat_map(|t| &t.attempts)
                .any(|a| a.started_unix_ms >= restarted_at && a.workers.contains(&victim));
            busy.then_some(())
                .ok_or_else(|| format!("{victim} not in a new attempt"))
        },
    )
    .await;

    let view = must_finish_sweep(&args, &id, FINISH).await;
    assert_no_problems(&view, &spec);
    assert_eq!(view.trials[0].failures, 1);
    assert!(view.trials.iter().all(|t| t.failures <= sweep.max_failures));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_leader_failover_reattaches_running_trials_without_restarting_them() {
    let mut cluster = TestCluster::must_start_formed(2, 4).await;
    let args = client(&cluster);
    let sweep = BraninSweep {
        searcher: "random",
        max_trials: 4,
        workers_per_trial: 2,
        max_concurrent: 2,
        max_epochs: 8,
        max_failures: 0,
        epoch_ms: 700,
    };
    let spec = sweep.spec();
    let id = must_submit(&cluster, "sweep.toml", &spec).await;
    let mut reattached: BTreeMap<u64, u32> = BTreeMap::new();
    for round in 0..2 {
        let running = wait_for_sweep(&args, &id, "a trial an epoch in", FINISH, |view| {
            let running = running_with(view, 1);
            let fresh = running.keys().any(|t| !reattached.contains_key(t));
            if fresh {
                Ok(running)
            } else {
                Err(format!("running: {running:?}"))
            }
        })
        .await;
        let leaders = cluster.claimed_leaders().await;
        assert_eq!(leaders.len(), 1, "round {round}: leaders {leaders:?}");
        let old = leaders[0].clone();
        let index = cluster
            .cluster
            .coordinator_addresses()
            .iter()
            .position(|a| *a == old)
            .expect("ours");
        cluster.cluster.coordinators()[index].process.kill();
        for (trial, (attempt, _, _)) in running {
            reattached.insert(trial, attempt);
        }
        // The standby takes over and serves the sweep from etcd.
        wait_for_sweep(
            &args,
            &id,
            "the new leader to serve the sweep",
            FINISH,
            |_| Ok(()),
        )
        .await;
        let leaders = cluster.claimed_leaders().await;
        assert_eq!(leaders.len(), 1, "round {round}: leaders {leaders:?}");
        assert_ne!(leaders[0], old);
        cluster
            .cluster
            .restart_coordinator(index)
            .expect("coordinator restarts");
    }
    let view = must_finish_sweep(&args, &id, FINISH).await;
    assert_no_problems(&view, &spec);
    for (trial, attempt) in reattached {
        let t = &view.trials[trial as usize];
        assert_eq!(
            t.attempts.len() as u32,
            attempt,
            "trial {trial} was restarted after the failover: {:?}",
            t.attempts
        );
        assert_eq!(
            t.attempts.last().unwrap().outcome,
            Some(AttemptOutcome::Done)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_frozen_past_the_lease_ttl_leaves_no_leader_then_exactly_one() {
    let mut cluster = TestCluster::must_start_formed(2, 4).await;
    let args = client(&cluster);
    let sweep = BraninSweep {
        searcher: "random",
        max_trials: 4,
        workers_per_trial: 2,
        max_concurrent: 2,
        max_epochs: 8,
        max_failures: 0,
        epoch_ms: 700,
    };
    let spec = sweep.spec();
    let id = must_submit(&cluster, "sweep.toml", &spec).await;
    let running = wait_for_sweep(&args, &id, "trials an epoch in", FINISH, |view| {
        let running = running_with(view, 1);
        (!running.is_empty())
            .then_some(running.clone())
            .ok_or_else(|| format!("running: {running:?}"))
    })
    .await;

    let frozen_at = Instant::now();
    cluster
        .etcd()
        .process()
        .freeze(Duration::from_secs(10))
        .expect("etcd stops");
    // The leader steps down (and stops writing) within the TTL.
    wait_until("the leader to step down", LEASE_TTL, || async {
        let leaders = cluster.claimed_leaders().await;
        leaders
            .is_empty()
            .then_some(())
            .ok_or_else(|| format!("leaders {leaders:?}"))
    })
    .await;
    let stepped_down = frozen_at.elapsed();
    // Nobody leads for the rest of the freeze (TTL + 2 s in all).
    while frozen_at.elapsed() < LEASE_TTL + Duration::from_secs(2) {
        let leaders = cluster.claimed_leaders().await;
        assert!(leaders.is_empty(), "{leaders:?} lead while etcd is frozen");
    }
    cluster.etcd().process().signal(libc::SIGCONT);

    wait_for_sweep(
        &args,
        &id,
        "a leader to serve the sweep",
        FINISH,
        |_| Ok(()),
    )
    .await;
    let leaders = cluster.claimed_leaders().await;
    assert_eq!(leaders.len(), 1, "leaders {leaders:?}");
    let elected = cluster.etcdctl_observe_leader("ringleader/leader");
    assert_eq!(elected, leaders[0]);

    let view = must_finish_sweep(&args, &id, FINISH).await;
    assert_no_problems(&view, &spec);
    // Training went on through the outage: the attempts live at the
    // freeze were re-attached, not restarted.
    for (trial, (attempt, _, _)) in running {
        let t = &view.trials[trial as usize];
        assert_eq!(
            t.attempts.len() as u32,
            attempt,
            "trial {trial}: {:?}",
            t.attempts
        );
    }
    assert_eq!(cluster.claimed_leaders().await.len(), 1);
    println!("stepped down {:?} after the freeze", stepped_down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_from_its_data_dir_loses_nothing() {
    let mut cluster = TestCluster::must_start_formed(1, 2).await;
    let args = client(&cluster);
    let sweep = BraninSweep {
        searcher: "random",
        max_trials: 4,
        workers_per_trial: 1,
        max_concurrent: 2,
        max_epochs: 6,
        max_failures: 0,
        epoch_ms: 400,
    };
    let spec = sweep.spec();
    let id = must_submit(&cluster, "sweep.toml", &spec).await;
    wait_for_sweep(&args, &id, "trials an epoch in", FINISH, |view| {
        let running = running_with(view, 1);
        (!running.is_empty())
            .then_some(())
            .ok_or_else(|| format!("running: {running:?}"))
    })
    .await;
    cluster.etcd().process().kill();
    cluster.must_restart_etcd().await;

    let view = must_finish_sweep(&args, &id, FINISH).await;
    assert_no_problems(&view, &spec);
    let stored = cluster.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        &format!("/ringleader/trials/{id}/"),
    ]);
    let keys = String::from_utf8_lossy(&stored.stdout);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 4, "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_abandons_the_attempt_which_moves_on_without_a_failure() {
    let mut cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let sweep = BraninSweep {
        searcher: "random",
        max_trials: 2,
        workers_per_trial: 1,
        max_concurrent: 1,
        max_epochs: 6,
        max_failures: 0,
        epoch_ms: 400,
    };
    let spec = sweep.spec();
    let id = must_submit(&cluster, "sweep.toml", &spec).await;
    let (_, workers, checkpointed) =
        wait_for_sweep(&args, &id, "trial 0 two epochs in", FINISH, |view| {
            let running = running_with(view, 2);
            running
                .get(&0)
                .cloned()
                .ok_or_else(|| format!("running: {running:?}"))
        })
        .await;
    let victim = workers[0].clone();
    let index = cluster.worker_index(&victim);
    cluster.cluster.workers()[index]
        .process
        .signal(libc::SIGTERM);
    wait_until(
        "the worker to drain and exit",
        Duration::from_secs(30),
        || {
            let status = cluster.cluster.workers()[index].process.exit_status();
            async move { status.ok_or_else(|| "still running".to_string()) }
        },
    )
    .await;
    let exit = cluster.cluster.workers()[index].process.exit_status();
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");

    let view = must_finish_sweep(&args, &id, FINISH).await;
    assert_no_problems(&view, &spec);
    let t = &view.trials[0];
    assert_eq!(t.attempts.len(), 2, "{:?}", t.attempts);
    assert_eq!(t.attempts[0].outcome, Some(AttemptOutcome::Abandoned));
    assert!(t.attempts[1].start_epoch >= checkpointed);
    assert!(!t.attempts[1].workers.contains(&victim));
    assert!(view.trials.iter().all(|t| t.failures == 0));
    for t in &view.trials[1..] {
        assert!(t.attempts.iter().all(|a| !a.workers.contains(&victim)));
    }
}
