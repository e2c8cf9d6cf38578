//! The networks a job can train: the built-in MLP and CNN, and a user's
//! TorchScript module. All of them map a batch `[N, …]` to logits
//! `[N, classes]` and keep their tensors in one [`nn::VarStore`].

use std::sync::Mutex;

use ringleader_spec::job::ModelSpec;
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor, TrainableCModule};

use super::error::TrainError;

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
}

enum Net {
    Builtin(nn::SequentialT),
    /// The module's train/eval mode is state, switched only when it changes.
    Script {
        module: TrainableCModule,
        training: bool,
    },
}

impl Model {
    /// Builds the network for examples of shape `input` (without the batch
    /// dimension), initialised from `seed`.
    pub fn build(
        spec: &ModelSpec,
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
        let net = match spec {
            ModelSpec::Mlp { hidden, dropout } => {
                Net::Builtin(mlp(&root, input, hidden, *dropout, classes))
            }
            ModelSpec::Cnn {
                channels,
                hidden,
                kernel,
                dropout,
            } => Net::Builtin(cnn(
                &root, input, *channels, *hidden, *kernel, *dropout, classes,
            )?),
            ModelSpec::Torchscript { path } => Net::Script {
                module: TrainableCModule::load(path, root).map_err(|source| {
                    TrainError::TorchScript {
                        path: path.clone(),
                        source,
                    }
                })?,
                training: true,
            },
            ModelSpec::Synthetic { .. } => {
                return Err(TrainError::Model("a synthetic model has no network".into()))
            }
        };
        Ok(Self { vs, net })
    }

    /// Logits for `xs`; `train` selects batch statistics and dropout.
    pub fn forward(&mut self, xs: &Tensor, train: bool) -> Result<Tensor, TrainError> {
        match &mut self.net {
            Net::Builtin(seq) => Ok(seq.forward_t(xs, train)),
            Net::Script { module, training } => {
                if *training != train {
                    if train {
                        module.f_set_train()?;
                    } else {
                        module.f_set_eval()?;
                    }
                    *training = train;
                }
                Ok(module.forward_ts(&[xs])?)
            }
        }
    }

    /// Trainable parameters, sorted by name (the order every rank agrees on).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.named(true)
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

/// Flatten, then `Linear → ReLU (→ Dropout)` per hidden size, then the
/// classifier.
fn mlp(
    root: &nn::Path,
    input: &[i64],
    hidden: &[u32],
    dropout: f64,
    classes: i64,
) -> nn::SequentialT {
    let mut net = nn::seq_t().add_fn(|xs| xs.flatten(1, -1));
    let mut width = input.iter().product::<i64>();
    for (i, &h) in hidden.iter().enumerate() {
        let h = i64::from(h);
        net = net
            .add(nn::linear(
                root / format!("fc{i}"),
                width,
                h,
                Default::default(),
            ))
            .add_fn(|xs| xs.relu());
        if dropout > 0.0 {
            net = net.add_fn_t(move |xs, train| xs.dropout(dropout, train));
        }
        width = h;
    }
    net.add(nn::linear(
        root / format!("fc{}", hidden.len()),
        width,
        classes,
        Default::default(),
    ))
}

/// The reference CNN: two `conv k → BN → ReLU → max-pool 2` blocks, then
/// `Linear → ReLU (→ Dropout) → Linear`. The flattened width follows from
/// the input size (1600 = 64·5·5 for 28×28 and k = 3).
fn cnn(
    root: &nn::Path,
    input: &[i64],
    [c1, c2]: [u32; 2],
    hidden: u32,
    kernel: u32,
    dropout: f64,
    classes: i64,
) -> Result<nn::SequentialT, TrainError> {
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
    let mut net = nn::seq_t()
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
        .add_fn(|xs| xs.relu().max_pool2d_default(2).flatten(1, -1))
        .add(nn::linear(
            root / "fc1",
            flat,
            i64::from(hidden),
            Default::default(),
        ))
        .add_fn(|xs| xs.relu());
    if dropout > 0.0 {
        net = net.add_fn_t(move |xs, train| xs.dropout(dropout, train));
    }
    Ok(net.add(nn::linear(
        root / "fc2",
        i64::from(hidden),
        classes,
        Default::default(),
    )))
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
        let build = || Model::build(&spec, &[1, 28, 28], 10, Device::Cpu, 7).unwrap();
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
