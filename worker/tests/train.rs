//! The training library in-process: every rank on its own thread, joined by
//! real rings over 127.0.0.1, datasets written to temp dirs (and the real
//! Fashion-MNIST from /usr/share/datasets). Run the real-data tests with
//! `--release`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringleader_collective::{ring, CollectiveService, Ring, RingOptions, RingPlan, RingSecret};
use ringleader_spec::{FileDeal, JobSpec};
use ringleader_worker::confine::Confinement;
use ringleader_worker::train::{
    run_segment, Control, EpochReport, Segment, SegmentOutcome, TrainError,
};
use serde_json::{json, Value};
use tch::{Device, Tensor};
use tokio::runtime::Runtime;

mod common;
use common::npy_with_header;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// Tests share two cores: one training run at a time keeps timings honest
/// and keeps a starved rank from timing out its ring.
static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn spec(value: Value) -> JobSpec {
    serde_json::from_value(value).expect("a valid job spec")
}

fn fashion(split: &str) -> Value {
    json!({
        "images": format!("{FASHION}/{split}-images-idx3-ubyte.gz"),
        "labels": format!("{FASHION}/{split}-labels-idx1-ubyte.gz"),
    })
}

/// The rings of `world` ranks, each served by its own collective service
/// on a free loopback port.
fn must_connect_ring(runtime: &Runtime, world: usize) -> Vec<Ring> {
    runtime.block_on(async {
        let options = RingOptions {
            timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let mut services = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..world {
            let service = CollectiveService::new(options.timeout);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            peers.push(listener.local_addr().unwrap().to_string());
            tokio::spawn(
                ring::server_builder(&options)
                    .unwrap()
                    .add_service(service.clone())
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            services.push(service);
        }
        let secret = RingSecret::generate();
        let connects = services.iter().enumerate().map(|(rank, service)| {
            let plan = RingPlan {
                successor_socket: None,
                generation: 1,
                rank,
                peers: peers.clone(),
                secret: secret.clone(),
            };
            Ring::connect(service, plan, options.clone())
        });
        futures::future::try_join_all(connects).await.unwrap()
    })
}

#[derive(Debug)]
struct Run {
    reports: Vec<EpochReport>,
    outcome: SegmentOutcome,
}

/// Data under the temp dirs the tests write to and the real data sets;
/// checkpoints under the temp dirs.
fn test_confinement() -> Confinement {
    let temp = std::env::temp_dir();
    Confinement::new([temp.as_path(), Path::new(FASHION)], [&temp]).unwrap()
}

/// Trains epochs `start+1..=stop`, rank r with `specs[r]` (the world is
/// `specs.len()`); rank 0's callback says Stop after epoch `stop_after`.
fn train(
    specs: &[JobSpec],
    start: u32,
    stop: u32,
    dir: &Path,
    stop_after: Option<u32>,
) -> Vec<Result<Run, TrainError>> {
    train_confined(specs, start, stop, dir, stop_after, &test_confinement())
}

/// As [`train`], reading and writing only as `confinement` allows.
fn train_confined(
    specs: &[JobSpec],
    start: u32,
    stop: u32,
    dir: &Path,
    stop_after: Option<u32>,
    confinement: &Confinement,
) -> Vec<Result<Run, TrainError>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let world = specs.len();
    let rings = must_connect_ring(&runtime, world);
    std::thread::scope(|scope| {
        let ranks: Vec<_> = rings
            .into_iter()
            .zip(specs)
            .enumerate()
            .map(|(rank, (mut ring, spec))| {
                let segment = Segment {
                    spec: spec.clone(),
                    rank,
                    world,
                    start_epoch: start,
                    stop_epoch: stop,
                    checkpoint_dir: dir.to_path_buf(),
                    device: Device::Cpu,
                    confinement: confinement.clone(),
                };
                let runtime = runtime.handle().clone();
                scope.spawn(move || {
                    let mut reports = Vec::new();
                    let outcome = run_segment(&segment, &mut ring, &runtime, &mut |report| {
                        reports.push(report.clone());
                        if rank == 0 && Some(report.epoch) == stop_after {
                            Control::Stop
                        } else {
                            Control::Continue
                        }
                    })?;
                    runtime.block_on(ring.close())?;
                    Ok(Run { reports, outcome })
                })
            })
            .collect();
        ranks.into_iter().map(|rank| rank.join().unwrap()).collect()
    })
}

/// As [`train`] with one spec for all ranks; every rank must succeed and
/// report the same metrics. Returns rank 0's run.
fn must_train(
    spec: &JobSpec,
    world: usize,
    start: u32,
    stop: u32,
    dir: &Path,
    stop_after: Option<u32>,
) -> Run {
    let mut runs: Vec<Run> = train(&vec![spec.clone(); world], start, stop, dir, stop_after)
        .into_iter()
        .map(|run| run.expect("training succeeds"))
        .collect();
    for other in &runs[1..] {
        assert_eq!(other.reports, runs[0].reports, "ranks disagree on metrics");
    }
    runs.swap_remove(0)
}

fn checkpoint_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::load_multi(path).unwrap().into_iter().collect()
}

