//! Classification metrics of an evaluated split (validation or test),
//! computed from counts that the ranks sum with one all-reduce, so every
//! rank reports the same numbers as one rank evaluating the whole split.
//!
//! Conventions, as scikit-learn's with `zero_division=0`:
//!
//! * recall of class c = TP_c / (examples of class c); 0 when the class
//!   never occurs;
//! * precision of c = TP_c / (predictions of c); 0 when never predicted;
//! * F1 of c = 2·P·R / (P + R); 0 when P + R = 0;
//! * macro-F1 = the mean F1 over the classes that occur in the labels or
//!   in the predictions (`f1_score(average="macro", zero_division=0)`
//!   without `labels`): a class that is neither present nor predicted is
//!   left out, one that is present but never predicted (or predicted but
//!   never present) counts with F1 = 0;
//! * ROC-AUC (two classes): the exact area, as the Mann–Whitney statistic
//!   with ties counted one half (`roc_auc_score`), over every example of
//!   the split; scores are the logit margin of class 1 over class 0 (a
//!   monotone function of its softmax probability, so the same ranking).
//!   Undefined, and not reported, when the split holds one class only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Per-class counts over a split; `Vec`s are indexed by class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub examples: u64,
    /// Summed (not averaged) cross-entropy.
    pub loss_sum: f64,
    /// Examples of class c predicted as c.
    pub hits: Vec<u64>,
    /// Examples whose label is c.
    pub actual: Vec<u64>,
    /// Examples predicted as c.
    pub predicted: Vec<u64>,
}

/// What one evaluated split scored; also kept in the checkpoint sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub examples: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Per class, in class order.
    pub recall: Vec<f64>,
    /// Two classes only, and only when both occur.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roc_auc: Option<f64>,
    /// `confusion[true class][predicted class]` (up to
    /// [`MAX_CONFUSION_CLASSES`] classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Vec<Vec<u64>>>,
}

/// Classes up to which the confusion matrix is computed and kept (a
/// classes² all-reduce per split and epoch, and the sidecar's size).
pub const MAX_CONFUSION_CLASSES: u32 = 100;

impl Evaluation {
    /// The metrics of `counts`; `None` when the split had no examples.
    pub fn new(
        counts: &Counts,
        roc_auc: Option<f64>,
        confusion: Option<Vec<Vec<u64>>>,
    ) -> Option<Self> {
        if counts.examples == 0 {
            return None;
        }
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let recall: Vec<f64> = counts
            .hits
            .iter()
            .zip(&counts.actual)
            .map(|(&hits, &actual)| ratio(hits, actual))
            .collect();
        let f1: Vec<f64> = (0..counts.hits.len())
            .filter(|&c| counts.actual[c] > 0 || counts.predicted[c] > 0)
            .map(|c| {
                let precision = ratio(counts.hits[c], counts.predicted[c]);
                let sum = precision + recall[c];
                if sum == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall[c] / sum
                }
            })
            .collect();
        Some(Self {
            examples: counts.examples,
            loss: counts.loss_sum / counts.examples as f64,
            accuracy: ratio(counts.hits.iter().sum(), counts.examples),
            macro_f1: f1.iter().sum::<f64>() / f1.len().max(1) as f64,
            recall,
            roc_auc,
            confusion,
        })
    }

    /// Adds `<prefix>_loss`, `_accuracy`, `_macro_f1`, `_roc_auc` (when
    /// known) and, with `recall`, `_recall_<class>` to `metrics`.
    pub fn report(&self, prefix: &str, recall: bool, metrics: &mut BTreeMap<String, f64>) {
        let mut put = |name: &str, value: f64| {
            metrics.insert(format!("{prefix}_{name}"), value);
        };
        put("loss", self.loss);
        put("accuracy", self.accuracy);
        put("macro_f1", self.macro_f1);
        if let Some(auc) = self.roc_auc {
            put("roc_auc", auc);
        }
        if recall {
            for (class, value) in self.recall.iter().enumerate() {
                put(&format!("recall_{class}"), *value);
            }
        }
    }
}

