//! `ringleader model export` and lineage through a real cluster: a tiny
//! job trains, its trial records where it came from, and the exported
//! model.pt, loaded by PyTorch itself (the set-up's venv), predicts the
//! test split exactly as the worker's model did. Bad requests fail
//! saying why.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ringleader_coordinator::sweep::client::{self as sweeps, SweepView};
use ringleader_coordinator::sweep::{SweepKind, SweepState, TrialState};
use ringleader_tests::sweeps::{client, must_finish_sweep, write_spec};
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

/// `n` examples of 6 features in 3 classes: the class moves the first
/// three features; every feature is far from 0 and wide, so the job's
/// standard normalisation matters (and must travel inside model.pt).
fn write_split(dir: &Path, name: &str, n: usize, mut state: u64) {
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for i in 0..n {
        let class = (i % 3) as u8;
        let mut x = [0f32; 6];
        for (j, value) in x.iter_mut().enumerate() {
            let signal = if j == usize::from(class) { 1.0 } else { 0.0 };
            *value = 40.0 + 10.0 * (signal + 1.2 * next());
        }
        labels.push(class);
        features.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    }
    npy(
        &dir.join(format!("{name}-x.npy")),
        "<f4",
        &format!("{n}, 6"),
        &features,
    );
    npy(
        &dir.join(format!("{name}-y.npy")),
        "|u1",
        &format!("{n},"),
        &labels,
    );
}