/// Largest element-wise difference over the tensors named `prefix…`.
fn max_abs_diff(a: &Path, b: &Path, prefix: &str) -> f64 {
    let (a, b) = (checkpoint_tensors(a), checkpoint_tensors(b));
    let names: Vec<&String> = a.keys().filter(|n| n.starts_with(prefix)).collect();
    assert!(!names.is_empty(), "no tensors named {prefix}…");
    names
        .into_iter()
        .map(|n| (&a[n] - &b[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// A small learnable CSV: 4 features, label = which of three linear scores
/// is largest; a header line (auto-detected).
fn write_csv(dir: &Path, rows: usize) -> PathBuf {
    write_csv_file(&dir.join("train.csv"), rows, 0x2545_f491_4f6c_dd1d)
}

/// As [`write_csv`], at `path`, the rows drawn from `seed`.
fn write_csv_file(path: &Path, rows: usize, seed: u64) -> PathBuf {
    let path = path.to_path_buf();
    let mut file = std::fs::File::create(&path).unwrap();
    writeln!(file, "a,b,c,d,label").unwrap();
    let mut state = seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    for _ in 0..rows {
        let x: Vec<f64> = (0..4).map(|_| next()).collect();
        let scores = [x[0] + x[1], x[2] - x[0], x[3] - x[1]];
        let label = (0..3)
            .max_by(|&i, &j| scores[i].total_cmp(&scores[j]))
            .unwrap();
        writeln!(
            file,
            "{:.4},{:.4},{:.4},{:.4},{label}",
            x[0], x[1], x[2], x[3]
        )
        .unwrap();
    }
    path
}

#[test]
fn two_workers_with_batch_b_match_one_worker_with_batch_2b() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path(), 100);
    let job = |workers: usize, batch: u32| {
        spec(json!({
            "name": "equivalence", "workers": workers, "epochs": 2, "batch_size": batch,
            "seed": 3, "threads": 1,
            "dataset": {"format": "csv", "train": {"files": [csv]}, "classes": 3,
                        "shuffle": false, "limit_train": 64, "normalize": {"kind": "standard"}},
            "model": {"kind": "mlp", "hidden": [16, 16]},
            "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": true,
                          "weight_decay": 0.001, "grad_clip": 1.0},
        }))
    };
    // 64 examples: 2 × 4 steps of 2 × 8, or of 16.
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let single = must_train(&job(1, 16), 1, 0, 2, &one, None);
    let pair = must_train(&job(2, 8), 2, 0, 2, &two, None);
    let diff = max_abs_diff(
        single.outcome.checkpoint.as_ref().unwrap(),
        pair.outcome.checkpoint.as_ref().unwrap(),
        "model.",
    );
    assert!(diff <= 1e-5, "parameters differ by {diff}");
    let loss = |run: &Run| run.outcome.metrics["train_loss"];
    assert!((loss(&single) - loss(&pair)).abs() < 1e-5);
}

/// A job on CSV files `train-K.csv` (`rows[K]` rows each) and two test
/// files, whose files are dealt to its two workers.
fn file_sharded_job(dir: &Path, rows: &[usize]) -> (JobSpec, Vec<PathBuf>) {
    let file = |name: String, rows: usize, seed: u64| write_csv_file(&dir.join(name), rows, seed);
    let train: Vec<PathBuf> = rows
        .iter()
        .enumerate()
        .map(|(k, &n)| file(format!("train-{k}.csv"), n, 11 + k as u64))
        .collect();
    let test: Vec<PathBuf> = (0..2)
        .map(|k| file(format!("test-{k}.csv"), 100, 101 + k))
        .collect();
    let job = spec(json!({
        "name": "sharded", "workers": 2, "epochs": 4, "batch_size": 16, "seed": 5, "threads": 1,
        "dataset": {"format": "csv", "classes": 3, "normalize": {"kind": "standard"},
                    "drop_last": false, "train": {"files": train}, "test": {"files": test}},
        "model": {"kind": "mlp", "hidden": [32]},
        "optimizer": {"kind": "adam", "lr": 0.01},
    }));
    assert!(job.dataset.file_sharded(2));
    (job, train)
}

#[test]
fn file_sharded_workers_open_only_their_own_files_and_train_in_step() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // Unequal files: the ranks hold different counts and must still take
    // the same number of steps, or their rings would fall out of step.
    let (job, files) = file_sharded_job(dir.path(), &[150, 90, 120, 100]);
    let deal = FileDeal::new(files.len(), 2, job.seed, true).unwrap();
    let (mine, theirs) = (deal.files_of(0), deal.files_of(1));
    assert_eq!((mine.len(), theirs.len()), (2, 2));

    // Without one of rank 1's files, rank 1 fails naming it; rank 0 never
    // opens it, so it fails only because its peer did.
    let missing = &files[theirs[0]];
    let saved = std::fs::read(missing).unwrap();
    std::fs::remove_file(missing).unwrap();
    let runs = train(&[job.clone(), job.clone()], 0, 1, dir.path(), None);
    let errors: Vec<String> = runs
        .iter()
        .map(|run| run.as_ref().expect_err("a file is missing").to_string())
        .collect();
    eprintln!("with a file of rank 1 missing: {errors:#?}");
    let name = missing.display().to_string();
    assert!(errors[1].contains(&name), "rank 1: {}", errors[1]);
    assert!(
        !errors[0].contains(&name),
        "rank 0 opened it: {}",
        errors[0]
    );

    std::fs::write(missing, saved).unwrap();
    let run = must_train(&job, 2, 0, 4, &dir.path().join("run"), None);
    let first = &run.reports[0].metrics;
    let last = &run.outcome.metrics;
    eprintln!("file-sharded MLP: first epoch {first:?}, last {last:?}");
    assert!(
        last["train_loss"] < first["train_loss"],
        "{first:?} → {last:?}"
    );
    assert!(last["test_accuracy"] >= 0.8, "{last:?}");
}

