//! SGD, Adam and AdamW with PyTorch's update rules, written out on tensors
//! so that their state (momentum buffers, moments, step count) can go into
//! a checkpoint — tch's `nn::Optimizer` keeps it out of reach — plus the
//! learning-rate schedules.

use std::f64::consts::PI;

use ringleader_spec::job::{OptimizerKind, OptimizerSpec, ScheduleKind, ScheduleSpec};
use tch::Tensor;

use super::error::TrainError;

pub struct Optimizer {
    spec: OptimizerSpec,
    /// Steps taken so far (Adam's bias correction counts from 1).
    pub step: u64,
    /// Per parameter, its name and its state tensors (see [`state_names`]).
    state: Vec<(String, Vec<Tensor>)>,
}

/// The state each parameter carries under `kind`, as named in checkpoints.
fn state_names(spec: &OptimizerSpec) -> &'static [&'static str] {
    match spec.kind {
        OptimizerKind::Sgd if spec.momentum == 0.0 => &[],
        OptimizerKind::Sgd => &["momentum_buffer"],
        OptimizerKind::Adam | OptimizerKind::AdamW => &["exp_avg", "exp_avg_sq"],
    }
}

impl Optimizer {
    /// Fresh state (zeros) for `params`. A zero momentum buffer gives the
    /// same first step as PyTorch's "buffer = first gradient".
    pub fn new(spec: &OptimizerSpec, params: &[(String, Tensor)]) -> Self {
        let names = state_names(spec);
        let state = params
            .iter()
            .map(|(name, p)| (name.clone(), names.iter().map(|_| p.zeros_like()).collect()))
            .collect();
        Self {
            spec: spec.clone(),
            step: 0,
            state,
        }
    }

    /// Updates `params` in place from `grads` (same order as at `new`).
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        self.step += 1;
        let spec = &self.spec;
        let wd = spec.weight_decay;
        let step = self.step as i32;
        tch::no_grad(|| {
            for ((param, grad), (_, state)) in params.iter().zip(grads).zip(&mut self.state) {
                let mut param = param.shallow_clone();
                // L2 penalty folded into the gradient (not for AdamW).
                let grad = if wd != 0.0 && spec.kind != OptimizerKind::AdamW {
                    grad + &param * wd
                } else {
                    grad.shallow_clone()
                };
                match (spec.kind, state.as_mut_slice()) {
                    (OptimizerKind::Sgd, []) => {
                        let _ = param.f_sub_(&(grad * lr))?;
                    }
                    (OptimizerKind::Sgd, [buffer]) => {
                        let _ = buffer.f_mul_scalar_(spec.momentum)?.f_add_(&grad)?;
                        let direction = if spec.nesterov {
                            grad + &*buffer * spec.momentum
                        } else {
                            buffer.shallow_clone()
                        };
                        let _ = param.f_sub_(&(direction * lr))?;
                    }
                    (_, [exp_avg, exp_avg_sq]) => {
                        let [beta1, beta2] = spec.betas;
                        if spec.kind == OptimizerKind::AdamW {
                            let _ = param.f_mul_scalar_(1.0 - lr * wd)?;
                        }
                        let _ = exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
                        let _ = exp_avg_sq
                            .f_mul_scalar_(beta2)?
                            .f_add_(&(&grad * (1.0 - beta2) * &grad))?;
                        let step_size = lr / (1.0 - beta1.powi(step));
                        let bias_correction2_sqrt = (1.0 - beta2.powi(step)).sqrt();
                        let denom = (exp_avg_sq.f_sqrt()? / bias_correction2_sqrt) + spec.eps;
                        let _ = param.f_sub_(&(&*exp_avg / denom * step_size))?;
                    }
                    _ => unreachable!("state is created by `new` for this kind"),
                }
            }
            Ok(())
        })
    }

    /// State tensors named `<parameter>.<state>` for a checkpoint.
    pub fn named_state(&self) -> impl Iterator<Item = (String, &Tensor)> {
        let names = state_names(&self.spec);
        self.state.iter().flat_map(move |(param, tensors)| {
            names
                .iter()
                .zip(tensors)
                .map(move |(state, t)| (format!("{param}.{state}"), t))
        })
    }

    /// As [`Self::named_state`], to restore them.
    pub fn named_state_mut(&mut self) -> impl Iterator<Item = (String, &mut Tensor)> {
        let names = state_names(&self.spec);
        self.state.iter_mut().flat_map(move |(param, tensors)| {
            names
                .iter()
                .zip(tensors)
                .map(move |(state, t)| (format!("{param}.{state}"), t))
        })
    }
}

