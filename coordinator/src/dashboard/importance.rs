//! Which parameters matter: a screening measure for the sweep page.
//!
//! Over the trials that finished with a finite objective, each numeric
//! parameter scores Spearman's |ρ| with the objective, each categorical one
//! (strings, booleans, or a mix) the correlation ratio η of the objective's
//! ranks across its values; scores are normalised to sum to 1. Both see a
//! monotone or per-category effect of one parameter at a time, not
//! interactions (fANOVA, Optuna's default, does; it needs a forest of
//! regression trees, which is more than a glance at a sweep is worth).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::sweep::client::SweepView;

/// Fewest finished trials worth scoring.
const MIN_TRIALS: usize = 3;

/// The importance of each parameter of `view`, most important first, and
/// a sentence naming the method.
pub fn of(view: &SweepView) -> Value {
    let by_param = finished_configs(view);
    let finished = by_param.values().map(Vec::len).max().unwrap_or(0);
    let method = format!(
        "Spearman's |ρ| with the objective for numeric parameters, the correlation ratio η \
         of the objective's ranks for categorical ones, over {finished} finished trials, \
         normalised to sum to 1 (one parameter at a time: interactions are not seen)"
    );
    if finished < MIN_TRIALS {
        return json!({ "method": method, "params": [] });
    }
    let mut scores: Vec<(&str, f64)> = by_param
        .iter()
        .map(|(name, pairs)| (*name, score(pairs)))
        .collect();
    let total: f64 = scores.iter().map(|(_, s)| s).sum();
    if total > 0.0 {
        for (_, s) in &mut scores {
            *s /= total;
        }
    }
    scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let params: Vec<Value> = scores
        .into_iter()
        .map(|(name, importance)| json!({ "name": name, "importance": importance }))
        .collect();
    json!({ "method": method, "params": params })
}

/// Config values of finished trials with a finite objective, by parameter.
fn finished_configs(view: &SweepView) -> BTreeMap<&str, Vec<(&Value, f64)>> {
    let mut by_param: BTreeMap<&str, Vec<(&Value, f64)>> = BTreeMap::new();
    for t in view.trials.iter().filter(|t| t.state.has_result()) {
        let Some(objective) = t.objective.filter(|v| v.is_finite()) else {
            continue;
        };
        for (name, value) in &t.config {
            by_param
                .entry(name.as_str())
                .or_default()
                .push((value, objective));
        }
    }
    by_param
}

/// One parameter's raw score in [0, 1].
fn score(pairs: &[(&Value, f64)]) -> f64 {
    let objective_ranks = ranks(&pairs.iter().map(|(_, y)| *y).collect::<Vec<_>>());
    let numeric: Option<Vec<f64>> = pairs.iter().map(|(x, _)| x.as_f64()).collect();
    let score = match numeric {
        Some(xs) => pearson(&ranks(&xs), &objective_ranks).abs(),
        None => {
            let groups: Vec<String> = pairs.iter().map(|(x, _)| x.to_string()).collect();
            correlation_ratio(&groups, &objective_ranks)
        }
    };
    if score.is_finite() {
        score
    } else {
        0.0
    }
}

/// Ranks from 1, ties sharing their mean rank.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let mean = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = mean;
        }
        start = end;
    }
    ranks
}

/// Pearson's r; NaN when either side is constant.
fn pearson(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// η = sqrt(between-group / total sum of squares) of `ys` grouped by
/// `groups`; NaN when `ys` is constant.
fn correlation_ratio(groups: &[String], ys: &[f64]) -> f64 {
    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
    let mut by_group: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (g, y) in groups.iter().zip(ys) {
        let entry = by_group.entry(g.as_str()).or_default();
        entry.0 += y;
        entry.1 += 1.0;
    }
    let between: f64 = by_group
        .values()
        .map(|(sum, n)| n * (sum / n - mean).powi(2))
        .sum();
    let total: f64 = ys.iter().map(|y| (y - mean).powi(2)).sum();
    (between / total).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::views::tests::{record, trial_with};
    use crate::sweep::records::TrialState;

    #[test]
    fn ranks_share_ties() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
    }

    #[test]
    fn the_parameter_that_drives_the_objective_ranks_first() {
        // The objective rises with lr; the optimizer's kind is noise.
        let mut trials = Vec::new();
        for (i, lr) in [0.001, 0.01, 0.03, 0.1, 0.3, 0.5].into_iter().enumerate() {
            let mut t = trial_with(i as u64, TrialState::Completed, lr, &[lr]);
            let kind = if i % 2 == 0 { "adam" } else { "sgd" };
            t.config.insert("optimizer.kind".into(), json!(kind));
            trials.push(t);
        }
        let answer = of(&SweepView {
            record: record(6),
            trials,
        });
        let params = answer["params"].as_array().unwrap();
        assert_eq!(params[0]["name"], "optimizer.lr");
        let top = params[0]["importance"].as_f64().unwrap();
        let other = params[1]["importance"].as_f64().unwrap();
        assert!(top > 0.6 && other < 0.4, "{answer}");
        assert!((top + other - 1.0).abs() < 1e-12);
        assert!(answer["method"].as_str().unwrap().contains("Spearman"));
    }

    #[test]
    fn a_categorical_parameter_that_splits_the_objective_scores_one() {
        let mut trials = Vec::new();
        for i in 0..6u64 {
            let good = i % 2 == 0;
            let mut t = trial_with(
                i,
                TrialState::Completed,
                0.1,
                &[if good { 0.9 } else { 0.1 }],
            );
            t.config
                .insert("model.kind".into(), json!(if good { "cnn" } else { "mlp" }));
            trials.push(t);
        }
        let pairs: Vec<(Value, f64)> = trials
            .iter()
            .map(|t| (t.config["model.kind"].clone(), t.objective.unwrap()))
            .collect();
        let borrowed: Vec<(&Value, f64)> = pairs.iter().map(|(v, y)| (v, *y)).collect();
        assert!((score(&borrowed) - 1.0).abs() < 1e-12);
        // lr is constant: it explains nothing and must not be NaN.
        let answer = of(&SweepView {
            record: record(6),
            trials,
        });
        assert_eq!(answer["params"][1]["name"], "optimizer.lr");
        assert_eq!(answer["params"][1]["importance"], 0.0);
    }

    #[test]
    fn too_few_finished_trials_score_nothing() {
        let trials = vec![
            trial_with(0, TrialState::Completed, 0.1, &[0.5]),
            trial_with(1, TrialState::Running, 0.2, &[0.6]),
            trial_with(2, TrialState::Diverged, 0.3, &[f64::NAN]),
        ];
        let answer = of(&SweepView {
            record: record(3),
            trials,
        });
        assert_eq!(answer["params"], json!([]));
    }
}