/// The reference CNN on two workers (SGD 0.05, momentum 0.9, 64 per
/// worker): PyTorch DDP reaches 0.855 test accuracy after one epoch.
#[test]
fn the_reference_cnn_learns_fashion_mnist_on_two_workers_in_one_epoch() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = spec(json!({
        "name": "fashion", "workers": 2, "epochs": 1, "batch_size": 64, "seed": 1, "threads": 1,
        "dataset": {"format": "idx", "train": fashion("train"), "test": fashion("t10k"),
                    "classes": 10, "normalize": {"kind": "fixed", "mean": 0.2860, "std": 0.3530}},
        "model": {"kind": "cnn"},
        "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
    }));
    let run = must_train(&job, 2, 0, 1, dir.path(), None);
    let metrics = &run.outcome.metrics;
    eprintln!("reference CNN, 2 workers, 1 epoch: {metrics:?}");
    assert!(metrics["test_accuracy"] >= 0.85, "{metrics:?}");
    assert!(run.outcome.checkpoint.unwrap().ends_with("epoch-00001.ot"));
}

#[test]
fn a_stopped_and_resumed_run_equals_an_uninterrupted_one() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = spec(json!({
        "name": "resume", "workers": 2, "epochs": 3, "batch_size": 32, "seed": 11, "threads": 1,
        "dataset": {"format": "idx", "train": fashion("train"), "test": fashion("t10k"),
                    "classes": 10, "limit_train": 500, "limit_test": 300, "drop_last": false,
                    "normalize": {"kind": "fixed", "mean": 0.2860, "std": 0.3530}},
        "model": {"kind": "cnn", "channels": [4, 8], "hidden": 16},
        "optimizer": {"kind": "adamw", "lr": 0.01, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_steps": 5, "min_lr": 0.001},
        "checkpoint": {"interval_epochs": 5},
    }));
    let (straight, resumed) = (dir.path().join("straight"), dir.path().join("resumed"));
    let whole = must_train(&job, 2, 0, 3, &straight, None);
    assert_eq!(whole.reports.len(), 3);

    let first = must_train(&job, 2, 0, 3, &resumed, Some(2));
    assert_eq!(first.outcome.last_epoch, 2, "stopped after epoch 2");
    assert_eq!(first.reports[1].checkpoint, None, "not due at epoch 2…");
    assert_eq!(
        first.outcome.checkpoint.as_deref(),
        Some(resumed.join("epoch-00002.ot").as_path()),
        "…but written on stop"
    );
    let rest = must_train(&job, 2, 2, 3, &resumed, None);
    assert_eq!(rest.reports.len(), 1);

    let (a, b) = (
        straight.join("epoch-00003.ot"),
        resumed.join("epoch-00003.ot"),
    );
    // Bit for bit (docs/TRAINING.md says so): no tolerance.
    let (a, b) = (checkpoint_tensors(&a), checkpoint_tensors(&b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for prefix in ["model.", "optim."] {
        assert!(
            a.keys().any(|n| n.starts_with(prefix)),
            "no {prefix}* tensors"
        );
    }
    let bits = |t: &Tensor| -> Vec<u8> {
        let bytes = t.flatten(0, -1).view_dtype(tch::Kind::Uint8);
        Vec::try_from(bytes).unwrap()
    };
    for (name, tensor) in &a {
        assert!(
            bits(tensor) == bits(&b[name]),
            "{name} differs between the runs"
        );
    }
    assert_eq!(
        whole.reports[2].metrics["test_accuracy"],
        rest.reports[0].metrics["test_accuracy"]
    );
}

#[test]
fn a_torchscript_module_trains_and_its_loss_falls() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("net.pt");
    let script = r#"
import sys, torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 5, stride=2)
        self.fc = torch.nn.Linear(8 * 12 * 12, 10)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))