fn job(dir: &Path, train_features: &str) -> String {
    format!(
        r#"name = "exportable"
workers = 1
epochs = 3
batch_size = 16
eval_batch_size = 50
seed = 11

[dataset]
format = "npy"
classes = 3
normalize = {{ kind = "standard" }}
train = {{ features = "{train_features}", labels = "{0}/train-y.npy" }}
test = {{ features = "{0}/test-x.npy", labels = "{0}/test-y.npy" }}

[model]
kind = "mlp"
hidden = [16]

[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
"#,
        dir.display()
    )
}

/// `ringleader model export …` against `cluster`, as a user runs it.
fn export(cluster: &TestCluster, args: &[&str], checkpoint_root: &Path) -> Output {
    command("ringleader")
        .args(["model", "export"])
        .args(args)
        .env("RINGLEADER_CONFIG", cluster.cluster.client_config_path())
        .env("RINGLEADER_CHECKPOINT_ROOT", checkpoint_root)
        .env("RINGLEADER_DATA_ROOTS", cluster.dir())
        .output()
        .unwrap()
}

/// Exports `what` (a job, or a sweep and `--best`) to `out`, runs the
/// exported model.pt in PyTorch on the test split in `dir`, and checks
/// that it predicts exactly as the export recorded and scores the test
/// accuracy the worker `reported`. Returns the model card.
fn export_and_predict(cluster: &TestCluster, what: &[&str], out: &Path, reported: f64) -> Value {
    let out_arg = out.display().to_string();
    let args: Vec<&str> = what.iter().copied().chain(["--out", &out_arg]).collect();
    let output = export(cluster, &args, &cluster.cluster.checkpoint_root());
    assert!(output.status.success(), "{}", text(&output));
    let card: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
    let dir = cluster.dir();
    let run = Command::new(python())
        .args(["-c", PREDICT])
        .arg(out)
        .arg(dir.join("test-x.npy"))
        .arg(dir.join("test-y.npy"))
        .arg("50")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let torch: Value = serde_json::from_slice(&run.stdout).unwrap();
    let accuracy = torch["correct"].as_f64().unwrap() / torch["examples"].as_f64().unwrap();
    assert_eq!(accuracy, reported, "PyTorch's test accuracy");
    // Every prediction equals the trained model's, as the export saw it.
    assert_eq!(torch["sha256"], card["check"]["predictions_sha256"]);
    card
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The set-up's Python with torch 2.11 (scripts/setup.sh).
fn python() -> PathBuf {
    let cache = std::env::var_os("RINGLEADER_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/ringleader"),
        PathBuf::from,
    );
    cache.join("venv/bin/python")
}

/// What PyTorch makes of model.pt on the test split, batch by batch as
/// the worker evaluates.
const PREDICT: &str = r#"
import hashlib, json, sys
import numpy as np, torch
out, features, labels, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = torch.jit.load(f"{out}/model.pt")
model.eval()
x = torch.from_numpy(np.load(features))
y = torch.from_numpy(np.load(labels)).to(torch.int64)
with torch.no_grad():
    p = torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
p = p.to(torch.int64).numpy().astype("<i8")
print(json.dumps({
    "sha256": hashlib.sha256(p.tobytes()).hexdigest(),
    "correct": int((torch.from_numpy(p) == y).sum()),
    "examples": len(y),
}))
"#;

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The tensor names in a safetensors file's header.
fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

async fn must_run_job(cluster: &TestCluster, name: &str, text: &str) -> SweepView {
    let spec = write_spec(cluster, name, text);
    let id = sweeps::submit(&client(cluster), SweepKind::Job, &spec)
        .await
        .unwrap_or_else(|e| panic!("submit {name}: {e}"));
    must_finish_sweep(&client(cluster), &id, Duration::from_secs(240)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_model_predicts_in_pytorch_as_the_worker_did_and_carries_its_lineage() {
    let cluster = TestCluster::must_start_formed(1, 1).await;
    let dir = cluster.dir().to_path_buf();
    write_split(&dir, "train", 300, 0x2545_f491_4f6c_dd1d);
    write_split(&dir, "test", 120, 0x9e37_79b9_7f4a_7c15);
    let train = dir.join("train-x.npy").display().to_string();
    let view = must_run_job(&cluster, "job.toml", &job(&dir, &train)).await;
    assert_eq!(
        view.record.state,
        SweepState::Completed,
        "{:?}",
        view.trials
    );
    let trial = &view.trials[0];
    let reported = trial.metrics.last().unwrap().metrics["test_accuracy"];
    assert!(reported > 0.5, "the job did not learn: {reported}");

    // Lineage: the data files' SHA-256 as an independent tool computes it.
    let lineage = trial
        .lineage
        .as_ref()
        .expect("the trial records its lineage");
    let files: Vec<(&str, &str)> = lineage
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.sha256.as_str()))
        .collect();
    let expected: Vec<(String, String)> = ["train-x", "train-y", "test-x", "test-y"]
        .iter()
        .map(|name| {
            let path = dir.join(format!("{name}.npy"));
            (path.display().to_string(), sha256sum(&path))
        })
        .collect();
    let expected: Vec<(&str, &str)> = expected
        .iter()
        .map(|(p, s)| (p.as_str(), s.as_str()))
        .collect();
    assert_eq!(files, expected);
    assert_eq!(lineage.seed, 11);
    assert_eq!(lineage.spec_sha256.len(), 64);
    assert!(
        lineage.worker_commit == "unknown" || lineage.worker_commit.len() == 40,
        "{}",
        lineage.worker_commit
    );
    assert_eq!(lineage.worker_version, env!("CARGO_PKG_VERSION"));
    assert!(lineage.started_unix_ms <= lineage.ended_unix_ms);
    let status = command("ringleader")
        .args(["job", "status", &view.record.id, "--trial", "0"])
        .env("RINGLEADER_CONFIG", cluster.cluster.client_config_path())
        .output()
        .unwrap();
    let shown = text(&status);
    assert!(status.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("sha256 {}", expected[0].1)),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("spec sha256 {}", lineage.spec_sha256)),
        "{shown}"
    );

    // Export, then PyTorch on the test split.
    let out = dir.join("exported");
    let checkpoints = cluster.cluster.checkpoint_root();
    let card = export_and_predict(&cluster, &[&view.record.id], &out, reported);
    assert_eq!(card["check"]["accuracy"].as_f64(), Some(reported));
    assert_eq!(card["check"]["examples"], 120);

    // The card: spec, hyperparameters, input, preparation, metrics, lineage.
    assert_eq!(card["spec"]["name"], "exportable");
    assert_eq!(card["input"]["shape"], serde_json::json!([6]));
    assert_eq!(card["input"]["normalisation_in_module"], true);
    assert_eq!(card["preparation"]["normalize"]["kind"], "standard");
    assert_eq!(
        card["preparation"]["normalize"]["shift"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    assert_eq!(
        card["final_metrics"]["metrics"]["test_accuracy"].as_f64(),
        Some(reported)
    );
    assert_eq!(card["lineage"], serde_json::to_value(lineage).unwrap());
    assert_eq!(card["trial"], 0);
    let mut names = safetensors_names(&out.join("model.safetensors"));
    names.sort();
    assert_eq!(names, ["fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight"]);

    // Bad requests.
    let other = dir.join("other").display().to_string();
    let output = export(
        &cluster,
        &[&view.record.id, "--out", &out.display().to_string()],
        &checkpoints,
    );
    assert!(!output.status.success());
    assert!(
        text(&output).contains("exists and is not empty"),
        "{}",
        text(&output)
    );
    let output = export(
        &cluster,
        &[&format!("{}/4", view.record.id), "--out", &other],
        &checkpoints,
    );
    assert!(!output.status.success());
    assert!(
        text(&output).contains("has no trial 4"),
        "{}",
        text(&output)
    );
    let output = export(&cluster, &["no-such-job", "--out", &other], &checkpoints);
    assert!(!output.status.success());
    assert!(text(&output).contains("no-such-job"), "{}", text(&output));
    // A checkpoint outside the export's checkpoint root is not read.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let output = export(&cluster, &[&view.record.id, "--out", &other], &elsewhere);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("--checkpoint-root"),
        "{}",
        text(&output)
    );
    assert!(!Path::new(&other).join("model.pt").exists());

    // A trial that never trained has no checkpoint to export.
    let missing = dir.join("missing-x.npy").display().to_string();
    let failed = must_run_job(&cluster, "failing.toml", &job(&dir, &missing)).await;
    assert_eq!(failed.trials[0].state, TrialState::Failed);
    let output = export(
        &cluster,
        &[&failed.record.id, "--out", &other],
        &checkpoints,
    );
    assert!(!output.status.success());
    assert!(
        text(&output).contains("has no checkpoint"),
        "{}",
        text(&output)
    );
}

