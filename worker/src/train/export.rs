//! `ringleader model export`, the half that needs libtorch: rebuilds a
//! trial's network from its checkpoint and writes it out for use outside
//! Ringleader (docs/MODELS.md).
//!
//! ```text
//!   request (the trial's job, checkpoint, and what the leader knows)
//!     ──▶ --out: created, or an empty directory, else refused
//!     ──▶ checkpoint directory under the checkpoint root, else refused
//!     ──▶ Model::build + the checkpoint's model tensors (eval mode)
//!     ──▶ model.pt: traced TorchScript of normalise → network
//!     ──▶ model.safetensors: the VarStore's tensors by name
//!     ──▶ check: the test split through the trained model and model.pt,
//!                every prediction equal, else refused
//!     ──▶ model.json: spec, hyperparameters, input, preparation,
//!                     final metrics, lineage, the check
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use ringleader_spec::job::ModelSpec;
use ringleader_spec::JobSpec;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::{CModule, Device, Kind, Tensor};

use super::checkpoint;
use super::dataset::{self, Files};
use super::error::{unreadable, TrainError};
use super::model::Model;
use super::prepare::PREPARATION_FILE;
use crate::confine::Confinement;

/// File names written into the output directory.
pub const TORCHSCRIPT_FILE: &str = "model.pt";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CARD_FILE: &str = "model.json";

/// Largest `preparation.json` read (one-hot vocabularies and per-feature
/// statistics of wide inputs stay far below it).
const MAX_PREPARATION_BYTES: u64 = 64 << 20;

/// What the CLI hands over: the trial's job, its checkpoint as the leader
/// recorded it, and the leader's view of the trial (copied into
/// model.json as given).
#[derive(Debug, Deserialize, Serialize)]
pub struct ExportRequest {
    pub job: JobSpec,
    pub checkpoint: PathBuf,
    pub card: serde_json::Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("--out {}: {what}", path.display())]
    Out { path: PathBuf, what: String },
    #[error("{0}")]
    Unexportable(String),
    #[error(
        "the TorchScript module disagrees with the trained model on {differ} of {examples} \
         test examples; nothing was written"
    )]
    Mismatch { differ: usize, examples: usize },
    #[error(transparent)]
    Train(#[from] TrainError),
}

impl From<tch::TchError> for ExportError {
    fn from(error: tch::TchError) -> Self {
        ExportError::Train(error.into())
    }
}

/// The test split through the trained model: what model.json records so
/// that anyone can check their copy of model.pt against the worker's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub split: &'static str,
    pub examples: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// SHA-256 of the predicted classes as little-endian `i64`s, in the
    /// split's order.
    pub predictions_sha256: String,
}

/// Writes model.pt, model.safetensors and model.json into `out` (created,
/// or an existing empty directory) and returns model.json's contents.
pub fn export(
    request: &ExportRequest,
    out: &Path,
    confinement: &Confinement,
) -> Result<Value, ExportError> {
    let job = &request.job;
    if let ModelSpec::Synthetic { .. } = job.model {
        return Err(ExportError::Unexportable(
            "the trial's model is synthetic: it has no network to export".into(),
        ));
    }
    let (dir, epoch) = checkpoint_of(&request.checkpoint)?;
    let dir = confinement
        .checkpoints
        .resolve("checkpoint", &dir)
        .map_err(TrainError::from)?;
    let sidecar = checkpoint::load_sidecar(&dir, epoch)?;
    if sidecar.input_shape.is_empty() {
        return Err(ExportError::Unexportable(format!(
            "{}: the checkpoint does not record its input shape (a worker older than \
             export wrote it); train the trial again to export it",
            checkpoint::sidecar_path(&dir, epoch).display()
        )));
    }
    let input = sidecar.input_shape.clone();
    let preparation = read_preparation(&dir)?;
    let normalisation = normalisation(preparation.as_ref(), &input)?;
    empty_out(out)?;

    let mut model = Model::build(
        &job.model,
        &confinement.data,
        &input,
        job.dataset.classes,
        Device::Cpu,
        job.seed,
    )?;
    let tensors_path = checkpoint::tensors_path(&dir, epoch);
    let mut saved = checkpoint::load_tensors(&dir, epoch)?;
    checkpoint::restore_model(&mut saved, &tensors_path, &model.vs)?;
    // Constants in a traced graph may not require gradients.
    model.vs.freeze();

    let module = trace(&mut model, normalisation.as_ref(), &input)?;
    let check = check(
        job,
        confinement,
        &mut model,
        normalisation.as_ref(),
        &module,
    )?;
    module.save(out.join(TORCHSCRIPT_FILE))?;
    let mut weights = model.vs.variables().into_iter().collect::<Vec<_>>();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&weights, out.join(WEIGHTS_FILE))?;

    let mut card = request.card.clone();
    card.insert("format".into(), json!("ringleader-model/1"));
    card.insert(
        "spec".into(),
        serde_json::to_value(job).expect("a job serialises"),
    );
    card.insert(
        "checkpoint".into(),
        json!({ "path": request.checkpoint, "epoch": epoch }),
    );
    card.insert(
        "input".into(),
        json!({
            "shape": input,
            "dtype": "float32",
            "normalisation_in_module": true,
            "classes": job.dataset.classes,
            "output": "logits [N, classes]; the prediction is their argmax",
        }),
    );
    card.insert("preparation".into(), preparation.unwrap_or(Value::Null));
    card.insert(
        "final_metrics".into(),
        json!({
            "epoch": sidecar.epoch,
            "metrics": finite(&sidecar.metrics),
            "evaluations": sidecar.evaluations,
        }),
    );
    card.insert(
        "check".into(),
        serde_json::to_value(check).expect("serialises"),
    );
    card.insert(
        "files".into(),
        json!({ "torchscript": TORCHSCRIPT_FILE, "weights": WEIGHTS_FILE }),
    );
    let card = Value::Object(card);
    let text = serde_json::to_vec_pretty(&card).expect("a card serialises");
    let path = out.join(CARD_FILE);
    std::fs::write(&path, text).map_err(unreadable(&path))?;
    Ok(card)
}

