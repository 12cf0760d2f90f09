//! The exponential-based pointwise steps of a training step, on the host: sigmoid (SwiGLU), the
//! attention softmax and the LM head's cross-entropy.
//!
//! Burn's CPU backend calls libm's `expf` once per element; these loops use `supportlm_quant`'s
//! vectorizable [`exp`] (see its `pointwise` module). Rows are split across threads with rayon; each
//! element's value depends only on its own row, so results do not depend on the thread count. On other devices the same steps are Burn's tensor ops there (a host
//! loop would read every activation back).

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use supportlm_quant::pointwise::{exp, max_of, softmax_row, sum_exp};
use supportlm_quant::simd_fn;

use supportlm_model::device::is_cpu;
use supportlm_model::error::Result;
use supportlm_model::llama::to_vec;

/// Elements per rayon task for elementwise loops.
pub(super) const CHUNK: usize = 1 << 14;

/// `1 / (1 + e^−x)` of every element of `x`.
pub fn sigmoid(x: Tensor<2>) -> Result<Tensor<2>> {
    let dims = x.dims();
    let device = x.device();
    if !is_cpu(&device) {
        return Ok(burn::tensor::activation::sigmoid(x));
    }
    let mut v = to_vec(x)?;
    v.par_chunks_mut(CHUNK).for_each(|c| {
        for e in c {
            *e = 1.0 / (1.0 + exp(-*e));
        }
    });
    Ok(Tensor::from_data(TensorData::new(v, dims), &device))
}

/// Softmax over the last dimension (entries of −∞ or below −87 relative to the row's maximum give 0).
pub fn softmax_last<const D: usize>(x: Tensor<D>) -> Result<Tensor<D>> {
    let dims = x.dims();
    let cols = dims[D - 1];
    let device = x.device();
    if !is_cpu(&device) {
        return Ok(burn::tensor::activation::softmax(x, D - 1));
    }
    let mut v = to_vec(x)?;
    let rows_per_task = (CHUNK / cols.max(1)).max(1);
    v.par_chunks_mut(rows_per_task * cols.max(1))
        .for_each(|block| block.chunks_mut(cols.max(1)).for_each(softmax_row));
    Ok(Tensor::from_data(TensorData::new(v, dims), &device))
}

simd_fn! {
    /// `−log softmax(row)[target]`; with `want_grad`, `row` becomes `softmax(row) − one_hot(target)`.
    fn cross_entropy_row(row: &mut [f32], target: usize, want_grad: bool) -> f64 {
        let max = max_of(row);
        // A loop, not `map(…).sum()`: the iterator adaptor's fold would be a separate function
        // compiled without this one's target features, and `sum_exp` would run scalar inside it.
        let mut sum = 0f64;
        for c in row.chunks(1024) {
            sum += sum_exp(c, max) as f64;
        }
        let lse = max as f64 + sum.ln();
        let loss = lse - row[target] as f64;
        if want_grad {
            let lse = lse as f32;
            for z in row.iter_mut() {
                *z = exp(*z - lse);
            }
            row[target] -= 1.0;
        }
        loss
    }
}

/// Cross-entropy of each row of `logits` (`[rows, vocab]`, row-major) against its target: returns
/// `Σ −log softmax(row)[target]` (in f64) and, with `want_grad`, turns `logits` into the gradient of
/// that sum, `softmax(row) − one_hot(target)`. The rows' losses are summed in row order (a parallel
/// sum's order would depend on work stealing, and the logged losses with it).
pub fn cross_entropy(logits: &mut [f32], vocab: usize, targets: &[usize], want_grad: bool) -> f64 {
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets)
        .map(|(row, &t)| cross_entropy_row(row, t, want_grad))
        .collect();
    losses.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_cross_entropy_match_their_definitions() {
        let device = supportlm_model::default_device();
        let rows = [
            [0.5f32, -1.0, 3.0, f32::NEG_INFINITY],
            [2.0, 2.0, -30.0, 0.0],
        ];
        let flat: Vec<f32> = rows.concat();
        let t = Tensor::<2>::from_data(TensorData::new(flat.clone(), [2, 4]), &device);
        let got = to_vec(softmax_last(t).unwrap()).unwrap();
        let mut logits = flat.clone();
        let targets = [2usize, 3];
        let loss = cross_entropy(&mut logits, 4, &targets, true);
        let mut want_loss = 0f64;
        for (i, row) in rows.iter().enumerate() {
            let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
            want_loss -= (row[targets[i]] as f64).exp().ln() - z.ln();
            for (j, &v) in row.iter().enumerate() {
                let p = (v as f64).exp() / z;
                assert!((got[i * 4 + j] as f64 - p).abs() < 1e-6, "softmax {i},{j}");
                let onehot = if j == targets[i] { 1.0 } else { 0.0 };
                assert!(
                    (logits[i * 4 + j] as f64 - (p - onehot)).abs() < 1e-6,
                    "grad {i},{j}"
                );
            }
        }
        assert!((loss - want_loss).abs() < 1e-5, "{loss} vs {want_loss}");
        let s = sigmoid(Tensor::from_data(
            TensorData::new(vec![-3.0f32, 0.0, 40.0, -200.0], [1, 4]),
            &device,
        ))
        .unwrap();
        for (got, x) in to_vec(s).unwrap().iter().zip([-3.0f64, 0.0, 40.0, -200.0]) {
            assert!(
                (*got as f64 - 1.0 / (1.0 + (-x).exp())).abs() < 1e-7,
                "sigmoid({x})"
            );
        }
    }
}
