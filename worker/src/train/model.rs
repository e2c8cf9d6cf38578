//! The networks a job can train: the built-in MLP and CNN, and a user's
//! TorchScript module. All of them map a batch `[N, …]` to logits
//! `[N, classes]` and keep their tensors in one [`nn::VarStore`].
//!
//! A built-in network is a chain of *stages* (the CNN: its convolutional
//! blocks, then its classifier; the MLP: one per linear layer), so that the
//! data-parallel step can back-propagate one stage at a time and average a
//! stage's gradients while the stages below it are still being
//! differentiated. A TorchScript module is a single stage.

use std::collections::BTreeSet;
use std::sync::Mutex;

use ringleader_spec::job::ModelSpec;
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor, TrainableCModule};

use super::error::{unreadable, TrainError};
use crate::confine::PathRoots;

/// libtorch's default generator is process-wide: hold this while seeding
/// and drawing from it, so ranks built on threads of one process (tests)
/// get the same parameters a process of their own would. (Dropout's draws
/// during training are not covered: ranks that share a process share the
/// generator, so only one rank per process — the worker's way — replays
/// dropout exactly.)
pub(crate) static TORCH_RNG: Mutex<()> = Mutex::new(());

pub struct Model {
    pub vs: nn::VarStore,
    net: Net,
    /// Per stage, in forward order, the names of its trainable parameters,
    /// sorted.
    stage_parameters: Vec<Vec<String>>,
}

enum Net {
    Builtin(Vec<nn::SequentialT>),
    /// The module's train/eval mode is state, switched only when it changes.
    Script {
        module: TrainableCModule,
        training: bool,
    },
}

impl Model {
    /// Builds the network for examples of shape `input` (without the batch
    /// dimension), initialised from `seed`. A TorchScript module is read
    /// only from under `roots`.
    pub fn build(
        spec: &ModelSpec,
        roots: &PathRoots,
        input: &[i64],
        classes: u32,
        device: Device,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let classes = i64::from(classes);
        let _rng = TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(seed as i64);
        let mut stages = Stages::new(&vs);
        let net = match spec {
            ModelSpec::Mlp { hidden, dropout } => {
                mlp(&mut stages, input, hidden, *dropout, classes);
                Net::Builtin(stages.built)
            }
            ModelSpec::Cnn {
                channels,
                hidden,
                kernel,
                dropout,
            } => {
                cnn(
                    &mut stages,
                    input,
                    *channels,
                    *hidden,
                    *kernel,
                    *dropout,
                    classes,
                )?;
                Net::Builtin(stages.built)
            }
            ModelSpec::Torchscript { path } => {
                // Opened here, from the resolved path, rather than by
                // libtorch: what is checked is what is read.
                let resolved = roots.resolve("model.path", path)?;
                let mut file = std::fs::File::open(resolved).map_err(unreadable(path))?;
                let module = TrainableCModule::load_data(&mut file, root).map_err(|source| {
                    TrainError::TorchScript {
                        path: path.clone(),
                        source,
                    }
                })?;
                stages.close();
                Net::Script {
                    module,
                    training: true,
                }
            }
            ModelSpec::Synthetic { .. } => {
                return Err(TrainError::Model("a synthetic model has no network".into()))
            }
        };
        let stage_parameters = stages.parameters;
        Ok(Self {
            vs,
            net,
            stage_parameters,
        })
    }

    /// Logits for `xs`; `train` selects batch statistics and dropout.
    pub fn forward(&mut self, xs: &Tensor, train: bool) -> Result<Tensor, TrainError> {
        Ok(self
            .forward_stages(xs, train)?
            .pop()
            .expect("a model has at least one stage"))
    }

    /// The output of every stage for `xs`, in forward order; the last is
    /// the logits.
    pub fn forward_stages(&mut self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>, TrainError> {
        match &mut self.net {
            Net::Builtin(stages) => {
                let mut outputs: Vec<Tensor> = Vec::with_capacity(stages.len());
                for stage in stages.iter() {
                    let input = outputs.last().unwrap_or(xs);
                    outputs.push(stage.forward_t(input, train));
                }
                Ok(outputs)
            }
            Net::Script { module, training } => {
                if *training != train {
                    if train {
                        module.f_set_train()?;
                    } else {
                        module.f_set_eval()?;
                    }
                    *training = train;
                }
                Ok(vec![module.forward_ts(&[xs])?])
            }
        }
    }

    /// Trainable parameters, stage by stage in forward order and sorted by
    /// name within a stage (the order every rank agrees on).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut by_name: std::collections::BTreeMap<String, Tensor> =
            self.named(true).into_iter().collect();
        self.stage_parameters
            .iter()
            .flatten()
            .filter_map(|name| by_name.remove_entry(name))
            .collect()
    }

    /// How many of [`Model::parameters`] belong to each stage, in forward
    /// order.
    pub fn stage_sizes(&self) -> Vec<usize> {
        self.stage_parameters.iter().map(Vec::len).collect()
    }

    /// Non-trainable state (batch-norm running statistics), sorted by name.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        self.named(false)
    }

    fn named(&self, trainable: bool) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad() == trainable)
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }
}

/// Collects a network's stages as they are built; each stage owns the
/// trainable variables created since the previous one closed.
struct Stages<'a> {
    vs: &'a nn::VarStore,
    root: nn::Path<'a>,
    built: Vec<nn::SequentialT>,
    parameters: Vec<Vec<String>>,
    seen: BTreeSet<String>,
}

