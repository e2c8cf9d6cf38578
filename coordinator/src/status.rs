//! `ringleader status`: fetch from the leader, render as a table or JSON.

use std::fmt::Write as _;

use ringleader_proto::coordinator::{
    ClusterStatusRequest, ClusterStatusResponse, WorkerInfo, WorkerState,
};
use serde_json::{json, Value};

use std::time::Duration;

use crate::client::{self, Connection, LeaderClient};
use crate::error::{Error, Result};

/// Asks the leader (found through any of the given coordinators).
pub async fn fetch(args: &Connection) -> Result<ClusterStatusResponse> {
    let (leader, mut client) = client::find_leader(args).await?;
    fetch_from(&leader, &mut client, args.timeout).await
}

/// Asks `client`, a client of the leader at `leader`.
pub async fn fetch_from(
    leader: &str,
    client: &mut LeaderClient,
    timeout: Duration,
) -> Result<ClusterStatusResponse> {
    let response = tokio::time::timeout(timeout, client.cluster_status(ClusterStatusRequest {}))
        .await
        .map_err(|_| Error::Unreachable {
            address: leader.to_string(),
            reason: format!("no status within {timeout:?}"),
        })?
        .map_err(|status| client::status_error(&format!("status from {leader}"), status))?;
    Ok(response.into_inner())
}

fn state_name(worker: &WorkerInfo) -> &'static str {
    match WorkerState::try_from(worker.state).unwrap_or_default() {
        WorkerState::Idle => "idle",
        WorkerState::Lost => "lost",
        WorkerState::Busy => "busy",
        WorkerState::Unspecified => "unknown",
    }
}

fn gpus_text(worker: &WorkerInfo) -> String {
    let gpus = worker
        .resources
        .as_ref()
        .map(|r| r.gpus.as_slice())
        .unwrap_or_default();
    if gpus.is_empty() {
        return "-".into();
    }
    gpus.iter()
        .map(|g| {
            format!(
                "{}:{} ({:.0} GiB)",
                g.index,
                g.name,
                g.memory_bytes as f64 / (1u64 << 30) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The status as JSON for scripts.
pub fn to_json(status: &ClusterStatusResponse) -> Value {
    json!({
        "leader": status.leader_address,
        "coordinators": status.coordinators.iter().map(|c| json!({
            "address": c.address, "leader": c.leader, "lease": c.lease,
        })).collect::<Vec<_>>(),
        "workers": status.workers.iter().map(|w| {
            let resources = w.resources.clone().unwrap_or_default();
            json!({
                "id": w.worker_id,
                "host": w.host,
                "peer_address": w.peer_address,
                "state": state_name(w),
                "device": resources.device,
                "cpu_cores": resources.cpu_cores,
                "gpus": resources.gpus.iter().map(|g| json!({
                    "index": g.index, "name": g.name, "memory_bytes": g.memory_bytes,
                })).collect::<Vec<_>>(),
                "last_heartbeat_ms_ago": w.last_heartbeat_ms_ago,
                "registered_at_unix_ms": w.registered_at_unix_ms,
                "running": w.running.as_ref().map(|r| json!({
                    "sweep": r.sweep_id, "trial": r.trial, "attempt": r.attempt,
                })),
            })
        }).collect::<Vec<_>>(),
    })
}

/// The status as aligned tables for people.
pub fn to_table(status: &ClusterStatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "leader: {}", status.leader_address);
    let _ = writeln!(out, "\ncoordinators ({})", status.coordinators.len());
    let rows: Vec<Vec<String>> = status
        .coordinators
        .iter()
        .map(|c| {
            vec![
                c.address.clone(),
                if c.leader { "leader" } else { "standby" }.into(),
                c.lease.clone(),
            ]
        })
        .collect();
    table(&mut out, &["ADDRESS", "ROLE", "LEASE"], &rows);
    let _ = writeln!(out, "\nworkers ({})", status.workers.len());
    let rows: Vec<Vec<String>> = status
        .workers
        .iter()
        .map(|w| {
            let r = w.resources.clone().unwrap_or_default();
            vec![
                w.worker_id.clone(),
                w.host.clone(),
                w.peer_address.clone(),
                r.device,
                r.cpu_cores.to_string(),
                gpus_text(w),
                state_name(w).into(),
                format!("{:.1}s ago", w.last_heartbeat_ms_ago as f64 / 1000.0),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "ID",
            "HOST",
            "PEER",
            "DEVICE",
            "CPUS",
            "GPUS",
            "STATE",
            "HEARTBEAT",
        ],
        &rows,
    );
    out
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringleader_proto::coordinator::{CoordinatorInfo, WorkerResources};

    fn sample() -> ClusterStatusResponse {
        ClusterStatusResponse {
            leader_address: "127.0.0.1:1".into(),
            coordinators: vec![CoordinatorInfo {
                address: "127.0.0.1:1".into(),
                leader: true,
                lease: "ab".into(),
            }],
            workers: vec![WorkerInfo {
                worker_id: "worker-0".into(),
                host: "h".into(),
                peer_address: "127.0.0.1:2".into(),
                resources: Some(WorkerResources {
                    cpu_cores: 2,
                    gpus: vec![],
                    device: "cpu".into(),
                }),
                state: WorkerState::Idle as i32,
                last_heartbeat_ms_ago: 1500,
                registered_at_unix_ms: 0,
                running: None,
            }],
        }
    }

    #[test]
    fn table_shows_leader_and_workers() {
        let text = to_table(&sample());
        assert!(text.contains("leader: 127.0.0.1:1"));
        assert!(text.contains("worker-0"));
        assert!(text.contains("idle"));
        assert!(text.contains("1.5s ago"));
    }

    #[test]
    fn json_names_state_and_resources() {
        let value = to_json(&sample());
        assert_eq!(value["workers"][0]["state"], "idle");
        assert_eq!(value["workers"][0]["cpu_cores"], 2);
        assert_eq!(value["coordinators"][0]["leader"], true);
    }
}