torch.manual_seed(0)
torch.jit.script(Net()).save(sys.argv[1])
"#;
    // torch.jit.script reads the class's source, so it must live in a file.
    let exporter = write(dir.path(), "export.py", script.as_bytes());
    let status = std::process::Command::new("python")
        .arg(&exporter)
        .arg(&module)
        .status()
        .expect("python runs (scripts/env.sh puts the venv with torch on PATH)");
    assert!(status.success(), "exporting the TorchScript module failed");
    let job = spec(json!({
        "name": "script", "workers": 2, "epochs": 3, "batch_size": 32, "seed": 5, "threads": 1,
        "dataset": {"format": "idx", "train": fashion("train"), "test": fashion("t10k"),
                    "classes": 10, "limit_train": 2000, "limit_test": 500},
        "model": {"kind": "torchscript", "path": module},
        "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
    }));
    let run = must_train(&job, 2, 0, 3, dir.path(), None);
    let losses: Vec<f64> = run
        .reports
        .iter()
        .map(|r| r.metrics["train_loss"])
        .collect();
    assert!(losses[2] < losses[0] * 0.8, "loss did not fall: {losses:?}");
    assert!(
        run.outcome.metrics["test_accuracy"] > 0.6,
        "{:?}",
        run.outcome.metrics
    );
    let saved = checkpoint_tensors(run.outcome.checkpoint.as_ref().unwrap());
    assert!(
        saved.contains_key("model.conv_weight"),
        "{:?}",
        saved.keys()
    );
}

/// The error a single worker reports for `dataset`.
fn dataset_error(dir: &Path, dataset: Value) -> String {
    let job = spec(json!({
        "name": "bad", "epochs": 1, "dataset": dataset, "model": {"kind": "mlp"},
    }));
    let result = train(&[job], 0, 1, &dir.join("checkpoints"), None).remove(0);
    result.expect_err("training must fail").to_string()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// An IDX header (unsigned bytes) for `dims`.
fn idx_header(dims: &[u32]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes
}

#[test]
fn bad_datasets_are_errors_that_name_the_file_and_the_place() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut images = idx_header(&[4, 2, 2]);
    images.extend([7; 16]);
    let images = write(dir, "images.idx", &images);
    let idx = |images: &Path, labels: &Path| json!({"format": "idx", "classes": 10, "train": {"images": images, "labels": labels}});
    let mut labels = idx_header(&[4]);
    labels.extend([1, 2, 3, 12]);
    let labels = write(dir, "labels.idx", &labels);

    let missing = dir.join("nowhere.idx");
    let message = dataset_error(dir, idx(&images, &missing));
    assert!(
        message.contains("nowhere.idx") && message.contains("cannot read"),
        "{message}"
    );

    let mut short = idx_header(&[4, 2, 2]);
    short.extend([7; 10]);
    let short = write(dir, "short.idx", &short);
    let message = dataset_error(dir, idx(&short, &labels));
    assert!(
        message.contains("short.idx") && message.contains("truncated IDX file"),
        "{message}"
    );
    assert!(
        message.contains("promises 32 bytes, it holds 26"),
        "{message}"
    );

    let text = write(dir, "text.idx", b"hello, world");
    let message = dataset_error(dir, idx(&text, &labels));
    assert!(
        message.contains("text.idx") && message.contains("expected an IDX file"),
        "{message}"
    );

    let message = dataset_error(dir, idx(&images, &labels));
    assert!(
        message
            .contains("labels.idx: example 3: expected a label in 0..10, found one of 10 or more"),
        "{message}"
    );

    let csv = |name: &str, text: &str| {
        let path = write(dir, name, text.as_bytes());
        json!({"format": "csv", "classes": 3, "train": {"files": [path]}})
    };
    let message = dataset_error(dir, csv("columns.csv", "x,y,label\n1,2,0\n3,1\n"));
    assert!(
        message.contains("columns.csv:3: expected 3 columns, found 2"),
        "{message}"
    );
    let message = dataset_error(dir, csv("cell.csv", "1,2,0\n3,abc,1\n"));
    assert!(
        message.contains(
            "cell.csv:2:2: expected a number in column 2 (feature), found text of 3 bytes"
        ),
        "{message}"
    );
    let message = dataset_error(dir, csv("label.csv", "1,2,0\n3,4,1\n5,6,7\n"));
    assert!(
        message.contains("label.csv:3:3: expected a label in 0..3, found one of 3 or more"),
        "{message}"
    );

    let narrow = write(dir, "narrow.csv", b"1,0\n");
    let wide = write(dir, "wide.csv", b"1,2,0\n");
    let message = dataset_error(
        dir,
        json!({"format": "csv", "classes": 3, "train": {"files": [wide]}, "test": {"files": [narrow]}}),
    );
    assert!(
        message.contains("test examples have shape [1], training examples [2]"),
        "{message}"
    );
}

