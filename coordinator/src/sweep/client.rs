//! The client side of `ringleader job …` and `ringleader sweep …`: submit,
//! look up, watch, cancel, and render what the leader holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use ringleader_client::sweeps;
use serde_json::{json, Value};

use super::records::{Float, SweepKind, SweepRecord, SweepState, TrialRecord, TrialState};
use super::template::Template;
use crate::client::{self, Connection, LeaderClient};
use crate::error::{Error, Result};
use crate::limits::MAX_SPEC_BYTES;

pub use ringleader_client::sweeps::SweepView;

/// Calls the leader, following redirects; unreachable or no leader is an
/// error after `args.timeout`.
async fn leader(args: &Connection) -> Result<LeaderClient> {
    Ok(client::find_leader(args).await?.1)
}

/// Reads and fully validates a spec file, without any cluster; returns its
/// text and what it parsed to.
pub fn check(kind: SweepKind, file: &Path) -> Result<(String, Template)> {
    let cannot_read =
        |e: std::io::Error| Error::InvalidArgument(format!("cannot read {}: {e}", file.display()));
    let size = std::fs::metadata(file).map_err(cannot_read)?.len();
    if size > MAX_SPEC_BYTES as u64 {
        return Err(Error::InvalidArgument(format!(
            "{}: the spec is {size} bytes; at most {MAX_SPEC_BYTES} are accepted",
            file.display()
        )));
    }
    let spec = std::fs::read_to_string(file).map_err(cannot_read)?;
    let template = Template::parse(kind, &spec, &file.display().to_string())?;
    Ok((spec, template))
}

/// A one-line description of a valid spec, for `submit --dry-run`.
pub fn summary(template: &Template) -> String {
    let (metric, mode) = template.objective();
    let config = template.driver_config("dry-run");
    let params = config.space.params();
    let params = if params.is_empty() {
        "none".to_string()
    } else {
        params.keys().cloned().collect::<Vec<_>>().join(", ")
    };
    format!(
        "{}: {} trial(s), up to {} epoch(s) each, objective {metric} ({mode}), parameters: {params}",
        template.name(),
        template.max_trials(),
        config.max_epochs,
    )
}

/// Reads and validates a spec file locally (so a bad spec never reaches
/// the cluster), then submits it. Returns the new id.
pub async fn submit(args: &Connection, kind: SweepKind, file: &Path) -> Result<String> {
    let (spec, _) = check(kind, file)?;
    let origin = file.display().to_string();
    Ok(sweeps::submit(&mut leader(args).await?, kind, spec, origin).await?)
}

/// A sweep and all its trials.
pub async fn get(args: &Connection, id: &str) -> Result<SweepView> {
    Ok(sweeps::get(&mut leader(args).await?, id).await?)
}

pub async fn list(args: &Connection) -> Result<Vec<SweepRecord>> {
    Ok(sweeps::list(&mut leader(args).await?).await?.0)
}

pub async fn cancel(args: &Connection, id: &str) -> Result<u32> {
    Ok(sweeps::cancel(&mut leader(args).await?, id).await?)
}

/// Polls until the sweep finishes, showing progress as it changes; rides
/// out leader failovers (the state is in etcd), but gives up once no
/// coordinator has answered for `give_up_after`. Returns the final view.
pub async fn watch(
    args: &Connection,
    id: &str,
    every: Duration,
    give_up_after: Duration,
) -> Result<SweepView> {
    let mut progress = Progress::new();
    let mut last_answer = tokio::time::Instant::now();
    loop {
        let asked = tokio::time::Instant::now();
        match get(args, id).await {
            Ok(view) => {
                last_answer = tokio::time::Instant::now();
                progress.show(&view);
                if view.record.state.is_terminal() {
                    progress.finish();
                    return Ok(view);
                }
            }
            Err(error @ (Error::Unreachable { .. } | Error::NoLeader { .. })) => {
                if last_answer.elapsed() >= give_up_after {
                    progress.finish();
                    return Err(Error::Unreachable {
                        address: args.coordinators.join(","),
                        reason: format!(
                            "no leader answered for {}; gave up watching {id} \
                             (--give-up-after); last error: {error}",
                            humantime::format_duration(give_up_after)
                        ),
                    });
                }
                progress.waiting(&error);
            }
            Err(error) => {
                progress.finish();
                return Err(error);
            }
        }
        // A sweep of many trials takes a while to read: poll no harder
        // than half the time (the leader serves others too).
        tokio::time::sleep(every.max(asked.elapsed() * 2)).await;
    }
}