/// The exact ROC-AUC of `scores` for examples that are `positive` or not:
/// the probability that a random positive scores above a random negative,
/// ties counting one half (ranks averaged over ties). `None` when one of
/// the two classes is absent. Sorts a copy: O(n log n).
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let positives = positive.iter().filter(|&&p| p).count();
    let negatives = positive.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' 1-based ranks, a tie group sharing its mean rank.
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        let in_group = order[start..end].iter().filter(|&&i| positive[i]).count();
        rank_sum += mean_rank * in_group as f64;
        start = end;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts and confusion matrix of (label, prediction) pairs.
    fn counts(classes: usize, pairs: &[(usize, usize)]) -> (Counts, Vec<Vec<u64>>) {
        let mut counts = Counts {
            hits: vec![0; classes],
            actual: vec![0; classes],
            predicted: vec![0; classes],
            ..Counts::default()
        };
        let mut confusion = vec![vec![0; classes]; classes];
        for &(label, prediction) in pairs {
            counts.examples += 1;
            counts.actual[label] += 1;
            counts.predicted[prediction] += 1;
            counts.hits[label] += u64::from(label == prediction);
            confusion[label][prediction] += 1;
        }
        (counts, confusion)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn metrics_match_a_hand_computed_case() {
        // Labels 0 0 0 1 1 2, predicted 0 0 1 1 2 2; class 3 never occurs
        // and is never predicted (left out of the macro mean).
        let pairs = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 2)];
        let (c, confusion) = counts(4, &pairs);
        let mut c = c;
        c.loss_sum = 3.0;
        let e = Evaluation::new(&c, None, Some(confusion.clone())).unwrap();
        assert!(close(e.loss, 0.5));
        assert!(close(e.accuracy, 4.0 / 6.0));
        // Recall 2/3, 1/2, 1, 0; precision 1, 1/2, 1/2.
        assert_eq!(e.recall, [2.0 / 3.0, 0.5, 1.0, 0.0]);
        let f1 = [0.8, 0.5, 2.0 / 3.0];
        assert!(
            close(e.macro_f1, f1.iter().sum::<f64>() / 3.0),
            "{}",
            e.macro_f1
        );
        assert_eq!(e.confusion.as_ref().unwrap()[0], [2, 1, 0, 0]);
        let mut metrics = BTreeMap::new();
        e.report("val", true, &mut metrics);
        assert_eq!(metrics.len(), 3 + 4);
        assert!(close(metrics["val_recall_0"], 2.0 / 3.0));
        assert!(!metrics.contains_key("val_roc_auc"));
        let mut metrics = BTreeMap::new();
        e.report("test", false, &mut metrics);
        assert_eq!(
            metrics.keys().collect::<Vec<_>>(),
            ["test_accuracy", "test_loss", "test_macro_f1"]
        );
    }

    #[test]
    fn a_class_present_but_never_predicted_or_predicted_but_absent_has_f1_zero() {
        // Class 1 occurs once, never predicted: P = 0 (0/0), R = 0, F1 = 0.
        // Class 2 never occurs, predicted once: P = 0, R = 0 (0/0), F1 = 0.
        let pairs = [(0, 0), (0, 0), (1, 2)];
        let (c, _) = counts(3, &pairs);
        let e = Evaluation::new(&c, None, None).unwrap();
        assert_eq!(e.recall, [1.0, 0.0, 0.0]);
        // F1: class 0 = 1 (P = R = 1), classes 1 and 2: 0; all three count.
        assert!(close(e.macro_f1, 1.0 / 3.0), "{}", e.macro_f1);
        assert!(Evaluation::new(&counts(3, &[]).0, None, None).is_none());
    }

    #[test]
    fn roc_auc_counts_pairs_and_half_ties() {
        // Positives 0.8, 0.4; negatives 0.5, 0.1, 0.4: of 6 pairs, 0.8
        // beats 3, 0.4 beats 0.1 and ties 0.4: (3 + 1 + 0.5) / 6.
        let scores = [0.8, 0.5, 0.4, 0.1, 0.4];
        let positive = [true, false, true, false, false];
        assert!(close(roc_auc(&scores, &positive).unwrap(), 4.5 / 6.0));
        assert_eq!(roc_auc(&[1.0, 2.0], &[false, true]), Some(1.0));
        assert_eq!(roc_auc(&[1.0, 2.0], &[true, false]), Some(0.0));
        assert_eq!(roc_auc(&[3.0, 3.0], &[true, false]), Some(0.5));
        assert_eq!(roc_auc(&[1.0, 2.0], &[true, true]), None);
        // Brute force over all pairs on a larger case with many ties.
        let scores: Vec<f64> = (0..200).map(|i| ((i * 37) % 23) as f64).collect();
        let positive: Vec<bool> = (0..200).map(|i| (i * 11) % 7 < 3).collect();
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for i in (0..200).filter(|&i| positive[i]) {
            for j in (0..200).filter(|&j| !positive[j]) {
                pairs += 1.0;
                wins += match scores[i].total_cmp(&scores[j]) {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                };
            }
        }
        assert!(close(roc_auc(&scores, &positive).unwrap(), wins / pairs));
    }

    #[test]
    fn evaluations_round_trip_through_the_sidecar_json() {
        let (c, confusion) = counts(2, &[(0, 0), (1, 0), (1, 1)]);
        let e = Evaluation::new(&c, Some(0.75), Some(confusion)).unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"confusion\":[[1,0],[1,1]]"), "{json}");
        assert_eq!(serde_json::from_str::<Evaluation>(&json).unwrap(), e);
    }
}