#[test]
fn a_rank_that_fails_makes_its_peer_fail_instead_of_hang() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path(), 40);
    let job = |file: &Path| {
        spec(json!({
            "name": "peer", "workers": 2, "epochs": 1,
            "dataset": {"format": "csv", "train": {"files": [file]}, "classes": 3},
            "model": {"kind": "mlp"},
        }))
    };
    let started = Instant::now();
    let results = train(
        &[job(&csv), job(&dir.path().join("missing.csv"))],
        0,
        1,
        dir.path(),
        None,
    );
    assert!(
        matches!(results[1], Err(TrainError::Unreadable { .. })),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[0], Err(TrainError::Ring(_))),
        "{:?}",
        results[0]
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_synthetic_objective_converges_from_above_and_resumes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = spec(json!({
        "name": "branin", "epochs": 4,
        "dataset": {"format": "csv", "train": {"files": []}, "classes": 1},
        "model": {"kind": "synthetic", "function": "branin", "x1": std::f64::consts::PI,
                  "x2": 2.275, "epoch_ms": 20},
    }));
    let first = must_train(&job, 1, 0, 4, dir.path(), Some(2));
    let objectives: Vec<f64> = first
        .reports
        .iter()
        .map(|r| r.metrics["objective"])
        .collect();
    let minimum = 0.397887;
    assert!(
        (objectives[0] - (minimum + (1.0 + minimum) / 2.0)).abs() < 1e-5,
        "{objectives:?}"
    );
    assert!(objectives[1] < objectives[0] && objectives[1] > minimum);
    assert!(first.reports[0].metrics["epoch_seconds"] >= 0.02);
    assert_eq!(
        first.outcome.checkpoint,
        Some(dir.path().join("epoch-00002.json"))
    );

    let rest = must_train(&job, 1, 2, 4, dir.path(), None);
    let epochs: Vec<u32> = rest.reports.iter().map(|r| r.epoch).collect();
    assert_eq!(epochs, [3, 4]);
    let error = train(&[job], 3, 4, &dir.path().join("empty"), None)
        .remove(0)
        .unwrap_err();
    assert!(error.to_string().contains("epoch-00003.json"), "{error}");
}

