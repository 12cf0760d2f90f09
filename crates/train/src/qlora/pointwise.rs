//! The exponential-based pointwise steps of a training step, on the host: sigmoid (SwiGLU), the
//! attention softmax and the LM head's cross-entropy.
//!
//! Burn's CPU backend calls libm's `expf` once per element; these loops
//! use [`exp`], a branch-free Cody–Waite range reduction with Cephes' degree-6 polynomial (within 2
//! ulp of the exact value on the range that matters), which the compiler vectorizes. Rows are split
//! across threads with rayon; each element's value depends only on its own row, so results do not
//! depend on the thread count. On other devices the same steps are Burn's tensor ops there (a host
//! loop would read every activation back).

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use supportlm_quant::simd_fn;

use supportlm_model::device::is_cpu;
use supportlm_model::error::Result;
use supportlm_model::llama::to_vec;

/// Elements per rayon task for elementwise loops.
pub(super) const CHUNK: usize = 1 << 14;

/// Lanes of the partial reductions below (one AVX register of f32).
const LANES: usize = 8;

/// The largest element of `row` (−∞ when empty), with `LANES` partial maxima so it vectorizes.
#[inline(always)]
pub(super) fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    tail.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `Σ e^(x − shift)` over `row`, in `LANES` partial sums.
#[inline(always)]
fn sum_exp(row: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp(x - shift);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&x| exp(x - shift)).sum::<f32>()
}

/// `Σ x` over `row`, in `LANES` partial sums.
#[inline(always)]
fn sum_of(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` in f32: 0 below −87 (where the result leaves the normal range), saturating at `e^88`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(-87.0, 88.0);
    let n = (c * LOG2E + ROUND) - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

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
    /// Softmax of one row in place.
    pub(super) fn softmax_row(row: &mut [f32]) {
        let max = max_of(row);
        for e in row.iter_mut() {
            *e = exp(*e - max);
        }
        let inv = 1.0 / sum_of(row);
        row.iter_mut().for_each(|e| *e *= inv);
    }
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
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
            assert!(
                (got - exact).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, exact {exact}"
            );
            x += 0.000_731;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e4), 0.0);
        assert!(exp(1e4).is_finite());
    }

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