/// A user's TorchScript network (scripted by PyTorch) for 6 features and
/// 3 classes.
const SCRIPTED: &str = r#"
import sys, torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(6, 16)
        self.out = torch.nn.Linear(16, 3)
    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))
torch.manual_seed(0)
torch.jit.script(Net()).save(sys.argv[1])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeps_best_torchscript_trial_exports_and_predicts_as_the_worker_did() {
    let cluster = TestCluster::must_start_formed(1, 1).await;
    let dir = cluster.dir().to_path_buf();
    write_split(&dir, "train", 300, 0x2545_f491_4f6c_dd1d);
    write_split(&dir, "test", 120, 0x9e37_79b9_7f4a_7c15);
    let module = dir.join("net.pt");
    // TorchScript reads the class's source: a file, not `python -c`.
    let script = dir.join("script_net.py");
    std::fs::write(&script, SCRIPTED).unwrap();
    let made = Command::new(python())
        .arg(&script)
        .arg(&module)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let train = dir.join("train-x.npy").display().to_string();
    let job = job(&dir, &train).replace(
        "kind = \"mlp\"\nhidden = [16]",
        &format!("kind = \"torchscript\"\npath = \"{}\"", module.display()),
    );
    let body: String = job
        .lines()
        .map(|line| match line.strip_prefix('[') {
            Some(table) => format!("[job.{table}\n"),
            None => format!("{line}\n"),
        })
        .collect();
    let spec = format!(
        "[sweep]\nname = \"scripted\"\nsearcher = \"grid\"\nworkers_per_trial = 1\nmax_epochs = 3\n\
         objective = {{ metric = \"test_accuracy\", mode = \"max\" }}\n\n\
         [sweep.params]\n\"optimizer.lr\" = {{ kind = \"choice\", values = [0.0001, 0.05] }}\n\n\
         [job]\n{body}"
    );
    let path = write_spec(&cluster, "sweep.toml", &spec);
    let id = sweeps::submit(&client(&cluster), SweepKind::Sweep, &path)
        .await
        .unwrap_or_else(|e| panic!("submit: {e}"));
    let view = must_finish_sweep(&client(&cluster), &id, Duration::from_secs(240)).await;
    assert_eq!(
        view.record.state,
        SweepState::Completed,
        "{:?}",
        view.trials
    );
    let best = view.best().expect("a best trial");
    let reported = best.metrics.last().unwrap().metrics["test_accuracy"];

    let out = dir.join("best");
    let card = export_and_predict(&cluster, &[&id, "--best"], &out, reported);
    assert_eq!(card["trial"], best.number);
    assert_eq!(
        card["hyperparameters"],
        serde_json::to_value(&best.config).unwrap()
    );
    // The module file is part of the lineage.
    let lineage = best.lineage.as_ref().unwrap();
    let last = lineage.files.last().unwrap();
    assert_eq!(
        (last.path.as_str(), last.sha256.as_str()),
        (
            module.display().to_string().as_str(),
            sha256sum(&module).as_str()
        )
    );
    let mut names = safetensors_names(&out.join("model.safetensors"));
    names.sort();
    assert_eq!(
        names,
        ["hidden_bias", "hidden_weight", "out_bias", "out_weight"]
    );
}