/// The directory and epoch of a checkpoint file (`…/epoch-00003.ot`, or
/// its sidecar `….json`).
fn checkpoint_of(path: &Path) -> Result<(PathBuf, u32), ExportError> {
    let epoch = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("epoch-"))
        .and_then(|n| n.strip_suffix(".ot").or_else(|| n.strip_suffix(".json")))
        .and_then(|n| n.parse::<u32>().ok());
    match (path.parent(), epoch) {
        (Some(dir), Some(epoch)) => Ok((dir.to_path_buf(), epoch)),
        _ => Err(ExportError::Unexportable(format!(
            "{}: not a checkpoint file (epoch-NNNNN.ot)",
            path.display()
        ))),
    }
}

/// `out` created, or already an empty directory.
fn empty_out(out: &Path) -> Result<(), ExportError> {
    let refuse = |what: String| ExportError::Out {
        path: out.to_path_buf(),
        what,
    };
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(refuse(
                    "exists and is not empty; name a new or empty directory".into(),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|e| refuse(format!("cannot create: {e}")))
        }
        Err(e) => Err(refuse(format!("cannot use: {e}"))),
    }
}

/// `preparation.json` of the checkpoint directory, when the worker wrote
/// one.
fn read_preparation(dir: &Path) -> Result<Option<Value>, ExportError> {
    let path = dir.join(PREPARATION_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::Unreadable { path, source: e }.into()),
    };
    let mut bytes = Vec::new();
    file.take(MAX_PREPARATION_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable(&path))?;
    let bad = |what: String| TrainError::Checkpoint {
        path: path.clone(),
        what,
    };
    if bytes.len() as u64 > MAX_PREPARATION_BYTES {
        return Err(bad(format!("larger than {MAX_PREPARATION_BYTES} bytes")).into());
    }
    let value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    Ok(Some(value))
}

/// The `(shift, scale)` the worker normalised inputs with, shaped as it
/// applied them: one value each for every feature, or per feature as
/// `[1, …input]`. `None` without normalisation.
fn normalisation(
    preparation: Option<&Value>,
    input: &[i64],
) -> Result<Option<(Tensor, Tensor)>, ExportError> {
    let Some(normalize) = preparation.and_then(|p| p.get("normalize")) else {
        return Ok(None);
    };
    let features: i64 = input.iter().product();
    let tensor = |key: &str| -> Result<Tensor, ExportError> {
        let values: Vec<f32> = normalize
            .get(key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| {
                ExportError::Unexportable(format!(
                    "{PREPARATION_FILE}: normalize.{key} is not a list of numbers"
                ))
            })?;
        match values.len() as i64 {
            1 => Ok(Tensor::from(values[0])),
            n if n == features => {
                let mut shape = vec![1];
                shape.extend_from_slice(input);
                Ok(Tensor::from_slice(&values).f_view(shape.as_slice())?)
            }
            n => Err(ExportError::Unexportable(format!(
                "{PREPARATION_FILE}: normalize.{key} has {n} values for {features} features"
            ))),
        }
    };
    Ok(Some((tensor("shift")?, tensor("scale")?)))
}

/// Logits for raw inputs: normalised as in training, then the network in
/// evaluation mode.
fn forward(
    model: &mut Model,
    normalisation: Option<&(Tensor, Tensor)>,
    xs: &Tensor,
) -> Result<Tensor, TrainError> {
    match normalisation {
        Some((shift, scale)) => model.forward(&((xs - shift) / scale), false),
        None => model.forward(xs, false),
    }
}