/// The learning rate of global step `step` (0-based): the schedule's rate
/// for the step's epoch (step) or position (cosine), ramped linearly over
/// the first `warmup_steps`.
pub fn learning_rate(
    optimizer: &OptimizerSpec,
    schedule: &ScheduleSpec,
    step: u64,
    steps_per_epoch: u64,
    epochs: u32,
) -> f64 {
    let base = optimizer.lr;
    let steps_per_epoch = steps_per_epoch.max(1);
    let scheduled = match schedule.kind {
        ScheduleKind::Constant => base,
        ScheduleKind::Step => {
            let epoch = step / steps_per_epoch;
            let drops = epoch / u64::from(schedule.step_epochs.max(1));
            base * schedule.gamma.powi(drops as i32)
        }
        ScheduleKind::Cosine => {
            let total = (u64::from(epochs) * steps_per_epoch).max(1);
            let progress = (step.min(total) as f64) / total as f64;
            schedule.min_lr + (base - schedule.min_lr) * (1.0 + (PI * progress).cos()) / 2.0
        }
    };
    if step < schedule.warmup_steps {
        scheduled * (step + 1) as f64 / schedule.warmup_steps as f64
    } else {
        scheduled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_param(kind: OptimizerKind, momentum: f64, nesterov: bool, wd: f64) -> Vec<f64> {
        let spec = OptimizerSpec {
            kind,
            lr: 0.1,
            momentum,
            nesterov,
            weight_decay: wd,
            ..Default::default()
        };
        let p = Tensor::from_slice(&[1.0f64, -2.0]);
        let mut opt = Optimizer::new(&spec, &[("p".into(), p.shallow_clone())]);
        for g in [[0.5, 0.25], [-1.0, 2.0]] {
            opt.step(&[p.shallow_clone()], &[Tensor::from_slice(&g)], spec.lr)
                .unwrap();
        }
        Vec::<f64>::try_from(p).unwrap()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert!(
            a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9),
            "{a:?} != {b:?}"
        );
    }

    /// Expected values from PyTorch 2.11 (torch.optim with the same two
    /// gradients, lr 0.1).
    #[test]
    fn updates_match_pytorch() {
        close(
            &one_param(OptimizerKind::Sgd, 0.0, false, 0.0),
            &[1.05, -2.225],
        );
        close(
            &one_param(OptimizerKind::Sgd, 0.9, true, 0.01),
            &[1.05007411, -2.43844697],
        );
        close(
            &one_param(OptimizerKind::Adam, 0.0, false, 0.0),
            &[0.9366103542405654, -2.1821465712571055],
        );
        close(
            &one_param(OptimizerKind::AdamW, 0.0, false, 0.1),
            &[0.9177103542205653, -2.1413465712971056],
        );
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let opt = OptimizerSpec {
            lr: 1.0,
            ..Default::default()
        };
        let step = ScheduleSpec {
            kind: ScheduleKind::Step,
            warmup_steps: 4,
            step_epochs: 2,
            gamma: 0.5,
            min_lr: 0.0,
        };
        assert_eq!(learning_rate(&opt, &step, 0, 10, 5), 0.25);
        assert_eq!(learning_rate(&opt, &step, 19, 10, 5), 1.0);
        assert_eq!(learning_rate(&opt, &step, 20, 10, 5), 0.5);
        let cosine = ScheduleSpec {
            kind: ScheduleKind::Cosine,
            min_lr: 0.1,
            ..Default::default()
        };
        assert_eq!(learning_rate(&opt, &cosine, 0, 10, 5), 1.0);
        assert!((learning_rate(&opt, &cosine, 25, 10, 5) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&opt, &cosine, 50, 10, 5) - 0.1).abs() < 1e-12);
    }
}
