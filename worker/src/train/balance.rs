//! Class imbalance: class weights in the training loss
//! (`dataset.class_weights`) and the class-balanced sampler
//! (`dataset.sampler = "balanced"`). Both come from the training examples'
//! labels (after any validation hold-out), the same on every rank.

use ringleader_spec::job::DatasetSpec;
use ringleader_spec::prepare::{balanced_order, balanced_weights, ClassWeights, Sampler};
use ringleader_spec::shard::ShardPlan;
use tch::{Device, Kind, Reduction, Tensor};

use super::dataset::Split;
use super::error::TrainError;

/// What the training loop needs to counter class imbalance.
pub struct Balance {
    /// Per class, on the training device; `None`: every class weighs 1.
    pub weights: Option<Tensor>,
    /// The training labels, for the balanced sampler; `None`: uniform.
    labels: Option<Vec<i64>>,
    classes: u32,
}

impl Balance {
    /// `total`: sums per-class counts over the ranks that hold different
    /// training examples (the identity when every rank holds them all).
    pub fn new(
        spec: &DatasetSpec,
        train: &Split,
        total: impl FnOnce(Vec<f64>) -> Result<Vec<f64>, TrainError>,
        device: Device,
    ) -> Result<Self, TrainError> {
        let weights = match &spec.class_weights {
            None => None,
            Some(ClassWeights::Explicit(weights)) => Some(weights.clone()),
            Some(ClassWeights::Balanced) => {
                let counts = train
                    .labels
                    .f_bincount(None::<Tensor>, i64::from(spec.classes))?
                    .f_to_kind(Kind::Double)?;
                let counts = total(Vec::<f64>::try_from(&counts)?)?;
                let counts: Vec<u64> = counts.into_iter().map(|c| c as u64).collect();
                Some(balanced_weights(&counts))
            }
        };
        let weights = weights
            .map(|w| {
                let w: Vec<f32> = w.into_iter().map(|w| w as f32).collect();
                Tensor::from_slice(&w).f_to_device(device)
            })
            .transpose()?;
        let labels = match spec.sampler {
            Sampler::Uniform => None,
            Sampler::Balanced => Some(Vec::<i64>::try_from(&train.labels)?),
        };
        Ok(Self {
            weights,
            labels,
            classes: spec.classes,
        })
    }

    /// This rank's training order in `epoch` under the balanced sampler:
    /// one class-balanced draw of the whole split (the same on every
    /// rank), of which the rank takes the positions `plan` gives it, as
    /// DistributedSampler does. `None` when the sampler is uniform.
    pub fn order(&self, plan: &ShardPlan, epoch: u64) -> Option<Vec<u64>> {
        let labels = self.labels.as_ref()?;
        let draw = balanced_order(labels, self.classes, plan.seed, epoch);
        let positions = ShardPlan {
            shuffle: false,
            ..*plan
        };
        Some(
            positions
                .indices(epoch)
                .into_iter()
                .map(|p| draw[p as usize])
                .collect(),
        )
    }
}

/// The training loss: cross-entropy of `logits` against `labels`, the
/// mean over the batch weighted by `weights` as PyTorch's
/// `cross_entropy(weight=…)`: `Σ w_y · (−log p_y) / Σ w_y`.
pub fn loss(
    logits: &Tensor,
    labels: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor, TrainError> {
    Ok(logits
        .f_log_softmax(-1, Kind::Float)?
        .f_nll_loss(labels, weights, Reduction::Mean, -100)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weighted_loss_is_the_weighted_mean_of_the_examples_losses() {
        let logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0, 0.5, 0.5]).view([3, 2]);
        let labels = Tensor::from_slice(&[0i64, 1, 1]);
        let weights = Tensor::from_slice(&[1.0f32, 3.0]);
        // By hand: −log softmax of the true class, per example.
        let nll = |own: f64, other: f64| (own.exp() + other.exp()).ln() - own;
        let losses = [nll(2.0, 0.0), nll(1.0, 0.0), nll(0.5, 0.5)];
        let plain = losses.iter().sum::<f64>() / 3.0;
        let weighted = (losses[0] + 3.0 * losses[1] + 3.0 * losses[2]) / 7.0;
        let got = |w: Option<&Tensor>| loss(&logits, &labels, w).unwrap().double_value(&[]);
        assert!((got(None) - plain).abs() < 1e-6, "{} vs {plain}", got(None));
        assert!((got(Some(&weights)) - weighted).abs() < 1e-6);
        assert!((weighted - plain).abs() > 0.01, "the weights matter here");
    }

    fn spec(extra: serde_json::Value) -> DatasetSpec {
        let mut json = serde_json::json!({"format": "npy", "classes": 3, "train": {}});
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn balanced_weights_count_every_rank_and_the_sampler_splits_one_draw() {
        // 6 of class 0, 2 of class 1, none of class 2.
        let train = Split {
            features: Tensor::zeros([8, 1], (Kind::Float, Device::Cpu)),
            labels: Tensor::from_slice(&[0i64, 0, 1, 0, 0, 1, 0, 0]),
        };
        let balanced =
            spec(serde_json::json!({"class_weights": "balanced", "sampler": "balanced"}));
        // As if another rank held the same examples again: counts double,
        // weights stay.
        let doubled = |c: Vec<f64>| Ok(c.into_iter().map(|c| 2.0 * c).collect());
        let balance = Balance::new(&balanced, &train, doubled, Device::Cpu).unwrap();
        let weights = Vec::<f32>::try_from(balance.weights.as_ref().unwrap()).unwrap();
        assert_eq!(weights, [16.0 / 24.0, 16.0 / 8.0, 0.0]);

        let plan = |rank| ShardPlan {
            examples: 8,
            world: 2,
            rank,
            seed: 3,
            shuffle: true,
            drop_last: true,
        };
        let ranks: Vec<Vec<u64>> = (0..2)
            .map(|r| balance.order(&plan(r), 5).unwrap())
            .collect();
        let labels = Vec::<i64>::try_from(&train.labels).unwrap();
        let draw = balanced_order(&labels, 3, 3, 5);
        let interleaved: Vec<u64> = (0..4).flat_map(|i| [ranks[0][i], ranks[1][i]]).collect();
        assert_eq!(
            interleaved, draw,
            "the ranks' shares interleave into one draw"
        );

        let explicit = spec(serde_json::json!({"class_weights": [1, 2, 3]}));
        let balance = Balance::new(&explicit, &train, |_| unreachable!(), Device::Cpu).unwrap();
        assert!(balance.order(&plan(0), 1).is_none(), "uniform sampler");
        let weights = Vec::<f32>::try_from(balance.weights.as_ref().unwrap()).unwrap();
        assert_eq!(weights, [1.0, 2.0, 3.0]);
    }
}