#[test]
fn checkpoints_outside_the_checkpoint_root_fail_the_segment_and_write_nothing() {
    let _serial = serial();
    let temp = tempfile::tempdir().unwrap();
    let base = temp.path();
    let root = base.join("checkpoints");
    let elsewhere = base.join("elsewhere");
    let confinement = Confinement::new([base], [&root]).unwrap();
    let job = |dir: Option<&Path>| {
        spec(json!({
            "name": "branin", "epochs": 2,
            "dataset": {"format": "csv", "train": {"files": []}, "classes": 1},
            "model": {"kind": "synthetic", "function": "branin", "x1": 1.0, "x2": 2.0,
                      "epoch_ms": 1},
            "checkpoint": {"dir": dir},
        }))
    };
    let error = |spec: JobSpec, dir: &Path| {
        train_confined(&[spec], 0, 2, dir, None, &confinement)
            .remove(0)
            .expect_err("the segment must fail")
            .to_string()
    };
    // The job's checkpoint.dir: named as the job gave it.
    let message = error(job(Some(&elsewhere)), &elsewhere.join("s1/trial-000001"));
    assert_eq!(
        message,
        format!(
            "checkpoint.dir {elsewhere:?} is not under this worker's checkpoint root ({}): \
             a worker writes checkpoints only under its --checkpoint-root",
            root.display()
        )
    );
    // `..` out of the root, and the coordinator's directory when the job
    // names none.
    let escape = root.join("../elsewhere");
    let message = error(job(Some(&escape)), &escape.join("s1/trial-000001"));
    assert!(
        message.starts_with(&format!("checkpoint.dir {escape:?} is not under")),
        "{message}"
    );
    let trial = elsewhere.join("s1/trial-000002");
    let message = error(job(None), &trial);
    assert!(
        message.starts_with(&format!(
            "checkpoint directory (the coordinator's --checkpoint-dir) {trial:?} is not under"
        )),
        "{message}"
    );
    assert!(!elsewhere.exists(), "nothing is written outside the root");

    // Under the root: written, and reported under the directory as given.
    let given = root.join("s1/../s1/trial-000003");
    let run = train_confined(&[job(Some(&root))], 0, 2, &given, None, &confinement)
        .remove(0)
        .expect("checkpoints under the root");
    assert_eq!(run.outcome.checkpoint, Some(given.join("epoch-00002.json")));
    assert!(root.join("s1/trial-000003/epoch-00002.json").is_file());
}

#[test]
fn a_torchscript_module_outside_the_data_roots_is_refused_before_it_is_read() {
    let _serial = serial();
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let csv = write_csv(&data, 20);
    let confinement = Confinement::new([&data], [temp.path()]).unwrap();
    let outside = temp.path().join("net.pt");
    std::fs::write(&outside, b"not a module").unwrap();
    let mut messages = Vec::new();
    for module in [
        outside.clone(),
        temp.path().join("missing.pt"),
        data.join("../net.pt"),
    ] {
        let job = spec(json!({
            "name": "script", "epochs": 1,
            "dataset": {"format": "csv", "train": {"files": [csv]}, "classes": 3},
            "model": {"kind": "torchscript", "path": module},
        }));
        let message = train_confined(&[job], 0, 1, &temp.path().join("ck"), None, &confinement)
            .remove(0)
            .expect_err("the module must be refused")
            .to_string();
        assert!(
            message.starts_with(&format!(
                "model.path {module:?} is not under this worker's data root ("
            )),
            "{message}"
        );
        messages.push(message.replace(&format!("{module:?}"), "<path>"));
    }
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:#?}");
}

/// A `.npy` file (version 1) holding `data`, C order.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: String = shape.iter().map(|d| format!("{d},")).collect();
    let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    npy_with_header(&header, data)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The same examples as CSV (two files), gzipped `.npy` and safetensors
