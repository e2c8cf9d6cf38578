//! Validation and evaluation through a real cluster: a sweep whose job
//! holds out validation chooses on `val_accuracy` by default, every trial
//! reports the validation and test metrics, the checkpoint keeps the
//! confusion matrices, and the best trial's test metrics come back as the
//! final estimate. Tiny two-class data written by the test.

use std::path::Path;
use std::time::Duration;

use ringleader_coordinator::sweep::client as sweeps;
use ringleader_coordinator::sweep::{SweepState, TrialState};
use ringleader_tests::sweeps::{client, must_finish_sweep, must_submit};
use ringleader_tests::{command, TestCluster};
use serde_json::Value;

/// A `.npy` file of `shape` holding `data` (little-endian `descr`).
fn npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// `n` examples of 4 features; the label is whether x0 + x1 > 0 (with a
/// little noise in the other two), from a fixed xorshift stream.
fn write_split(dir: &Path, name: &str, n: usize, mut state: u64) {
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let mut x = [0f32; 4];
        for value in &mut x {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *value = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        }
        labels.push(u8::from(x[0] + x[1] > 0.0));
        features.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    }
    npy(
        &dir.join(format!("{name}-x.npy")),
        "<f4",
        &format!("{n}, 4"),
        &features,
    );
    npy(
        &dir.join(format!("{name}-y.npy")),
        "|u1",
        &format!("{n},"),
        &labels,
    );
}

fn sweep(dir: &Path, objective: &str) -> String {
    let split = |name: &str| {
        format!(
            "{{ features = \"{0}/{name}-x.npy\", labels = \"{0}/{name}-y.npy\" }}",
            dir.display()
        )
    };
    format!(
        r#"[sweep]
name = "validated"
searcher = "grid"
workers_per_trial = 2
max_epochs = 2
{objective}

[sweep.params]
"optimizer.lr" = {{ kind = "choice", values = [0.001, 0.2] }}

[job]
name = "binary"
epochs = 1
batch_size = 16
seed = 5

[job.dataset]
format = "npy"
classes = 2
validation_fraction = 0.25
train = {train}
test = {test}

[job.model]
kind = "mlp"
hidden = [16]

[job.optimizer]
kind = "sgd"
momentum = 0.9
"#,
        train = split("train"),
        test = split("test"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_chooses_on_validation_and_reports_the_test_split_apart() {
    let cluster = TestCluster::must_start_formed(1, 2).await;
    let dir = cluster.dir().to_path_buf();
    write_split(&dir, "train", 400, 0x2545_f491_4f6c_dd1d);
    write_split(&dir, "test", 200, 0x9e37_79b9_7f4a_7c15);
    let id = must_submit(&cluster, "validated.toml", &sweep(&dir, "")).await;
    let args = client(&cluster);
    let view = must_finish_sweep(&args, &id, Duration::from_secs(240)).await;
    assert_eq!(
        view.record.state,
        SweepState::Completed,
        "{:?}",
        view.trials
    );
    assert_eq!(view.record.objective_metric, "val_accuracy", "the default");
    for trial in &view.trials {
        assert_eq!(trial.state, TrialState::Completed, "{:?}", trial.error);
        let last = &trial.metrics.last().expect("metrics").metrics;
        for name in [
            "train_loss",
            "val_loss",
            "val_accuracy",
            "val_macro_f1",
            "val_roc_auc",
            "val_recall_0",
            "val_recall_1",
            "test_loss",
            "test_accuracy",
            "test_macro_f1",
            "test_roc_auc",
            "test_recall_1",
        ] {
            assert!(
                last.contains_key(name),
                "trial {} lacks {name}: {last:?}",
                trial.number
            );
        }
        assert_eq!(trial.objective, Some(last["val_accuracy"]));
    }
    let best = view.best().expect("a best trial");
    let last = &best.metrics.last().unwrap().metrics;
    // lr 0.2 learns a linear boundary in two epochs; 0.001 barely moves.
    assert!(last["val_accuracy"] > 0.85, "{last:?}");

    // The final estimate: the best trial's test metrics, labelled apart.
    let table = sweeps::results_table(&view);
    let line = format!(
        "final estimate on the test split (not used to choose the trial): trial {} epoch 2:",
        best.number
    );
    assert!(table.contains(&line), "{table}");
    assert!(
        !table.contains("test_recall_0"),
        "recall is left to --json: {table}"
    );
    assert!(sweeps::status_text(&view).contains(&line));
    let json = sweeps::results_json(&view);
    let estimate = &json["final_estimate"];
    assert_eq!(estimate["trial"], best.number);
    assert_eq!(estimate["selected_on_test"], false);
    assert_eq!(estimate["metrics"]["test_accuracy"], last["test_accuracy"]);
    assert!(estimate["metrics"].get("val_accuracy").is_none());

    // The sidecar keeps what the report leaves out: confusion matrices of
    // the 100 validation and 200 test examples, summed over both ranks.
    let checkpoint = best.checkpoint.as_deref().expect("a checkpoint");
    let sidecar: Value = serde_json::from_slice(
        &std::fs::read(Path::new(checkpoint).with_extension("json")).unwrap(),
    )
    .unwrap();
    for (split, examples) in [("val", 100), ("test", 200)] {
        let evaluation = &sidecar["evaluations"][split];
        let cells: u64 = evaluation["confusion"]
            .as_array()
            .unwrap_or_else(|| panic!("{split}: {sidecar}"))
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
            .sum();
        assert_eq!(cells, examples, "{split}");
        assert_eq!(evaluation["examples"], examples);
    }
}

#[test]
fn a_test_objective_is_accepted_with_a_warning_and_val_metrics_need_validation() {
    let dir = tempfile::tempdir().unwrap();
    let submit = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        command("ringleader")
            .args(["sweep", "submit", "--dry-run"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let on_test = sweep(
        dir.path(),
        r#"objective = { metric = "test_accuracy", mode = "max" }"#,
    );
    let output = submit("on-test.toml", &on_test);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: the objective test_accuracy chooses trials on the test split"),
        "{stderr}"
    );
    let quiet = submit("on-val.toml", &sweep(dir.path(), ""));
    assert!(quiet.status.success());
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("warning"));
    // Without a validation set, val_* is not a metric the job reports.
    let no_validation = on_test
        .replace("validation_fraction = 0.25\n", "")
        .replace("\"test_accuracy\"", "\"val_accuracy\"");
    let output = submit("no-validation.toml", &no_validation);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("sweep.objective.metric: the job does not report `val_accuracy`"),
        "{stderr}"
    );
}
