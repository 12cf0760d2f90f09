//! Exponential-based pointwise maths on host rows, shared by the CPU paths that bypass tensor ops (the
//! training step's SwiGLU, softmax and cross-entropy; the prompt pass's attention and SwiGLU).
//!
//! Burn's CPU backend calls libm's `expf` once per element; these loops use [`exp`], a branch-free
//! Cody–Waite range reduction with Cephes' degree-6 polynomial (within 2 ulp of the exact value on the
//! range that matters), which the compiler vectorizes inside [`simd_fn!`](crate::simd_fn) bodies.

use crate::simd_fn;

/// Lanes of the partial reductions below (one AVX register of f32).
const LANES: usize = 8;

/// The largest element of `row` (−∞ when empty), with `LANES` partial maxima so it vectorizes.
#[inline(always)]
pub fn max_of(row: &[f32]) -> f32 {
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
pub fn sum_exp(row: &[f32], shift: f32) -> f32 {
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
pub fn sum_of(row: &[f32]) -> f32 {
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

simd_fn! {
    /// Softmax of one row in place.
    pub fn softmax_row(row: &mut [f32]) {
        let max = max_of(row);
        for e in row.iter_mut() {
            *e = exp(*e - max);
        }
        let inv = 1.0 / sum_of(row);
        row.iter_mut().for_each(|e| *e *= inv);
    }
}

simd_fn! {
    /// SwiGLU's product: `act = silu(gate) · up = gate / (1 + e^−gate) · up`, element by element.
    pub fn swiglu_chunk(act: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((a, &g), &u) in act.iter_mut().zip(gate).zip(up) {
            *a = g / (1.0 + exp(-g)) * u;
        }
    }
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
    fn softmax_of_a_row_matches_its_definition() {
        let mut row = [
            0.5f32,
            -1.0,
            3.0,
            f32::NEG_INFINITY,
            2.0,
            2.0,
            -30.0,
            0.0,
            1.0,
        ];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        let want: Vec<f64> = row.iter().map(|&v| (v as f64).exp() / z).collect();
        softmax_row(&mut row);
        for (got, want) in row.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