/// (f64 features, u8 labels) train to the same parameters.
#[test]
fn csv_npy_and_safetensors_hold_the_same_examples() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let rows = 48;
    // Multiples of 1/16 survive every format exactly.
    let features: Vec<f32> = (0..rows * 3)
        .map(|i| ((i * 7) % 33) as f32 / 16.0 - 1.0)
        .collect();
    let labels: Vec<u8> = (0..rows).map(|i| (i % 3) as u8).collect();

    let csv_lines: Vec<String> = (0..rows)
        .map(|r| {
            let x = &features[r * 3..r * 3 + 3];
            format!("{},{},{},{}\n", labels[r], x[0], x[1], x[2])
        })
        .collect();
    let first = write(
        dir,
        "a.csv",
        format!("label,x,y,z\n{}", csv_lines[..20].concat()).as_bytes(),
    );
    let second = write(dir, "b.csv", csv_lines[20..].concat().as_bytes());

    let f32_bytes: Vec<u8> = features.iter().flat_map(|x| x.to_le_bytes()).collect();
    let i64_bytes: Vec<u8> = labels
        .iter()
        .flat_map(|&l| i64::from(l).to_le_bytes())
        .collect();
    let npy_features = write(dir, "x.npy.gz", &gzip(&npy("<f4", &[rows, 3], &f32_bytes)));
    let npy_labels = write(dir, "y.npy", &npy("<i8", &[rows], &i64_bytes));

    let f64_bytes: Vec<u8> = features
        .iter()
        .flat_map(|&x| f64::from(x).to_le_bytes())
        .collect();
    let view = |dtype, shape: Vec<usize>, data| {
        safetensors::tensor::TensorView::new(dtype, shape, data).unwrap()
    };
    let tensors = [
        (
            "x",
            view(safetensors::Dtype::F64, vec![rows, 3], &f64_bytes[..]),
        ),
        ("y", view(safetensors::Dtype::U8, vec![rows], &labels[..])),
    ];
    let safetensors_file = write(
        dir,
        "data.safetensors",
        &safetensors::serialize(tensors, None).unwrap(),
    );

    let datasets = [
        ("csv", json!({"files": [first, second], "label_column": 0})),
        (
            "npy",
            json!({"features": npy_features, "labels": npy_labels}),
        ),
        (
            "safetensors",
            json!({"files": [safetensors_file], "features_key": "x", "labels_key": "y"}),
        ),
    ];
    let checkpoints: Vec<PathBuf> = datasets
        .into_iter()
        .map(|(format, train)| {
            let job = spec(json!({
                "name": format, "epochs": 1, "batch_size": 8, "seed": 2, "threads": 1,
                "dataset": {"format": format, "train": train, "classes": 3, "shuffle": false,
                            "normalize": {"kind": "minmax"}},
                "model": {"kind": "mlp", "hidden": [8]},
                "optimizer": {"kind": "adam", "lr": 0.01},
            }));
            must_train(&job, 1, 0, 1, &dir.join(format), None)
                .outcome
                .checkpoint
                .unwrap()
        })
        .collect();
    for other in &checkpoints[1..] {
        assert_eq!(
            max_abs_diff(&checkpoints[0], other, "model."),
            0.0,
            "{}",
            other.display()
        );
    }
}

/// A job on [`write_csv`]'s data whose learning rate jumps from 0.01 to an
/// absurd 1e28 after the first epoch (a step schedule with gamma 1e30).
fn diverging_job(csv: &Path, on_divergence: &str) -> JobSpec {
    spec(json!({
        "name": "diverge", "epochs": 4, "batch_size": 8, "seed": 3, "threads": 1,
        "on_divergence": on_divergence,
        "dataset": {"format": "csv", "train": {"files": [csv]}, "test": {"files": [csv]},
                    "classes": 3},
        "model": {"kind": "mlp", "hidden": [16]},
        "optimizer": {"kind": "sgd", "lr": 0.01},
        "schedule": {"kind": "step", "step_epochs": 1, "gamma": 1e30},
    }))
}

/// Metrics with NaN made comparable (NaN != NaN).
fn bits(reports: &[EpochReport]) -> Vec<(u32, Vec<(String, u64)>)> {
    reports
        .iter()
        .map(|r| {
            let metrics = r
                .metrics
                .iter()
                .filter(|(name, _)| !name.contains("seconds") && !name.contains("per_sec"))
                .map(|(name, value)| (name.clone(), value.to_bits()))
                .collect();
            (r.epoch, metrics)
        })
        .collect()
}

#[test]
fn a_diverging_run_stops_at_the_first_non_finite_loss_unless_told_to_continue() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path(), 64);

    let runs: Vec<Run> = train(
        &vec![diverging_job(&csv, "stop"); 2],
        0,
        4,
        &dir.path().join("stop"),
        None,
    )
    .into_iter()
    .map(|run| run.expect("a diverged run is an outcome, not an error"))
    .collect();
    let stopped = &runs[0];
    let loss = |report: &EpochReport| report.metrics["train_loss"];
    assert!(
        loss(&stopped.reports[0]).is_finite(),
        "{:?}",
        stopped.reports
    );
    // Epoch 1 trains at lr 0.01; epoch 2 at 1e28 diverges, and it is the
    // last one trained: its metrics (NaN or inf included) were seen first.
    assert_eq!(stopped.reports.len(), 2, "{:?}", stopped.reports);
    let diverged_loss = loss(&stopped.reports[1]);
    assert!(!diverged_loss.is_finite(), "{:?}", stopped.reports);
    let diverged = stopped.outcome.diverged.as_ref().expect("diverged");
    assert_eq!(
        diverged.to_string(),
        format!("loss is {diverged_loss} at epoch 2")
    );
    assert!(
        [
            "loss is NaN at epoch 2",
            "loss is inf at epoch 2",
            "loss is -inf at epoch 2"
        ]
        .contains(&diverged.to_string().as_str()),
        "{diverged}"
    );
    assert_eq!(stopped.outcome.last_epoch, 2);
    for other in &runs[1..] {
        assert_eq!(bits(&other.reports), bits(&stopped.reports));
        let other = other
            .outcome
            .diverged
            .as_ref()
            .expect("every rank diverges");
        assert_eq!(other.to_string(), diverged.to_string());
    }

    let continued = must_train_with_nan(&diverging_job(&csv, "continue"), &dir.path().join("go"));
    assert!(continued.outcome.diverged.is_none());
    assert_eq!(continued.outcome.last_epoch, 4);
    let epochs: Vec<u32> = continued.reports.iter().map(|r| r.epoch).collect();
    assert_eq!(epochs, [1, 2, 3, 4]);
    assert_eq!(bits(&continued.reports[..2]), bits(&stopped.reports));
    assert!(continued.reports[2..].iter().all(|r| !loss(r).is_finite()));
}

