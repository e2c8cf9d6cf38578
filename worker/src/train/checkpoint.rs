//! Checkpoints: `epoch-NNNNN.ot` (model and optimizer tensors, libtorch's
//! `save_multi` format) and `epoch-NNNNN.json` (what the tensors do not
//! say). Both are written atomically — temp file, fsync, rename — and the
//! sidecar last, so a sidecar on disk means its tensors are complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use ringleader_spec::stopping::Plateau;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::error::{unreadable, TrainError};
use super::metrics::Evaluation;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Epochs done when it was written.
    pub epoch: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// The job's seed.
    pub seed: u64,
    /// The libtorch seed rank 0 starts the next epoch with.
    pub rng_seed: u64,
    pub world: usize,
    pub metrics: BTreeMap<String, f64>,
    /// Early stopping's standing after this epoch (jobs with
    /// `early_stopping` only): a resumed trial carries on counting from it.
    #[serde(default)]
    pub plateau: Option<Plateau>,
    /// The epoch's evaluated splits by metric prefix (`val`, `test`), with
    /// per-class recall and the confusion matrix that the epoch report
    /// leaves out (`metrics::Evaluation`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evaluations: BTreeMap<String, Evaluation>,
    /// The shape of one example as the network takes it (after any CSV
    /// encoding), for `ringleader model export`; empty for synthetic
    /// models and checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_shape: Vec<i64>,
}

pub fn tensors_path(dir: &Path, epoch: u32) -> PathBuf {
    dir.join(format!("epoch-{epoch:05}.ot"))
}

pub fn sidecar_path(dir: &Path, epoch: u32) -> PathBuf {
    dir.join(format!("epoch-{epoch:05}.json"))
}

/// How hard a checkpoint holds on to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync'ed: survives the machine crashing (trained models).
    Synced,
    /// Renamed into place but left in the page cache: survives any process
    /// dying, not the machine. For synthetic trials, whose simulated
    /// epochs cost nothing to redo and which run hundreds per second.
    Cached,
}

/// Writes the checkpoint of `sidecar.epoch`; without tensors only the
/// sidecar. Returns the main file: the tensors, else the sidecar.
pub fn save(
    dir: &Path,
    tensors: &[(String, &Tensor)],
    sidecar: &Sidecar,
    durability: Durability,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(unreadable(dir))?;
    let tensors_file = tensors_path(dir, sidecar.epoch);
    if !tensors.is_empty() {
        write_atomic(&tensors_file, durability, |tmp| {
            Ok(Tensor::save_multi(tensors, tmp)?)
        })?;
    }
    let sidecar_file = sidecar_path(dir, sidecar.epoch);
    let json = serde_json::to_vec_pretty(sidecar).expect("a sidecar serialises");
    write_atomic(&sidecar_file, durability, |tmp| {
        std::fs::write(tmp, &json).map_err(unreadable(tmp))
    })?;
    if durability == Durability::Synced {
        // The renames are durable once the directory entry is.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(unreadable(dir))?;
    }
    Ok(if tensors.is_empty() {
        sidecar_file
    } else {
        tensors_file
    })
}

pub(super) fn write_atomic(
    path: &Path,
    durability: Durability,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    if durability == Durability::Synced {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(unreadable(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(unreadable(path))
}

/// The sidecar of the checkpoint after `epoch`.
pub fn load_sidecar(dir: &Path, epoch: u32) -> Result<Sidecar, TrainError> {
    let path = sidecar_path(dir, epoch);
    let bytes = std::fs::read(&path).map_err(unreadable(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
        path,
        what: format!("bad sidecar: {e}"),
    })
}

/// Copies the tensor `name` of a checkpoint read from `path` into
/// `target`, taking it out of `saved`; refused when it is missing or its
/// shape differs (`copy_` would broadcast a mismatched shape silently).
pub fn copy_saved(
    saved: &mut BTreeMap<String, Tensor>,
    path: &Path,
    name: &str,
    target: &mut Tensor,
) -> Result<(), TrainError> {
    let failed = |what: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        what,
    };
    let source = saved.remove(name).ok_or_else(|| {
        failed(format!(
            "no tensor {name} (was it written for another model?)"
        ))
    })?;
    if source.size() != target.size() {
        return Err(failed(format!(
            "{name} has shape {:?}, the model's is {:?}",
            source.size(),
            target.size()
        )));
    }
    tch::no_grad(|| target.f_copy_(&source)).map_err(|e| failed(format!("{name}: {e}")))?;
    Ok(())
}

/// Copies a checkpoint's `model.<name>` tensors into every variable of
/// `vs` (parameters and buffers).
pub fn restore_model(
    saved: &mut BTreeMap<String, Tensor>,
    path: &Path,
    vs: &tch::nn::VarStore,
) -> Result<(), TrainError> {
    for (name, mut t) in vs.variables() {
        copy_saved(saved, path, &format!("model.{name}"), &mut t)?;
    }
    Ok(())
}

/// The named tensors of the checkpoint after `epoch`.
pub fn load_tensors(dir: &Path, epoch: u32) -> Result<BTreeMap<String, Tensor>, TrainError> {
    let path = tensors_path(dir, epoch);
    if !path.is_file() {
        return Err(TrainError::Checkpoint {
            path,
            what: "missing".into(),
        });
    }
    let tensors = Tensor::load_multi(&path).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        what: e.to_string(),
    })?;
    Ok(tensors.into_iter().collect())
}
