//! Training jobs through a real local cluster: the reference CNN on a slice
//! of Fashion-MNIST on two workers, and a job whose data is missing.

use std::time::Duration;

use ringleader_coordinator::sweep::client::{self as sweeps, SweepView};
use ringleader_coordinator::sweep::{SweepKind, SweepState, TrialState};
use ringleader_tests::{wait_until, TestCluster};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn job(epochs: u32, train_images: &str) -> String {
    format!(
        r#"
name = "cnn-slice"
workers = 2
epochs = {epochs}
batch_size = 64
seed = 42

[dataset]
format = "idx"
classes = 10
normalize = {{ kind = "fixed", mean = 0.2860, std = 0.3530 }}
limit_train = 4000
limit_test = 1000

[dataset.train]
images = "{train_images}"
labels = "{FASHION}/train-labels-idx1-ubyte.gz"

[dataset.test]
images = "{FASHION}/t10k-images-idx3-ubyte.gz"
labels = "{FASHION}/t10k-labels-idx1-ubyte.gz"

[model]
kind = "cnn"

[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
"#
    )
}

async fn run_job(cluster: &TestCluster, text: &str, timeout: Duration) -> SweepView {
    let args = cluster.connection(Duration::from_secs(5));
    let path = cluster.dir().join("job.toml");
    std::fs::write(&path, text).unwrap();
    let id = sweeps::submit(&args, SweepKind::Job, &path).await.unwrap();
    wait_until(&format!("{id} to finish"), timeout, || async {
        match sweeps::get(&args, &id).await {
            Ok(view) if view.record.state.is_terminal() => Ok(view),
            Ok(view) => Err(format!(
                "{:?}",
                view.trials.first().map(|t| (t.state, t.metrics.len()))
            )),
            Err(error) => Err(error.to_string()),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_cnn_trains_on_two_workers_through_the_cluster() {
    let cluster = TestCluster::must_start_formed(1, 2).await;
    let images = format!("{FASHION}/train-images-idx3-ubyte.gz");
    let view = run_job(&cluster, &job(2, &images), Duration::from_secs(300)).await;
    assert_eq!(
        view.record.state,
        SweepState::Completed,
        "{:?}",
        view.trials[0].error
    );
    let trial = &view.trials[0];
    assert_eq!(trial.state, TrialState::Completed);
    assert_eq!(trial.attempts.len(), 1);
    assert_eq!(trial.attempts[0].workers.len(), 2, "a gang of two");
    let epochs: Vec<u32> = trial.metrics.iter().map(|m| m.epoch).collect();
    assert_eq!(epochs, [1, 2]);
    let metric = |epoch: usize, name: &str| trial.metrics[epoch].metrics[name];
    assert!(
        metric(1, "train_loss") < metric(0, "train_loss"),
        "training loss did not fall: {:?}",
        trial.metrics
    );
    // 4,000 examples, two epochs: well above chance (0.1); measured ≈ 0.78.
    let accuracy = metric(1, "test_accuracy");
    assert!(accuracy >= 0.65, "test accuracy {accuracy}");
    assert_eq!(trial.objective, Some(accuracy));
    let checkpoint = trial
        .checkpoint
        .as_deref()
        .expect("a checkpoint is recorded");
    assert!(
        std::path::Path::new(checkpoint).is_file(),
        "{checkpoint} missing"
    );
    // Both ranks share this machine: each reached its successor over the
    // Unix socket the successor registered, not TCP.
    for worker in 0..2 {
        let log = cluster.dir().join(format!("worker-{worker}.log"));
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(
            log.contains("over its Unix socket") && !log.contains("using TCP"),
            "worker-{worker} did not use the Unix socket:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_data_is_missing_fails_naming_the_file() {
    let cluster = TestCluster::must_start_formed(1, 2).await;
    let missing = cluster.dir().join("no-such-images.gz");
    let view = run_job(
        &cluster,
        &job(1, &missing.display().to_string()),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(view.record.state, SweepState::Failed);
    let trial = &view.trials[0];
    assert_eq!(trial.state, TrialState::Failed);
    let error = trial.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("no-such-images.gz"),
        "error does not name the file: {error}"
    );
    // Jobs retry a failed attempt twice (the data might be on a volume
    // that was not mounted yet), then give up.
    assert_eq!(trial.attempts.len(), 3);
    assert_eq!(trial.failures, 3);
}