impl<'a> Stages<'a> {
    fn new(vs: &'a nn::VarStore) -> Self {
        Self {
            vs,
            root: vs.root(),
            built: Vec::new(),
            parameters: Vec::new(),
            seen: BTreeSet::new(),
        }
    }

    fn push(&mut self, stage: nn::SequentialT) {
        self.built.push(stage);
        self.close();
    }

    /// Ends a stage: the trainable variables not yet in one are its own.
    fn close(&mut self) {
        let mut new: Vec<String> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| t.requires_grad() && !self.seen.contains(name))
            .map(|(name, _)| name)
            .collect();
        new.sort();
        self.seen.extend(new.iter().cloned());
        self.parameters.push(new);
    }
}

/// Flatten, then `Linear → ReLU (→ Dropout)` per hidden size, then the
/// classifier; one stage per linear layer.
fn mlp(stages: &mut Stages, input: &[i64], hidden: &[u32], dropout: f64, classes: i64) {
    let mut width = input.iter().product::<i64>();
    for (i, &h) in hidden.iter().enumerate() {
        let h = i64::from(h);
        let mut stage = nn::seq_t();
        if i == 0 {
            stage = stage.add_fn(|xs| xs.flatten(1, -1));
        }
        stage = stage
            .add(nn::linear(
                &stages.root / format!("fc{i}"),
                width,
                h,
                Default::default(),
            ))
            .add_fn(|xs| xs.relu());
        if dropout > 0.0 {
            stage = stage.add_fn_t(move |xs, train| xs.dropout(dropout, train));
        }
        stages.push(stage);
        width = h;
    }
    let mut classifier = nn::seq_t();
    if hidden.is_empty() {
        classifier = classifier.add_fn(|xs| xs.flatten(1, -1));
    }
    let classifier = classifier.add(nn::linear(
        &stages.root / format!("fc{}", hidden.len()),
        width,
        classes,
        Default::default(),
    ));
    stages.push(classifier);
}

/// The reference CNN: two `conv k → BN → ReLU → max-pool 2` blocks, then
/// `Linear → ReLU (→ Dropout) → Linear`. The flattened width follows from
/// the input size (1600 = 64·5·5 for 28×28 and k = 3). Two stages: the
/// blocks, then the classifier (which holds most of the parameters).
fn cnn(
    stages: &mut Stages,
    input: &[i64],
    [c1, c2]: [u32; 2],
    hidden: u32,
    kernel: u32,
    dropout: f64,
    classes: i64,
) -> Result<(), TrainError> {
    let &[channels, height, width] = input else {
        return Err(TrainError::Model(format!(
            "cnn needs image examples [C, H, W], the dataset has {input:?}"
        )));
    };
    let (c1, c2, k) = (i64::from(c1), i64::from(c2), i64::from(kernel));
    let after_blocks = |side: i64| ((side - k + 1) / 2 - k + 1) / 2;
    let (h, w) = (after_blocks(height), after_blocks(width));
    if h < 1 || w < 1 {
        return Err(TrainError::Model(format!(
            "cnn kernel {k} is too large for {height}×{width} images"
        )));
    }
    let flat = c2 * h * w;
    let root = &stages.root;
    let blocks = nn::seq_t()
        .add(nn::conv2d(
            root / "conv1",
            channels,
            c1,
            k,
            Default::default(),
        ))
        .add(nn::batch_norm2d(root / "bn1", c1, Default::default()))
        .add_fn(|xs| xs.relu().max_pool2d_default(2))
        .add(nn::conv2d(root / "conv2", c1, c2, k, Default::default()))
        .add(nn::batch_norm2d(root / "bn2", c2, Default::default()))
        .add_fn(|xs| xs.relu().max_pool2d_default(2).flatten(1, -1));
    stages.push(blocks);
    let root = &stages.root;
    let mut classifier = nn::seq_t()
        .add(nn::linear(
            root / "fc1",
            flat,
            i64::from(hidden),
            Default::default(),
        ))
        .add_fn(|xs| xs.relu());
    if dropout > 0.0 {
        classifier = classifier.add_fn_t(move |xs, train| xs.dropout(dropout, train));
    }
    let classifier = classifier.add(nn::linear(
        root / "fc2",
        i64::from(hidden),
        classes,
        Default::default(),
    ));
    stages.push(classifier);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_cnn_has_a_1600_wide_flat_layer_and_is_seeded() {
        let spec = ModelSpec::Cnn {
            channels: [32, 64],
            hidden: 128,
            kernel: 3,
            dropout: 0.0,
        };
        let roots = PathRoots::none(crate::confine::RootKind::Data);
        let build = || Model::build(&spec, &roots, &[1, 28, 28], 10, Device::Cpu, 7).unwrap();
        let (a, b) = (build(), build());
        let fc1 = &a
            .parameters()
            .into_iter()
            .find(|(n, _)| n == "fc1.weight")
            .unwrap()
            .1;
        assert_eq!(fc1.size(), [128, 1600]);
        for ((na, ta), (nb, tb)) in a.parameters().iter().zip(b.parameters().iter()) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na} differs");
        }
        assert_eq!(
            a.buffers().len(),
            4,
            "running mean and var of two batch norms"
        );
    }
}