/// How `--watch` shows progress: a live bar on a terminal; plain lines,
/// each printed once, anywhere else (CI logs, pipes).
enum Progress {
    Bar(ProgressBar),
    Lines {
        printed: BTreeSet<(u32, u32)>,
        last_line: String,
    },
}

impl Progress {
    fn new() -> Self {
        if !std::io::stdout().is_terminal() {
            return Progress::Lines {
                printed: BTreeSet::new(),
                last_line: String::new(),
            };
        }
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {prefix} (eta {eta})  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress::Bar(bar)
    }

    fn show(&mut self, view: &SweepView) {
        match self {
            Progress::Lines { printed, last_line } => {
                let lines = match view.record.kind {
                    SweepKind::Job => job_progress(view, printed),
                    SweepKind::Sweep => sweep_progress(view),
                };
                for line in lines {
                    if line != *last_line {
                        println!("{line}");
                        *last_line = line;
                    }
                }
            }
            Progress::Bar(bar) => {
                let (done, total, unit, message) = bar_state(view);
                bar.set_length(total);
                bar.set_position(done);
                bar.set_prefix(unit);
                bar.set_message(message);
            }
        }
    }

    fn waiting(&mut self, error: &Error) {
        match self {
            Progress::Bar(bar) => bar.set_message(format!("waiting for the leader: {error}")),
            Progress::Lines { .. } => eprintln!("waiting for the leader: {error}"),
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// A view as a bar: done, total, what is counted, and a message.
fn bar_state(view: &SweepView) -> (u64, u64, &'static str, String) {
    match view.record.kind {
        SweepKind::Job => {
            let Some(trial) = view.trials.first() else {
                return (0, 0, "epochs", "waiting for workers".into());
            };
            let total = trial.attempts.last().map_or(0, |a| a.stop_epoch);
            let last = trial.metrics.last();
            let shown = last.map(|m| {
                let wanted = [view.record.objective_metric.as_str(), "train_loss"];
                m.metrics
                    .iter()
                    .filter(|(k, _)| wanted.contains(&k.as_str()))
                    .map(|(k, v)| format!("{k} {}", number(*v)))
                    .collect::<Vec<_>>()
                    .join("  ")
            });
            let epoch = last.map_or(0, |m| m.epoch);
            (
                u64::from(epoch),
                u64::from(total.max(epoch)),
                "epochs",
                format!("{}: {}", state_name(trial.state), shown.unwrap_or_default()),
            )
        }
        SweepKind::Sweep => {
            let done = view.trials.iter().filter(|t| t.state.is_terminal()).count();
            let best = view
                .best()
                .map(|t| {
                    format!(
                        "  best #{} {}={}",
                        t.number,
                        view.record.objective_metric,
                        number(t.objective.unwrap_or(f64::NAN))
                    )
                })
                .unwrap_or_default();
            let message = format!(
                "{} running, {} paused{best}",
                view.count(TrialState::Running),
                view.count(TrialState::Paused)
            );
            (done as u64, view.record.max_trials, "trials", message)
        }
    }
}

/// New epochs of a job since the last call.
fn job_progress(view: &SweepView, printed: &mut BTreeSet<(u32, u32)>) -> Vec<String> {
    let mut lines = Vec::new();
    let Some(trial) = view.trials.first() else {
        return vec![format!("{}: waiting for workers", view.record.id)];
    };
    let total = trial
        .attempts
        .last()
        .map(|a| a.stop_epoch)
        .unwrap_or_default();
    for m in &trial.metrics {
        let attempt = trial.attempts.len() as u32;
        if printed.insert((attempt, m.epoch)) {
            lines.push(format!(
                "epoch {}/{}  {}",
                m.epoch,
                total,
                metrics_text(&m.metrics)
            ));
        }
    }
    if trial.state.is_terminal() {
        lines.push(format!("{}: {}", view.record.id, state_name(trial.state)));
        if let Some(reason) = &trial.stop_reason {
            lines.push(reason.clone());
        }
        if let Some(error) = &trial.error {
            lines.push(format!("error: {error}"));
        }
    }
    lines
}

fn sweep_progress(view: &SweepView) -> Vec<String> {
    let best = view
        .best()
        .map(|t| {
            format!(
                "; best #{} {}={}",
                t.number,
                view.record.objective_metric,
                number(t.objective.unwrap_or(f64::NAN))
            )
        })
        .unwrap_or_default();
    vec![format!(
        "{}: {} completed, {} stopped, {} failed, {}{}{} running, {} paused, of {}{}",
        view.record.id,
        view.count(TrialState::Completed),
        view.count(TrialState::Stopped),
        view.count(TrialState::Failed),
        match view.count(TrialState::Diverged) {
            0 => String::new(),
            n => format!("{n} diverged, "),
        },
        match view.count(TrialState::EarlyStopped) {
            0 => String::new(),
            n => format!("{n} early-stopped, "),
        },
        view.count(TrialState::Running),
        view.count(TrialState::Paused),
        view.record.max_trials,
        best
    )]
}

/// The metrics on one line; per-class recall (`*_recall_<class>`, one per
/// class and split) is left to `--json`.
fn metrics_text(metrics: &BTreeMap<String, f64>) -> String {
    metrics
        .iter()
        .filter(|(k, _)| !k.contains("_recall_"))
        .map(|(k, v)| format!("{k} {}", number(*v)))
        .collect::<Vec<_>>()
        .join("  ")
}

/// A cross-validated trial's spread: `± 0.0125 over folds 0.8000 0.8200
/// 0.7900` (empty for other trials).
fn fold_spread(t: &TrialRecord) -> String {
    if t.folds.is_empty() {
        return String::new();
    }
    let values: Vec<String> = t
        .folds
        .iter()
        .map(|f| f.objective.map(number).unwrap_or_else(|| "-".into()))
        .collect();
    let spread = t
        .objective_std
        .map(|s| format!("± {} ", number(s)))
        .unwrap_or_default();
    format!("{spread}over folds {}", values.join(" "))
}

fn number(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

pub fn state_name(state: TrialState) -> &'static str {
    match state {
        TrialState::Pending => "pending",
        TrialState::Running => "running",
        TrialState::Paused => "paused",
        TrialState::Completed => "completed",
        TrialState::Stopped => "stopped",
        TrialState::Failed => "failed",
        TrialState::Diverged => "diverged",
        TrialState::EarlyStopped => "early-stopped",
        TrialState::Cancelled => "cancelled",
    }
}

pub fn sweep_state_name(state: SweepState) -> &'static str {
    match state {
        SweepState::Running => "running",
        SweepState::Completed => "completed",
        SweepState::Cancelled => "cancelled",
        SweepState::Failed => "failed",
    }
}

/// `sweep list`.
pub fn list_table(sweeps: &[SweepRecord]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<6} {:<10} {:>6}  NAME",
        "ID", "KIND", "STATE", "TRIALS"
    );
    for s in sweeps {
        let kind = match s.kind {
            SweepKind::Job => "job",
            SweepKind::Sweep => "sweep",
        };
        let _ = writeln!(
            out,
            "{:<12} {:<6} {:<10} {:>6}  {}",
            s.id,
            kind,
            sweep_state_name(s.state),
            s.max_trials,
            s.name
        );
    }
    out
}