/// Two workers train every epoch; metrics may be NaN. Rank 0's run.
fn must_train_with_nan(spec: &JobSpec, dir: &Path) -> Run {
    let mut runs: Vec<Run> = train(&vec![spec.clone(); 2], 0, spec.epochs, dir, None)
        .into_iter()
        .map(|run| run.expect("training succeeds"))
        .collect();
    assert_eq!(bits(&runs[1].reports), bits(&runs[0].reports));
    runs.swap_remove(0)
}

/// Gradients sent as bf16 or f16 (PyTorch DDP's compression hooks): two
/// workers stay in step (every rank reports the same bits), the loss falls,
/// and they land near where f32 gradients take them. `ddp.rs`'s unit tests
/// compare the two replicas' parameters bit for bit.
#[test]
fn compressed_gradients_train_two_workers_in_step_and_close_to_f32() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = |compression: &str| {
        spec(json!({
            "name": "compressed", "workers": 2, "epochs": 2, "batch_size": 32, "seed": 4,
            "threads": 1, "gradient_compression": compression,
            "dataset": {"format": "idx", "train": fashion("train"), "test": fashion("t10k"),
                        "classes": 10, "limit_train": 2048, "limit_test": 1000,
                        "normalize": {"kind": "fixed", "mean": 0.2860, "std": 0.3530}},
            "model": {"kind": "cnn", "channels": [8, 16], "hidden": 32},
            "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
        }))
    };
    let run = |compression: &str, world: usize| {
        let dir = dir.path().join(format!("{compression}-{world}"));
        // must_train: every rank reports the same metrics.
        must_train(&job(compression), world, 0, 2, &dir, None)
    };
    let plain = run("none", 2);
    let checkpoint = |run: &Run| run.outcome.checkpoint.clone().unwrap();
    let metric = |run: &Run, epoch: usize, name: &str| run.reports[epoch].metrics[name];
    for compression in ["bf16", "f16"] {
        let compressed = run(compression, 2);
        let diff = max_abs_diff(&checkpoint(&plain), &checkpoint(&compressed), "model.");
        eprintln!(
            "{compression}: train loss {:.4} → {:.4}, test accuracy {:.4} (f32: {:.4} → {:.4}, \
             {:.4}); parameters differ from f32's by up to {diff:.2e}",
            metric(&compressed, 0, "train_loss"),
            metric(&compressed, 1, "train_loss"),
            metric(&compressed, 1, "test_accuracy"),
            metric(&plain, 0, "train_loss"),
            metric(&plain, 1, "train_loss"),
            metric(&plain, 1, "test_accuracy"),
        );
        assert!(
            metric(&compressed, 1, "train_loss") < metric(&compressed, 0, "train_loss"),
            "{compression}: the loss does not fall: {:?}",
            compressed.reports
        );
        // Rounding errors compound over 128 steps, so parameters drift
        // apart (by up to ~0.3 here): compare what training achieves.
        assert!(diff > 0.0, "{compression}: nothing was rounded");
        let loss = metric(&compressed, 1, "train_loss");
        assert!(
            (loss - metric(&plain, 1, "train_loss")).abs() <= 0.05 * loss,
            "{compression}: train loss {loss}"
        );
        let accuracy = metric(&compressed, 1, "test_accuracy");
        assert!(
            (accuracy - metric(&plain, 1, "test_accuracy")).abs() <= 0.03,
            "{compression}: test accuracy {accuracy}"
        );
    }
    // One worker sends nothing, so there is nothing to compress.
    let (alone, alone_bf16) = (run("none", 1), run("bf16", 1));
    assert_eq!(
        max_abs_diff(&checkpoint(&alone), &checkpoint(&alone_bf16), "model."),
        0.0
    );
}
