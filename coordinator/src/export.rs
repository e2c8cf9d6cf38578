//! `ringleader model export`: finds a trial, asks the leader for its
//! record, and hands the trial's job and checkpoint to `ringleader-export`
//! (installed beside `ringleader`), which rebuilds the network with
//! libtorch and writes model.pt, model.safetensors and model.json
//! (docs/MODELS.md).

use std::path::Path;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::client::Connection;
use crate::error::{Error, Result};
use crate::process::sibling_binary;
use crate::sweep::client::{self as sweeps, SweepView};
use crate::sweep::records::{Float, SweepKind, TrialRecord};
use crate::sweep::template::Template;

/// Which trial to export, as the command line names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `SWEEP/N`: trial N of a sweep (a job's only trial is `JOB/0`).
    Trial { sweep: String, number: u64 },
    /// `JOB`: a job's only trial.
    Job(String),
    /// `SWEEP --best`: the sweep's best finished trial by its objective.
    Best(String),
}

impl Target {
    pub fn parse(text: &str, best: bool) -> Result<Self> {
        let invalid = |why: &str| Error::InvalidArgument(format!("{text:?}: {why}"));
        if best {
            if text.contains('/') {
                return Err(invalid("--best takes a sweep id, not a trial"));
            }
            return Ok(Target::Best(text.to_string()));
        }
        match text.rsplit_once('/') {
            Some((sweep, number)) => {
                let number = number
                    .parse()
                    .map_err(|_| invalid("a trial is SWEEP/N with N its number (from 0)"))?;
                Ok(Target::Trial {
                    sweep: sweep.to_string(),
                    number,
                })
            }
            None => Ok(Target::Job(text.to_string())),
        }
    }

    fn sweep(&self) -> &str {
        match self {
            Target::Trial { sweep, .. } | Target::Job(sweep) | Target::Best(sweep) => sweep,
        }
    }
}

/// The trial `target` names in `view`, with a checkpoint to export.
pub fn choose<'a>(view: &'a SweepView, target: &Target) -> Result<&'a TrialRecord> {
    let id = &view.record.id;
    let trial = match target {
        Target::Trial { number, .. } => sweeps::find_trial(view, *number)?,
        Target::Job(_) if view.record.kind == SweepKind::Job => sweeps::find_trial(view, 0)?,
        Target::Job(_) => {
            return Err(Error::InvalidArgument(format!(
                "{id} is a sweep: name one of its trials ({id}/N) or add --best"
            )))
        }
        Target::Best(_) => view.best().ok_or_else(|| {
            Error::FailedPrecondition(format!("{id} has no completed trial to export yet"))
        })?,
    };
    if trial.checkpoint.is_none() {
        return Err(Error::FailedPrecondition(format!(
            "{id} trial {} has no checkpoint (it is {}): nothing was trained to export",
            trial.number,
            sweeps::state_name(trial.state)
        )));
    }
    Ok(trial)
}

/// What `ringleader-export` reads on stdin: the trial's job, its
/// checkpoint, and what the leader records about it (model.json's card).
pub fn request(view: &SweepView, trial: &TrialRecord) -> Result<Value> {
    let record = &view.record;
    let template = Template::parse(record.kind, &record.spec, &record.origin)
        .map_err(|e| Error::Corrupt(format!("{}: the stored spec: {e}", record.id)))?;
    let job = template
        .job(&trial.config)
        .map_err(|e| Error::Corrupt(format!("{} trial {}: {e}", record.id, trial.number)))?;
    let reported = trial.metrics.last().map(|m| {
        json!({
            "epoch": m.epoch,
            "metrics": m.metrics.iter().map(|(k, v)| (k.clone(), Float(*v))).collect::<std::collections::BTreeMap<_, _>>(),
        })
    });
    Ok(json!({
        "job": job,
        "checkpoint": trial.checkpoint,
        "card": {
            "sweep": record.id,
            "name": record.name,
            "kind": record.kind,
            "trial": trial.number,
            "state": trial.state,
            "hyperparameters": trial.config,
            "objective": {
                "metric": record.objective_metric,
                "mode": record.objective_mode,
                "value": trial.objective.map(Float),
            },
            "reported_metrics": reported,
            "lineage": trial.lineage,
        },
    }))
}

/// Exports `target` into `out`; returns what `ringleader-export` printed.
pub async fn export(connection: &Connection, target: &Target, out: &Path) -> Result<String> {
    let view = sweeps::get(connection, target.sweep()).await?;
    let trial = choose(&view, target)?;
    let request = serde_json::to_vec(&request(&view, trial)?)
        .map_err(|e| Error::Corrupt(format!("the export request: {e}")))?;
    let program = sibling_binary("ringleader-export", "RINGLEADER_EXPORT_BIN")?;
    let failed = |reason: String| Error::Process {
        what: format!("exporting {} trial {}", view.record.id, trial.number),
        reason,
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", program.display())))?;
    let mut stdin = child.stdin.take().expect("piped");
    let write = async move {
        let written = stdin.write_all(&request).await;
        drop(stdin);
        written
    };
    let (written, output) = tokio::join!(write, child.wait_with_output());
    let output = output.map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.trim().trim_start_matches("error: ");
        return Err(failed(if reason.is_empty() {
            format!("{} ended with {}", program.display(), output.status)
        } else {
            reason.to_string()
        }));
    }
    written.map_err(|e| failed(format!("writing its request: {e}")))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_a_trial_a_job_or_a_sweeps_best() {
        assert_eq!(
            Target::parse("sweep-3/12", false).unwrap(),
            Target::Trial {
                sweep: "sweep-3".into(),
                number: 12
            }
        );
        assert_eq!(
            Target::parse("job-1", false).unwrap(),
            Target::Job("job-1".into())
        );
        assert_eq!(
            Target::parse("sweep-3", true).unwrap(),
            Target::Best("sweep-3".into())
        );
        let error = Target::parse("sweep-3/x", false).unwrap_err().to_string();
        assert!(error.contains("SWEEP/N"), "{error}");
        let error = Target::parse("sweep-3/1", true).unwrap_err().to_string();
        assert!(error.contains("--best takes a sweep id"), "{error}");
    }
}