/// TorchScript of [`forward`], traced on a batch of zeros; the batch size
/// stays free.
fn trace(
    model: &mut Model,
    normalisation: Option<&(Tensor, Tensor)>,
    input: &[i64],
) -> Result<CModule, ExportError> {
    let mut shape = vec![2];
    shape.extend_from_slice(input);
    let example = Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
    let mut failure = None;
    let module =
        CModule::create_by_tracing("RingleaderModel", "forward", &[example], &mut |inputs| {
            match forward(model, normalisation, &inputs[0]) {
                Ok(logits) => vec![logits],
                Err(error) => {
                    failure = Some(error);
                    Vec::new()
                }
            }
        });
    if let Some(error) = failure {
        return Err(error.into());
    }
    Ok(module?)
}

/// The test split through the trained model and through `module`, batch
/// by batch as the worker evaluates: every prediction must agree. `None`
/// when the job has no test split, or its features are encoded from CSV
/// cells (the encoding is in model.json's `preparation`, not repeated
/// here).
fn check(
    job: &JobSpec,
    confinement: &Confinement,
    model: &mut Model,
    normalisation: Option<&(Tensor, Tensor)>,
    module: &CModule,
) -> Result<Option<Check>, ExportError> {
    if job.dataset.test.is_none() || job.dataset.csv.is_some() {
        return Ok(None);
    }
    let data = dataset::load(&job.dataset, &confinement.data, Files::All, Files::All)?;
    let Some(test) = data.test else {
        return Ok(None);
    };
    let n = test.len() as i64;
    let batch = i64::from(job.eval_batch_size.max(1));
    let mut predictions: Vec<i64> = Vec::with_capacity(test.len());
    let mut differ = 0;
    tch::no_grad(|| -> Result<(), ExportError> {
        for start in (0..n).step_by(batch as usize) {
            let xs = test.features.narrow(0, start, batch.min(n - start));
            let trained = forward(model, normalisation, &xs)?.f_argmax(-1, false)?;
            let traced = module.forward_ts(&[&xs])?.f_argmax(-1, false)?;
            differ += usize::try_from(
                trained
                    .f_ne_tensor(&traced)?
                    .f_sum(Kind::Int64)?
                    .int64_value(&[]),
            )
            .unwrap_or(usize::MAX);
            predictions.extend(Vec::<i64>::try_from(&trained)?);
        }
        Ok(())
    })?;
    if differ > 0 {
        return Err(ExportError::Mismatch {
            differ,
            examples: predictions.len(),
        });
    }
    let labels = Vec::<i64>::try_from(&test.labels)?;
    let correct = predictions
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count();
    let mut hasher = Sha256::new();
    for p in &predictions {
        hasher.update(p.to_le_bytes());
    }
    Ok(Some(Check {
        split: "test",
        examples: predictions.len(),
        correct,
        accuracy: correct as f64 / predictions.len().max(1) as f64,
        predictions_sha256: hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }))
}

/// Metrics JSON can hold: a non-finite value becomes null.
fn finite(metrics: &BTreeMap<String, f64>) -> BTreeMap<&str, Option<f64>> {
    metrics
        .iter()
        .map(|(k, v)| (k.as_str(), v.is_finite().then_some(*v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_files_name_their_directory_and_epoch() {
        let (dir, epoch) = checkpoint_of(Path::new("/ck/s/trial-000001/epoch-00007.ot")).unwrap();
        assert_eq!((dir.as_path(), epoch), (Path::new("/ck/s/trial-000001"), 7));
        assert_eq!(
            checkpoint_of(Path::new("/ck/epoch-00002.json")).unwrap().1,
            2
        );
        let error = checkpoint_of(Path::new("/ck/model.bin")).unwrap_err();
        assert!(
            error.to_string().contains("not a checkpoint file"),
            "{error}"
        );
    }

    #[test]
    fn out_must_be_new_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b");
        empty_out(&fresh).unwrap();
        assert!(fresh.is_dir());
        empty_out(&fresh).unwrap();
        std::fs::write(fresh.join("x"), b"").unwrap();
        let error = empty_out(&fresh).unwrap_err().to_string();
        assert!(
            error.ends_with("exists and is not empty; name a new or empty directory"),
            "{error}"
        );
    }

    #[test]
    fn normalisation_takes_the_shapes_the_worker_applied() {
        let prep = json!({"normalize": {"kind": "fixed", "shift": [0.5], "scale": [2.0]}});
        let (shift, scale) = normalisation(Some(&prep), &[1, 2, 2]).unwrap().unwrap();
        assert_eq!((shift.size(), scale.double_value(&[])), (vec![], 2.0));
        let per = json!({"normalize": {"kind": "standard", "shift": [1, 2, 3, 4], "scale": [1, 1, 1, 1]}});
        let (shift, _) = normalisation(Some(&per), &[1, 2, 2]).unwrap().unwrap();
        assert_eq!(shift.size(), vec![1, 1, 2, 2]);
        let wrong = json!({"normalize": {"kind": "standard", "shift": [1, 2], "scale": [1, 1]}});
        let error = normalisation(Some(&wrong), &[1, 2, 2])
            .unwrap_err()
            .to_string();
        assert!(error.contains("has 2 values for 4 features"), "{error}");
        assert!(normalisation(None, &[3]).unwrap().is_none());
    }
}
