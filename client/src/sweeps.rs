//! Typed calls for sweeps and jobs: submit, read (every trial, page by
//! page), list and cancel, with the leader's answers decoded into the
//! records etcd holds ([`ringleader_spec::records`]). The CLI and the
//! dashboard both call these.

use ringleader_proto::coordinator::{
    CancelSweepRequest, GetSweepRequest, ListSweepsRequest, SubmitKind, SubmitRequest,
};
use ringleader_spec::records::{best_trial, SweepKind, SweepRecord, TrialRecord, TrialState};
use ringleader_spec::Mode;

use crate::error::{ClientError, Result};
use crate::leader::{status_error, LeaderClient};

/// A sweep as the leader reports it.
pub struct SweepView {
    pub record: SweepRecord,
    pub trials: Vec<TrialRecord>,
}

impl SweepView {
    /// Whether a larger objective is better.
    pub fn mode(&self) -> Mode {
        self.record.objective_mode
    }

    /// The best trial with a result, by its latest objective.
    pub fn best(&self) -> Option<&TrialRecord> {
        best_trial(
            self.trials.iter().filter(|t| t.state.has_result()),
            self.mode(),
        )
    }

    /// How many trials are in `state`.
    pub fn count(&self, state: TrialState) -> usize {
        self.trials.iter().filter(|t| t.state == state).count()
    }
}

/// Submits a spec (already checked by the caller) as a job or a sweep;
/// returns the new id.
pub async fn submit(
    leader: &mut LeaderClient,
    kind: SweepKind,
    spec: String,
    origin: String,
) -> Result<String> {
    let request = SubmitRequest {
        kind: match kind {
            SweepKind::Job => SubmitKind::Job,
            SweepKind::Sweep => SubmitKind::Sweep,
        } as i32,
        spec,
        origin,
    };
    let response = leader
        .submit(request)
        .await
        .map_err(|s| status_error("submit", s))?;
    Ok(response.into_inner().sweep_id)
}

/// A sweep and all its trials, read page by page. A sweep some of whose
/// records the leader cannot read is an error naming their keys.
pub async fn get(leader: &mut LeaderClient, id: &str) -> Result<SweepView> {
    let mut trials = Vec::new();
    let mut from = 0;
    loop {
        let page = leader
            .get_sweep(GetSweepRequest {
                sweep_id: id.to_string(),
                trials_from: from,
                trials_limit: 0,
            })
            .await
            .map_err(|s| status_error("get", s))?
            .into_inner();
        for trial in &page.trial_json {
            trials.push(decode(trial)?);
        }
        if !page.unreadable.is_empty() {
            return Err(ClientError::Corrupt(format!(
                "{id} cannot be read whole: {}",
                page.unreadable.join("; ")
            )));
        }
        if !page.more_trials || page.next_trials_from <= from {
            return Ok(SweepView {
                record: decode(&page.sweep_json)?,
                trials,
            });
        }
        from = page.next_trials_from;
    }
}

/// The sweeps the caller may see, and the stored records the leader could
/// not read (each naming its etcd key).
pub async fn list(leader: &mut LeaderClient) -> Result<(Vec<SweepRecord>, Vec<String>)> {
    let response = leader
        .list_sweeps(ListSweepsRequest {
            include_spec: false,
        })
        .await
        .map_err(|s| status_error("list", s))?
        .into_inner();
    let sweeps = response
        .sweep_json
        .iter()
        .map(|s| decode(s))
        .collect::<Result<_>>()?;
    Ok((sweeps, response.unreadable))
}

/// Cancels a sweep or job; returns how many attempts were told to stop.
pub async fn cancel(leader: &mut LeaderClient, id: &str) -> Result<u32> {
    let response = leader
        .cancel_sweep(CancelSweepRequest {
            sweep_id: id.to_string(),
        })
        .await
        .map_err(|s| status_error("cancel", s))?;
    Ok(response.into_inner().stopped_attempts)
}

fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|e| ClientError::Corrupt(format!("the leader sent a record we cannot read: {e}")))
}
