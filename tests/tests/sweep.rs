//! Sweeps and jobs on a real local cluster (etcd, coordinators and worker
//! processes), with the synthetic objective so no training time is spent.

use std::collections::BTreeSet;
use std::time::Duration;

use ringleader_coordinator::sweep::client as sweeps;
use ringleader_coordinator::sweep::{SweepKind, SweepState, TrialState};
use ringleader_tests::sweeps::{
    assert_attempts_disjoint, client, must_finish_sweep, peak_concurrency, write_spec, BraninSweep,
};
use ringleader_tests::{command, idle_workers, wait_until, TestCluster};

/// A random-search sweep over Branin with three simulated epochs.
fn branin_sweep(
    max_trials: u32,
    workers_per_trial: u32,
    max_concurrent: u32,
    epoch_ms: u32,
) -> String {
    BraninSweep {
        searcher: "random",
        max_trials,
        workers_per_trial,
        max_concurrent,
        max_epochs: 3,
        max_failures: 2,
        epoch_ms,
    }
    .spec()
}

/// A `searcher` ("asha" or "hyperband") sweep of `max_trials` over Branin:
/// eta 3, rungs from 1 epoch up to 9, three trials at a time.
fn halving_sweep(searcher: &str, max_trials: u32) -> String {
    branin_sweep(max_trials, 1, 3, 5)
        .replace(
            "searcher = \"random\"",
            &format!("searcher = \"{searcher}\"\neta = 3\nmin_epochs = 1"),
        )
        .replace("max_epochs = 3", "max_epochs = 9")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_sweep_of_20_trials_on_3_workers_accounts_for_every_trial() {
    let cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let spec = write_spec(&cluster, "sweep.toml", &branin_sweep(20, 1, 2, 5));
    let id = sweeps::submit(&args, SweepKind::Sweep, &spec)
        .await
        .unwrap();
    let view = must_finish_sweep(&args, &id, Duration::from_secs(120)).await;

    assert_eq!(view.record.state, SweepState::Completed);
    let numbers: Vec<u64> = view.trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..20).collect::<Vec<_>>(), "exactly 20 trials");
    for t in &view.trials {
        assert_eq!(
            t.state,
            TrialState::Completed,
            "trial {}: {:?}",
            t.number,
            t.error
        );
        assert_eq!(t.epochs_done, 3);
        assert_eq!(t.metrics.len(), 3, "one metrics entry per epoch");
        assert_eq!(t.attempts.len(), 1);
    }
    assert!(
        peak_concurrency(&view) <= 2,
        "max_concurrent_trials = 2 exceeded"
    );
    assert_attempts_disjoint(&view);
    // The best trial is the minimum of the reported objectives.
    let best = view.best().unwrap();
    let min = view
        .trials
        .iter()
        .filter_map(|t| t.objective)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(best.objective, Some(min));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gangs_of_two_workers_run_together_on_distinct_workers() {
    let cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let spec = write_spec(&cluster, "sweep.toml", &branin_sweep(6, 2, 4, 5));
    let id = sweeps::submit(&args, SweepKind::Sweep, &spec)
        .await
        .unwrap();
    let view = must_finish_sweep(&args, &id, Duration::from_secs(120)).await;
    assert_eq!(view.record.state, SweepState::Completed);
    assert_eq!(view.trials.len(), 6);
    for t in &view.trials {
        assert_eq!(
            t.state,
            TrialState::Completed,
            "trial {}: {:?}",
            t.number,
            t.error
        );
        for a in &t.attempts {
            let distinct: BTreeSet<&String> = a.workers.iter().collect();
            assert_eq!(
                distinct.len(),
                2,
                "trial {} attempt {}: {:?}",
                t.number,
                a.number,
                a.workers
            );
        }
    }
    // A worker runs one attempt at a time and refuses a second one with a
    // failure: one attempt per trial means no worker was double-booked.
    assert!(view.trials.iter().all(|t| t.attempts.len() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asha_sweep_stops_some_trials_early() {
    let cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let spec = halving_sweep("asha", 12);
    let spec = write_spec(&cluster, "asha.toml", &spec);
    let id = sweeps::submit(&args, SweepKind::Sweep, &spec)
        .await
        .unwrap();
    let view = must_finish_sweep(&args, &id, Duration::from_secs(120)).await;
    assert_eq!(view.record.state, SweepState::Completed);
    assert_eq!(view.trials.len(), 12);
    let stopped = view
        .trials
        .iter()
        .filter(|t| t.state == TrialState::Stopped)
        .count();
    let completed = view
        .trials
        .iter()
        .filter(|t| t.state == TrialState::Completed)
        .count();
    assert_eq!(stopped + completed, 12);
    assert!(stopped > 0, "ASHA stopped no trial");
    assert!(completed > 0, "no trial reached the top rung");
    for t in view
        .trials
        .iter()
        .filter(|t| t.state == TrialState::Stopped)
    {
        assert!(
            t.epochs_done < 9,
            "trial {} stopped after all epochs",
            t.number
        );
    }
}

/// Hyperband end to end: three brackets of ASHA (first rungs at 1, 3 and
/// 9 epochs), trials dealt to them in turn, promotions inside a bracket
/// resuming from the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyperband_sweep_runs_its_brackets_and_promotes_within_them() {
    let cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let spec = halving_sweep("hyperband", 18);
    let spec = write_spec(&cluster, "hyperband.toml", &spec);
    let id = sweeps::submit(&args, SweepKind::Sweep, &spec)
        .await
        .unwrap();
    let view = must_finish_sweep(&args, &id, Duration::from_secs(180)).await;
    assert_eq!(view.record.state, SweepState::Completed);
    assert_eq!(view.trials.len(), 18);
    let mut promoted = 0;
    for t in &view.trials {
        assert_eq!(t.bracket, t.number as usize % 3, "trial {}", t.number);
        let first_rung = [1, 3, 9][t.bracket];
        let first = &t.attempts[0];
        assert_eq!(
            (first.start_epoch, first.stop_epoch),
            (0, first_rung),
            "trial {}",
            t.number
        );
        // Every later attempt resumes where the previous one stopped, at
        // a rung of its own bracket.
        for pair in t.attempts.windows(2) {
            assert_eq!(
                pair[1].start_epoch, pair[0].stop_epoch,
                "trial {}",
                t.number
            );
            assert!(
                [3, 9].contains(&pair[1].stop_epoch),
                "trial {}: {:?}",
                t.number,
                t.attempts
            );
            promoted += 1;
        }
        match t.state {
            TrialState::Completed => assert_eq!(t.epochs_done, 9, "trial {}", t.number),
            TrialState::Stopped => assert!(t.epochs_done < 9, "trial {}", t.number),
            other => panic!("trial {} ended {other:?}", t.number),
        }
        if t.bracket == 2 {
            assert_eq!((t.state, t.attempts.len()), (TrialState::Completed, 1));
        }
    }
    assert!(promoted > 0, "no promotion in brackets 0 and 1");
}

/// Early stopping with ASHA: the synthetic objective f + (1 + |f|)·2^−e
/// improves by (1 + |f|)·2^−e at epoch e, so with `min_delta = 0.5` and
/// `patience = 1` a trial stops at the first epoch e ≥ 2 whose
/// improvement is at most 0.5, wherever ASHA's segments (and resumes from
/// checkpoints) fall; one that gets there is early stopped, says so, and
/// never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asha_sweep_with_early_stopping_stops_trials_at_their_plateau() {
    let cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let text = halving_sweep("asha", 12)
        .replace(
            "[job.model]",
            "[job.early_stopping]\nmetric = \"objective\"\nmode = \"min\"\npatience = 1\nmin_delta = 0.5\n\n[job.model]",
        );
    let spec = write_spec(&cluster, "asha-early.toml", &text);
    let id = sweeps::submit(&args, SweepKind::Sweep, &spec)
        .await
        .unwrap();
    let view = must_finish_sweep(&args, &id, Duration::from_secs(120)).await;
    assert_eq!(view.record.state, SweepState::Completed);
    let template =
        ringleader_coordinator::sweep::Template::parse(SweepKind::Sweep, &text, "t.toml").unwrap();
    let plateau_epoch = |t: &ringleader_coordinator::sweep::TrialRecord| {
        let value = |e| ringleader_tests::sweeps::synthetic_objective(&template, &t.config, e);
        (2..=9).find(|&e| value(e - 1) - value(e) <= 0.5)
    };
    let mut early = 0;
    for t in &view.trials {
        let reached = t.metrics.last().map_or(0, |m| m.epoch);
        match (t.state, plateau_epoch(t)) {
            (TrialState::EarlyStopped, Some(epoch)) => {
                early += 1;
                assert_eq!(
                    (t.epochs_done, reached),
                    (epoch, epoch),
                    "trial {}",
                    t.number
                );
                let reason = t.stop_reason.as_deref().unwrap_or_default();
                let expected = format!(
                    "early stopped at epoch {epoch}: objective did not improve by 0.5 for 1 epoch (best "
                );
                assert!(
                    reason.starts_with(&expected),
                    "trial {}: {reason}",
                    t.number
                );
                assert!(
                    t.attempts.iter().all(|a| a.start_epoch < epoch),
                    "trial {} ran on after stopping: {:?}",
                    t.number,
                    t.attempts
                );
            }
            (TrialState::Completed | TrialState::Stopped, plateau) => assert!(
                plateau.is_none_or(|epoch| epoch > reached),
                "trial {} trained past its plateau (epoch {plateau:?}) to epoch {reached}",
                t.number
            ),
            (state, _) => panic!("trial {}: {state:?} {:?}", t.number, t.error),
        }
    }
    assert!(early > 0, "no trial stopped early");
    let status = sweeps::status_text(&view);
    assert!(status.contains("early-stopped"), "{status}");
}

/// Cross-validation on real data (600 Fashion-MNIST images, an MLP, one
/// epoch): each trial runs its three folds at once on the three workers,
/// each validating on its own fold, and scores their mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_validated_sweep_runs_three_folds_per_trial_and_averages() {
    const FASHION: &str = "/usr/share/datasets/fashion-mnist";
    let cluster = TestCluster::must_start_formed(1, 3).await;
    let args = client(&cluster);
    let text = format!(
        r#"
[sweep]
name = "folds"
searcher = "random"
seed = 1
max_trials = 2
workers_per_trial = 1
max_epochs = 1
cross_validation = {{ folds = 3 }}

[sweep.params]
"optimizer.lr" = {{ kind = "log_uniform", low = 0.01, high = 0.1 }}

[job]
name = "mlp-folds"
batch_size = 32
seed = 9

[job.dataset]
format = "idx"
classes = 10
normalize = {{ kind = "fixed", mean = 0.2860, std = 0.3530 }}
limit_train = 600
train = {{ images = "{FASHION}/train-images-idx3-ubyte.gz", labels = "{FASHION}/train-labels-idx1-ubyte.gz" }}

[job.model]
kind = "mlp"
hidden = [32]
"#
    );
    let spec = write_spec(&cluster, "folds.toml", &text);
    let id = sweeps::submit(&args, SweepKind::Sweep, &spec)
        .await
        .unwrap();
    let view = must_finish_sweep(&args, &id, Duration::from_secs(240)).await;
    assert_eq!(
        view.record.state,
        SweepState::Completed,
        "{:?}",
        view.trials
    );
    assert_eq!(view.record.objective_metric, "val_accuracy");
    assert_eq!(view.trials.len(), 2);
    for t in &view.trials {
        assert_eq!(t.state, TrialState::Completed, "{:?}", t.error);
        let folds: Vec<Option<u32>> = t.attempts.iter().map(|a| a.fold).collect();
        assert_eq!(folds, [Some(0), Some(1), Some(2)], "one attempt per fold");
        // Placed in one pass on three idle workers: they overlap.
        let last_start = t.attempts.iter().map(|a| a.started_unix_ms).max().unwrap();
        let first_end = t
            .attempts
            .iter()
            .filter_map(|a| a.ended_unix_ms)
            .min()
            .unwrap();
        assert!(
            last_start <= first_end,
            "folds ran one after another: {:?}",
            t.attempts
        );
        let values: Vec<f64> = t.folds.iter().map(|f| f.objective.unwrap()).collect();
        assert!(values.iter().all(|v| (0.3..=1.0).contains(v)), "{values:?}");
        let mean = values.iter().sum::<f64>() / 3.0;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
        assert!(
            (t.objective.unwrap() - mean).abs() < 1e-12,
            "{:?} vs {values:?}",
            t.objective
        );
        assert!((t.objective_std.unwrap() - std).abs() < 1e-12);
        for (i, f) in t.folds.iter().enumerate() {
            let checkpoint = f.checkpoint.as_deref().unwrap_or_default();
            assert!(checkpoint.contains(&format!("/fold-{i}/")), "{checkpoint}");
            assert_eq!(f.metrics.get("val_accuracy"), f.objective.as_ref());
        }
        assert_eq!(
            t.metrics.last().unwrap().metrics["val_accuracy"],
            t.objective.unwrap()
        );
    }
    let status = sweeps::status_text(&view);
    assert!(status.contains("val_accuracy ± "), "{status}");
    assert!(status.contains(" over folds "), "{status}");
    let json = sweeps::results_json(&view);
    assert_eq!(
        json["leaderboard"][0]["fold_objectives"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_survives_the_leader_being_killed() {
    let mut cluster = TestCluster::must_start_formed(2, 3).await;
    let args = client(&cluster);
    // Long enough that trials are running when the leader dies.
    let spec = write_spec(&cluster, "sweep.toml", &branin_sweep(12, 1, 3, 150));
    let id = sweeps::submit(&args, SweepKind::Sweep, &spec)
        .await
        .unwrap();
    wait_until(
        "some trials to complete",
        Duration::from_secs(60),
        || async {
            let view = sweeps::get(&args, &id).await.map_err(|e| e.to_string())?;
            let done = view
                .trials
                .iter()
                .filter(|t| t.state == TrialState::Completed)
                .count();
            let running = view
                .trials
                .iter()
                .filter(|t| t.state == TrialState::Running)
                .count();
            if done >= 3 && running > 0 {
                Ok(())
            } else {
                Err(format!("{done} completed, {running} running"))
            }
        },
    )
    .await;
    let old = cluster.kill_leader().await;
    let view = must_finish_sweep(&args, &id, Duration::from_secs(120)).await;
    assert_ne!(
        cluster
            .must_form(Duration::from_secs(30))
            .await
            .leader_address,
        old
    );
    assert_eq!(view.record.state, SweepState::Completed);
    let numbers: Vec<u64> = view.trials.iter().map(|t| t.number).collect();
    assert_eq!(numbers, (0..12).collect::<Vec<_>>(), "exactly 12 trials");
    for t in &view.trials {
        assert_eq!(
            t.state,
            TrialState::Completed,
            "trial {}: {:?}",
            t.number,
            t.error
        );
    }
    assert_attempts_disjoint(&view);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_specs_name_field_and_line_and_store_nothing() {
    let cluster = TestCluster::must_start_formed(1, 1).await;
    let good = branin_sweep(2, 1, 1, 1);
    let cases = [
        (
            "malformed",
            good.replace("max_trials = 2", "max_trials = = 2"),
            "bad.toml:6:",
        ),
        (
            "unknown kind",
            good.replace(
                "kind = \"uniform\", low = -5.0",
                "kind = \"gaussian\", low = -5.0",
            ),
            "gaussian",
        ),
        (
            "empty range",
            good.replace("high = 10.0", "high = -5.0"),
            "model.x1",
        ),
        (
            "log bound",
            good.replace(
                "kind = \"uniform\", low = -5.0",
                "kind = \"log_uniform\", low = -5.0",
            ),
            "model.x1",
        ),
        (
            "bad path",
            good.replace("\"model.x1\"", "\"model.x9\""),
            "model.x9",
        ),
        (
            "unknown searcher",
            good.replace("searcher = \"random\"", "searcher = \"bayes\""),
            "bayes",
        ),
    ];
    for (what, text, needle) in cases {
        let spec = write_spec(&cluster, "bad.toml", &text);
        let output = command("ringleader")
            .args(["sweep", "submit"])
            .arg(&spec)
            .env("RINGLEADER_CONFIG", cluster.cluster.client_config_path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{what}: accepted");
        assert!(
            stderr.contains("bad.toml:"),
            "{what}: no file:line in {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{what}: {needle:?} not in {stderr}"
        );
    }
    let stored = cluster.etcdctl(&["get", "--prefix", "--keys-only", "/ringleader/sweeps/"]);
    assert!(stored.status.success());
    assert!(
        stored.stdout.is_empty(),
        "a rejected spec was stored: {}",
        String::from_utf8_lossy(&stored.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_submit_watch_shows_each_epoch_and_the_final_metrics() {
    let cluster = TestCluster::must_start_formed(1, 2).await;
    let job = write_spec(
        &cluster,
        "job.toml",
        "name = \"hartmann\"\nepochs = 4\nworkers = 2\n[model]\nkind = \"synthetic\"\nfunction = \"hartmann6\"\nx1 = 0.2\nx2 = 0.15\nx3 = 0.48\nx4 = 0.28\nx5 = 0.31\nx6 = 0.66\n",
    );
    let output = command("ringleader")
        .args(["job", "submit", "--watch"])
        .arg(&job)
        .env("RINGLEADER_CONFIG", cluster.cluster.client_config_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for epoch in 1..=4 {
        assert!(stdout.contains(&format!("epoch {epoch}/4")), "{stdout}");
    }
    assert!(stdout.contains("final metrics"), "{stdout}");
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("submitted "))
        .expect("submit prints the id")
        .to_string();
    let status = command("ringleader")
        .args(["job", "status", &id, "--json"])
        .env("RINGLEADER_CONFIG", cluster.cluster.client_config_path())
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["sweep"]["state"], "completed");
    let trial = &json["trials"][0];
    assert_eq!(trial["attempts"][0]["workers"].as_array().unwrap().len(), 2);
    // Converges from above to Hartmann-6 at these inputs (≈ -3.32 near the optimum).
    let objective = trial["objective"].as_f64().unwrap();
    assert!(objective < -3.0, "objective {objective}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_sweep_stops_its_trials_and_frees_the_workers() {
    let cluster = TestCluster::must_start_formed(1, 2).await;
    let args = client(&cluster);
    // Long trials (3 epochs of 2 s), two at a time.
    let long = write_spec(&cluster, "long.toml", &branin_sweep(6, 1, 2, 2000));
    let id = sweeps::submit(&args, SweepKind::Sweep, &long)
        .await
        .unwrap();
    wait_until("two trials running", Duration::from_secs(30), || async {
        let view = sweeps::get(&args, &id).await.map_err(|e| e.to_string())?;
        let running = view
            .trials
            .iter()
            .filter(|t| t.state == TrialState::Running)
            .count();
        (running == 2)
            .then_some(())
            .ok_or(format!("{running} running"))
    })
    .await;
    assert_eq!(sweeps::cancel(&args, &id).await.unwrap(), 2);
    let view = sweeps::get(&args, &id).await.unwrap();
    assert_eq!(view.record.state, SweepState::Cancelled);
    assert!(view.trials.iter().all(|t| t.state == TrialState::Cancelled));
    assert!(sweeps::cancel(&args, &id).await.is_err(), "cancelled twice");
    // Both workers are freed once their epoch ends, and a second sweep runs
    // to the end on them.
    wait_until("both workers idle", Duration::from_secs(30), || async {
        let status = ringleader_coordinator::status::fetch(&args)
            .await
            .map_err(|e| e.to_string())?;
        let idle = idle_workers(&status);
        (idle == 2).then_some(()).ok_or(format!("{idle} idle"))
    })
    .await;
    let quick = write_spec(&cluster, "quick.toml", &branin_sweep(4, 1, 2, 1));
    let next = sweeps::submit(&args, SweepKind::Sweep, &quick)
        .await
        .unwrap();
    let done = must_finish_sweep(&args, &next, Duration::from_secs(60)).await;
    assert_eq!(done.record.state, SweepState::Completed);
    let workers: BTreeSet<&String> = done
        .trials
        .iter()
        .flat_map(|t| t.attempts.iter().flat_map(|a| a.workers.iter()))
        .collect();
    assert_eq!(workers.len(), 2, "both workers took new work: {workers:?}");
}

/// Placement by GPUs: a job on `cuda:1` goes only to a worker with two
/// GPUs (declared with `--gpus=2`: this machine has none), never to the CPU
/// workers; the worker honours the job's device, and since libtorch sees
/// no GPU here the attempt fails saying so instead of training on the CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_job_goes_only_to_a_worker_with_that_gpu_and_fails_loudly_without_it() {
    let mut cluster = TestCluster::start(1, 2).await;
    cluster
        .cluster
        .add_worker_with(&["--gpus=1"])
        .expect("one-GPU worker starts");
    cluster
        .cluster
        .add_worker_with(&["--gpus=2"])
        .expect("two-GPU worker starts");
    cluster.must_form(Duration::from_secs(60)).await;
    let args = client(&cluster);
    let job = write_spec(
        &cluster,
        "gpu.toml",
        "name = \"on-gpu-1\"\nepochs = 2\nworkers = 1\ndevice = \"cuda:1\"\n\
         [model]\nkind = \"synthetic\"\nfunction = \"branin\"\nx1 = 3.0\nx2 = 2.0\n",
    );
    let id = sweeps::submit(&args, SweepKind::Job, &job).await.unwrap();
    let view = must_finish_sweep(&args, &id, Duration::from_secs(60)).await;
    assert_eq!(view.record.state, SweepState::Failed, "{:?}", view.trials);
    let attempts = &view.trials[0].attempts;
    assert!(!attempts.is_empty());
    for attempt in attempts {
        assert_eq!(attempt.workers, ["worker-3"], "{attempts:?}");
        let error = attempt.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("device cuda:1 requested, but libtorch sees 0 CUDA device(s)"),
            "{error}"
        );
    }
}
