//! AdamW (PyTorch's formulation, decoupled weight decay), the warmup + cosine learning-rate schedule and
//! clipping by the global gradient norm over all trainable values.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the second moment's root (PyTorch's default 1e-8, not Burn's 1e-5).
    pub eps: f64,
    /// Decoupled weight decay (applied as `p -= lr · wd · p`).
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of every parameter tensor, and the number of updates made.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    /// Updates applied so far.
    pub step: u64,
    /// First moments, one vector per trained tensor.
    pub m: Vec<Vec<f32>>,
    /// Second moments, one vector per trained tensor.
    pub v: Vec<Vec<f32>>,
}

impl AdamState {
    /// Zero moments for tensors of `sizes` values.
    pub fn new(sizes: &[usize]) -> Self {
        AdamState {
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }
}

impl AdamW {
    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn update(
        &self,
        state: &mut AdamState,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f64,
    ) {
        let step = self.begin_step(state, lr);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            step.apply(&mut state.m[i], &mut state.v[i], p, g);
        }
    }

    /// Counts one update and returns its coefficients, for updating the tensors one at a time
    /// ([`AdamStep::apply`]) when they are not all in memory at once.
    pub fn begin_step(&self, state: &mut AdamState, lr: f64) -> AdamStep {
        state.step += 1;
        let t = state.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        AdamStep {
            b1: self.beta1 as f32,
            b2: self.beta2 as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
            decay: (1.0 - lr * self.weight_decay) as f32,
        }
    }
}

/// A parameter tensor and its two moments, flat, on the training device.
#[derive(Debug, Clone)]
pub struct OnDevice {
    /// The values trained.
    pub param: Tensor<1>,
    /// First moments.
    pub m: Tensor<1>,
    /// Second moments.
    pub v: Tensor<1>,
}

/// The coefficients of one AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    b1: f32,
    b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    decay: f32,
}

impl AdamStep {
    /// Updates one tensor `p` with its gradient `g` and moments `m`, `v`.
    pub fn apply(&self, m: &mut [f32], v: &mut [f32], p: &mut [f32], g: &[f32]) {
        let AdamStep {
            b1,
            b2,
            step_size,
            bc2_sqrt,
            eps,
            decay,
        } = *self;
        for j in 0..p.len() {
            let gj = g[j];
            m[j] = b1 * m[j] + (1.0 - b1) * gj;
            v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
            let denom = v[j].sqrt() / bc2_sqrt + eps;
            p[j] = p[j] * decay - step_size * m[j] / denom;
        }
    }

    /// [`AdamStep::apply`] on a device, in element-wise tensor ops (the host's order of operations).
    pub fn apply_on_device(&self, state: OnDevice, g: Tensor<1>) -> OnDevice {
        let AdamStep {
            b1,
            b2,
            step_size,
            bc2_sqrt,
            eps,
            decay,
        } = *self;
        let m = state.m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        let v = state.v.mul_scalar(b2) + g.clone().mul_scalar(1.0 - b2) * g;
        let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(eps);
        let param = state.param.mul_scalar(decay) - m.clone().mul_scalar(step_size) / denom;
        OnDevice { param, m, v }
    }
}

/// [`clip_global_norm`] on a device: the gradients scaled to a global norm of at most `max_norm`, and
/// the norm before clipping as a one-value tensor (read back only when logged).
pub fn clip_global_norm_on_device(
    grads: Vec<Tensor<1>>,
    max_norm: f64,
) -> Result<(Vec<Tensor<1>>, Tensor<1>), TrainError> {
    let squares: Vec<Tensor<1>> = grads
        .iter()
        .map(|g| row_sum(g.clone() * g.clone()))
        .collect();
    if squares.is_empty() {
        return Err(TrainError::Internal("no gradients to clip".into()));
    }
    let norm = row_sum(Tensor::cat(squares, 0)).sqrt();
    if max_norm <= 0.0 {
        return Ok((grads, norm));
    }
    // `max / (norm + 1e-6)` where the norm exceeds `max`, 1 elsewhere.
    let scale = norm
        .clone()
        .add_scalar(1e-6)
        .recip()
        .mul_scalar(max_norm)
        .mask_fill(norm.clone().lower_equal_elem(max_norm), 1.0);
    let clipped = grads.into_iter().map(|g| g * scale.clone()).collect();
    Ok((clipped, norm))
}