/// `n` single-channel 12×12 images in 3 classes: class c brightens rows
/// 4c..4c+4, over noise.
fn write_images(dir: &Path, name: &str, n: usize, mut state: u64) {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = i % 3;
        for row in 0..12 {
            for _ in 0..12 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state >> 40) as f32 / (1u64 << 24) as f32;
                let signal = if row / 4 == class { 0.6 } else { 0.0 };
                pixels.extend((0.3 * noise + signal).to_le_bytes());
            }
        }
        labels.push(class as u8);
    }
    npy(
        &dir.join(format!("{name}-x.npy")),
        "<f4",
        &format!("{n}, 1, 12, 12"),
        &pixels,
    );
    npy(
        &dir.join(format!("{name}-y.npy")),
        "|u1",
        &format!("{n},"),
        &labels,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_cnn_with_batch_norm_predicts_in_pytorch_as_the_worker_did() {
    let cluster = TestCluster::must_start_formed(1, 1).await;
    let dir = cluster.dir().to_path_buf();
    write_images(&dir, "train", 240, 0x2545_f491_4f6c_dd1d);
    write_images(&dir, "test", 90, 0x9e37_79b9_7f4a_7c15);
    let train = dir.join("train-x.npy").display().to_string();
    let job = job(&dir, &train)
        .replace(
            "kind = \"mlp\"\nhidden = [16]",
            "kind = \"cnn\"\nchannels = [4, 8]\nhidden = 16",
        )
        .replace(
            "normalize = { kind = \"standard\" }",
            "normalize = { kind = \"fixed\", mean = 0.3, std = 0.25 }",
        );
    let view = must_run_job(&cluster, "cnn.toml", &job).await;
    assert_eq!(
        view.record.state,
        SweepState::Completed,
        "{:?}",
        view.trials
    );
    let reported = view.trials[0].metrics.last().unwrap().metrics["test_accuracy"];
    let out = dir.join("cnn");
    let card = export_and_predict(&cluster, &[&view.record.id], &out, reported);
    assert_eq!(card["input"]["shape"], serde_json::json!([1, 12, 12]));
    assert_eq!(card["preparation"]["normalize"]["kind"], "fixed");
    let names = safetensors_names(&out.join("model.safetensors"));
    assert!(names.iter().any(|n| n == "bn1.running_mean"), "{names:?}");
}