/// Trials best first (by the objective), then the ones without a value.
/// A NaN or infinite objective (or a diverged trial) ranks as the worst
/// value, below every finite one.
fn leaderboard(view: &SweepView) -> Vec<&TrialRecord> {
    let mut trials: Vec<&TrialRecord> = view.trials.iter().collect();
    let mode = view.mode();
    trials.sort_by(|a, b| {
        let key = |t: &TrialRecord| match t.state {
            TrialState::Diverged => Some(mode.worst()),
            _ => t.objective.map(|v| mode.ranked(v)),
        };
        match (key(a), key(b)) {
            (Some(x), Some(y)) => mode.best_first(x, y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.number.cmp(&b.number),
        }
    });
    trials
}

fn param_names(view: &SweepView) -> Vec<String> {
    let mut names = BTreeSet::new();
    for t in &view.trials {
        names.extend(t.config.keys().cloned());
    }
    names.into_iter().collect()
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Number(n) => n
            .as_f64()
            .map(|f| {
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    format!("{f:.0}")
                } else {
                    format!("{f:.4e}")
                }
            })
            .unwrap_or_else(|| n.to_string()),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The leaderboard as a table: rank, trial, state, epochs, objective and
/// every parameter.
pub fn results_table(view: &SweepView) -> String {
    let params = param_names(view);
    let mut rows = vec![{
        let mut header = vec![
            "RANK".to_string(),
            "TRIAL".into(),
            "STATE".into(),
            "EPOCHS".into(),
            view.record.objective_metric.to_uppercase(),
        ];
        header.extend(params.iter().cloned());
        header
    }];
    for (rank, t) in leaderboard(view).into_iter().enumerate() {
        let mut row = vec![
            (rank + 1).to_string(),
            t.number.to_string(),
            state_name(t.state).to_string(),
            t.epochs_done.to_string(),
            match (t.objective, t.objective_std) {
                (Some(v), Some(s)) => format!("{} ± {}", number(v), number(s)),
                (Some(v), None) => number(v),
                (None, _) => "-".into(),
            },
        ];
        row.extend(
            params
                .iter()
                .map(|p| t.config.get(p).map(value_text).unwrap_or_default()),
        );
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out.push_str(&final_estimate_text(view));
    out
}

pub fn results_csv(view: &SweepView) -> String {
    let params = param_names(view);
    let mut out = String::new();
    let mut header = vec!["rank", "trial", "state", "epochs", "objective"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    header.extend(params.iter().cloned());
    let _ = writeln!(
        out,
        "{}",
        header
            .iter()
            .map(|h| csv_cell(h))
            .collect::<Vec<_>>()
            .join(",")
    );
    for (rank, t) in leaderboard(view).into_iter().enumerate() {
        let mut row = vec![
            (rank + 1).to_string(),
            t.number.to_string(),
            state_name(t.state).to_string(),
            t.epochs_done.to_string(),
            t.objective.map(|v| v.to_string()).unwrap_or_default(),
        ];
        row.extend(params.iter().map(|p| match t.config.get(p) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        }));
        let _ = writeln!(
            out,
            "{}",
            row.iter()
                .map(|c| csv_cell(c))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    out
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The best trial's test metrics (from its last epoch): the final estimate
/// of how it does on unseen data, as long as the objective did not choose
/// on the test split itself.
pub struct FinalEstimate<'a> {
    pub trial: u64,
    pub epoch: u32,
    /// Whether the objective is a test metric (then the estimate is biased).
    pub selected_on_test: bool,
    pub metrics: BTreeMap<&'a str, f64>,
}

/// `None` when there is no best trial yet or it reports no test metrics.
pub fn final_estimate(view: &SweepView) -> Option<FinalEstimate<'_>> {
    let best = view.best()?;
    let last = best.metrics.last()?;
    let metrics: BTreeMap<&str, f64> = last
        .metrics
        .iter()
        .filter(|(name, _)| name.starts_with("test_"))
        .map(|(name, value)| (name.as_str(), *value))
        .collect();
    (!metrics.is_empty()).then(|| FinalEstimate {
        trial: best.number,
        epoch: last.epoch,
        selected_on_test: view.record.objective_metric.starts_with("test_"),
        metrics,
    })
}

/// [`final_estimate`] as a line for people ("" when there is none).
fn final_estimate_text(view: &SweepView) -> String {
    let Some(estimate) = final_estimate(view) else {
        return String::new();
    };
    let label = if estimate.selected_on_test {
        format!(
            "test metrics of the best trial (chosen on {}, so they overstate the result)",
            view.record.objective_metric
        )
    } else {
        "final estimate on the test split (not used to choose the trial)".to_string()
    };
    let metrics = estimate
        .metrics
        .iter()
        .map(|(name, value)| (name.to_string(), *value))
        .collect();
    format!(
        "{label}: trial {} epoch {}: {}\n",
        estimate.trial,
        estimate.epoch,
        metrics_text(&metrics)
    )
}

/// [`final_estimate`] for `--json` / `--format json` (null when none).
pub fn final_estimate_json(view: &SweepView) -> Value {
    final_estimate(view).map_or(Value::Null, |e| {
        json!({
            "trial": e.trial,
            "epoch": e.epoch,
            "selected_on_test": e.selected_on_test,
            "metrics": e.metrics.iter().map(|(k, v)| (*k, Float(*v))).collect::<BTreeMap<_, _>>(),
        })
    })
}

pub fn results_json(view: &SweepView) -> Value {
    json!({
        "sweep": view.record,
        "final_estimate": final_estimate_json(view),
        "leaderboard": leaderboard(view).into_iter().map(|t| json!({
            "trial": t.number,
            "state": t.state,
            "epochs": t.epochs_done,
            "objective": t.objective.map(Float),
            "config": t.config,
            "metrics": t.metrics.last().map(|m| m.metrics.iter().map(|(k, v)| (k, Float(*v))).collect::<BTreeMap<_, _>>()),
            "attempts": t.attempts.len(),
            "error": t.error,
            "stop_reason": t.stop_reason,
            "objective_std": t.objective_std.map(Float),
            "fold_objectives": (!t.folds.is_empty())
                .then(|| t.folds.iter().map(|f| f.objective.map(Float)).collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
    })
}

/// `job status` / `sweep status --trial N`: one trial in full: its
/// parameters, state, every epoch's metrics and its lineage.
pub fn trial_text(view: &SweepView, trial: u64) -> Result<String> {
    let t = find_trial(view, trial)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} trial {}: {}, {} epochs, {} attempts{}",
        view.record.id,
        t.number,
        state_name(t.state),
        t.epochs_done,
        t.attempts.len(),
        t.error
            .as_deref()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default()
    );
    if let Some(reason) = &t.stop_reason {
        let _ = writeln!(out, "  {reason}");
    }
    if !t.folds.is_empty() {
        let _ = writeln!(
            out,
            "  {} {} {}",
            view.record.objective_metric,
            t.objective.map(self::number).unwrap_or_else(|| "-".into()),
            fold_spread(t)
        );
    }
    for (path, value) in &t.config {
        let _ = writeln!(out, "  {path} = {}", value_text(value));
    }
    for m in &t.metrics {
        let _ = writeln!(out, "  epoch {:>3}  {}", m.epoch, metrics_text(&m.metrics));
    }
    if let Some(checkpoint) = &t.checkpoint {
        let _ = writeln!(out, "  checkpoint {checkpoint}");
    }
    match &t.lineage {
        None => {
            let _ = writeln!(out, "  lineage: none reported yet");
        }
        Some(l) => {
            let _ = writeln!(
                out,
                "  lineage: spec sha256 {}  seed {}  worker {} (commit {})",
                l.spec_sha256, l.seed, l.worker_version, l.worker_commit
            );
            let _ = writeln!(
                out,
                "    trained {} .. {} (unix ms)",
                l.started_unix_ms, l.ended_unix_ms
            );
            for f in &l.files {
                let _ = writeln!(
                    out,
                    "    {}  {} bytes  sha256 {}",
                    f.path, f.bytes, f.sha256
                );
            }
            if l.files_left_out > 0 {
                let _ = writeln!(out, "    ({} more files not listed)", l.files_left_out);
            }
        }
    }
    Ok(out)
}

/// Trial `number` of the sweep, or an error naming what exists.
pub fn find_trial(view: &SweepView, number: u64) -> Result<&TrialRecord> {
    view.trials
        .iter()
        .find(|t| t.number == number)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "{} has no trial {number} (it has {} trials, numbered from 0)",
                view.record.id,
                view.trials.len()
            ))
        })
}

/// `job status` / `sweep status`: the record, then the trials.
pub fn status_text(view: &SweepView) -> String {
    let mut out = String::new();
    let r = &view.record;
    let _ = writeln!(
        out,
        "{} ({}) {}: {}",
        r.id,
        r.name,
        r.origin,
        sweep_state_name(r.state)
    );
    let _ = writeln!(
        out,
        "objective: {} ({})",
        r.objective_metric, r.objective_mode
    );
    if let Some(failure) = &r.failure {
        let _ = writeln!(out, "cannot be taken over: {failure}");
    }
    for line in sweep_progress(view) {
        let _ = writeln!(out, "{line}");
    }
    for t in &view.trials {
        let last = t.metrics.last();
        let _ = writeln!(
            out,
            "  trial {:>4}  {:<9}  epochs {:>3}  attempts {}  {}{}",
            t.number,
            state_name(t.state),
            t.epochs_done.max(last.map_or(0, |m| m.epoch)),
            t.attempts.len(),
            last.map(|m| metrics_text(&m.metrics)).unwrap_or_default(),
            t.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .or_else(|| t.stop_reason.as_deref().map(|r| format!("  {r}")))
                .unwrap_or_default()
        );
        if !t.folds.is_empty() {
            let _ = writeln!(
                out,
                "             {} {}",
                view.record.objective_metric,
                fold_spread(t)
            );
        }
    }
    out.push_str(&final_estimate_text(view));
    out
}