/// The sum of `x`'s values as a one-value tensor, reduced along a dimension: a GPU backend's
/// whole-tensor `sum` may add with atomics (the order, and so the last bits, changing from run to run);
/// a dimension's reduction has a fixed order.
fn row_sum(x: Tensor<1>) -> Tensor<1> {
    let n = x.dims()[0];
    x.reshape([1, n]).sum_dim(1).reshape([1])
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to 0 at `total`.
/// `step` counts from 0 (the lr used for the first update is `lr_at(0, …)`).
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The L2 norm over all gradient values together.
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales gradients so that their global norm is at most `max_norm` (as `clip_grad_norm_`); returns
/// the norm before clipping.
pub fn clip_global_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = global_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / (norm + 1e-6)) as f32;
        grads
            .iter_mut()
            .for_each(|g| g.iter_mut().for_each(|x| *x *= s));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_pytorch_first_steps() {
        // torch.optim.AdamW's update rule with lr=0.1, weight_decay=0.01, p=[1.0, -2.0], grads
        // [0.5, -1.0] then [0.1, 0.3]. Adam's first step moves every coordinate by lr·sign(g), after
        // the decay p·(1 - lr·wd).
        let opt = AdamW {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut state = AdamState::new(&[2]);
        let mut p = vec![1.0f32, -2.0];
        opt.update(&mut state, &mut [&mut p], &[&[0.5, -1.0]], 0.1);
        assert!(
            (p[0] - 0.899).abs() < 1e-5 && (p[1] + 1.898).abs() < 1e-5,
            "{p:?}"
        );
        opt.update(&mut state, &mut [&mut p], &[&[0.1, 0.3]], 0.1);
        // Second step, coordinate 0: m = 0.9*0.05+0.01 = 0.055 → m̂ = 0.055/0.19; v = 0.999*0.00025+0.001*0.01
        // = 0.00026 → v̂ = 0.00026/0.001999; update = 0.1 * m̂ / (sqrt(v̂)+1e-8).
        let m_hat = 0.055f64 / 0.19;
        let v_hat = 0.000_259_75f64 / (1.0 - 0.999f64.powi(2));
        let want0 = 0.899 * (1.0 - 0.001) - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((p[0] as f64 - want0).abs() < 1e-5, "{} vs {want0}", p[0]);
    }

    #[test]
    fn device_adamw_and_clipping_match_the_host() {
        let device = burn::tensor::Device::default();
        let t = |v: &[f32]| {
            Tensor::<1>::from_data(
                burn::tensor::TensorData::new(v.to_vec(), [v.len()]),
                &device,
            )
        };
        let read = |x: Tensor<1>| supportlm_model::llama::to_vec(x).unwrap();
        let opt = AdamW {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut host = AdamState::new(&[4]);
        let mut p = vec![0.5f32, -1.0, 2.0, 0.0];
        let mut dev = OnDevice {
            param: t(&p),
            m: t(&[0.0; 4]),
            v: t(&[0.0; 4]),
        };
        let mut dev_state = AdamState::new(&[]);
        for (i, g) in [[3.0f32, -4.0, 0.5, 0.0], [0.1, 0.2, -0.3, 1e-3]]
            .iter()
            .enumerate()
        {
            let mut gh = g.to_vec();
            let norm = clip_global_norm(&mut [&mut gh], 1.0);
            let (gd, norm_d) = clip_global_norm_on_device(vec![t(g)], 1.0).unwrap();
            let gd = gd.into_iter().next().unwrap();
            assert!((read(norm_d)[0] as f64 - norm).abs() < 1e-5 * norm.max(1.0));
            let gd_host = read(gd.clone());
            for (a, b) in gh.iter().zip(&gd_host) {
                assert!((a - b).abs() < 1e-6, "step {i}: clipped {a} vs {b}");
            }
            opt.update(&mut host, &mut [&mut p], &[&gh], 1e-2);
            dev = opt
                .begin_step(&mut dev_state, 1e-2)
                .apply_on_device(dev, gd);
            for (a, b) in p.iter().zip(read(dev.param.clone())) {
                assert!((a - b).abs() < 1e-6, "step {i}: {a} vs {b}");
            }
        }
        // Below the limit nothing is scaled.
        let (g, _) = clip_global_norm_on_device(vec![t(&[0.3]), t(&[0.4])], 1.0).unwrap();
        assert_eq!(read(Tensor::cat(g, 0)), vec![0.3, 0.4]);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((lr_at(0, 100, 5, 1.0) - 0.2).abs() < 1e-12);
        assert!((lr_at(4, 100, 5, 1.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(5, 100, 5, 1.0) - 1.0).abs() < 1e-12);
        assert!(lr_at(52, 100, 5, 1.0) < 0.55 && lr_at(52, 100, 5, 1.0) > 0.45);
        assert!(lr_at(100, 100, 5, 1.0).abs() < 1e-12);
    }

    #[test]
    fn clipping_uses_the_global_norm() {
        let mut a = vec![3.0f32];
        let mut b = vec![4.0f32];
        let norm = clip_global_norm(&mut [&mut a, &mut b], 1.0);
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((a[0] - 0.6).abs() < 1e-5 && (b[0] - 0.8).abs() < 1e-5);
    }
}
