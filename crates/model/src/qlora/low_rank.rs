//! LoRA's own products on the host, each a single pass over the wide matrices.
//!
//! With rank `r` (8 by default) every LoRA product is thin: `r` multiply-adds per element of a
//! `[T, width]` activation. As general matrix products each one packs and streams a whole activation
//! for a handful of columns, and one adapted projection took six such passes plus the dropout mask's.
//! Here a task walks a block of rows once per direction: forward `low = dropout(x) Aᵀ` and
//! `y += s · low Bᵀ` together; backward `dlow = s · dy B` with `dB = s · dyᵀ low` over `dy`, then
//! `dA = dlowᵀ dropout(x)` with `dx += (dlow A) ⊙ mask` over `x` and `dx`. Each row is `r` dot
//! products and `r` axpys along the wide dimension, which vectorize.
//!
//! Determinism: rows are split into fixed blocks of [`ROWS`]; a block's partial `dA` / `dB` are summed
//! in block order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::pointwise::simd_fn;
use super::DropMask;
use crate::kernels::dot;
use crate::lora::LoraPair;

/// Rows per task.
const ROWS: usize = 32;

/// One adapter pair, ready for the row loops.
pub(super) struct Factors<'a> {
    /// `A`, `[r, inp]`.
    pub a: &'a [f32],
    /// `Bᵀ`, `[r, out]`.
    pub bt: Vec<f32>,
    pub r: usize,
    pub inp: usize,
    pub out: usize,
    pub scale: f32,
}

impl<'a> Factors<'a> {
    /// From `A` (`[r, inp]`) and `B` (`[out, r]`).
    pub fn new(a: &'a [f32], b: &[f32], r: usize, scale: f32) -> Self {
        let out = b.len() / r.max(1);
        let mut bt = vec![0f32; r * out];
        for (o, row) in b.chunks(r).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                bt[j * out + o] = v;
            }
        }
        Factors {
            a,
            bt,
            r,
            inp: a.len() / r.max(1),
            out,
            scale,
        }
    }
}

/// `out = x ⊙ mask` for mask elements `start..start + x.len()` (or a copy of `x` without a mask).
#[inline(always)]
fn masked_row(x: &[f32], mask: Option<&DropMask>, start: usize, out: &mut [f32]) {
    let Some(mask) = mask else {
        out.copy_from_slice(x);
        return;
    };
    let (words, keep) = (mask.words(), mask.keep);
    if start.is_multiple_of(64) {
        let first = start / 64;
        for (k, (o, x)) in out.chunks_mut(64).zip(x.chunks(64)).enumerate() {
            let w = words[first + k];
            for (j, (o, x)) in o.iter_mut().zip(x).enumerate() {
                *o = if w >> j & 1 == 1 { x * keep } else { 0.0 };
            }
        }
    } else {
        for (i, (o, x)) in out.iter_mut().zip(x).enumerate() {
            let e = start + i;
            *o = if words[e / 64] >> (e % 64) & 1 == 1 {
                x * keep
            } else {
                0.0
            };
        }
    }
}

#[inline(always)]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

simd_fn! {
    /// Rows `row0..` of the forward pass: `low`, and `y += s · low Bᵀ`.
    fn forward_rows(
        f: &Factors,
        x: &[f32],
        mask: Option<&DropMask>,
        row0: usize,
        y: &mut [f32],
        low: &mut [f32],
    ) {
        let mut xd = vec![0f32; f.inp];
        for (i, ((x, y), low)) in x
            .chunks(f.inp)
            .zip(y.chunks_mut(f.out))
            .zip(low.chunks_mut(f.r))
            .enumerate()
        {
            masked_row(x, mask, (row0 + i) * f.inp, &mut xd);
            for (j, (l, a)) in low.iter_mut().zip(f.a.chunks(f.inp)).enumerate() {
                *l = dot(&xd, a);
                axpy(y, f.scale * *l, &f.bt[j * f.out..(j + 1) * f.out]);
            }
        }
    }
}

/// `y += s · (dropout(x) Aᵀ) Bᵀ` for `x` `[T, inp]`; returns `dropout(x) Aᵀ` (`[T, r]`).
pub(super) fn forward(f: &Factors, x: &[f32], mask: Option<&DropMask>, y: &mut [f32]) -> Vec<f32> {
    let rows = x.len() / f.inp.max(1);
    let mut low = vec![0f32; rows * f.r];
    y.par_chunks_mut(ROWS * f.out)
        .zip(x.par_chunks(ROWS * f.inp))
        .zip(low.par_chunks_mut(ROWS * f.r))
        .enumerate()
        .for_each(|(c, ((y, x), low))| forward_rows(f, x, mask, c * ROWS, y, low));
    low
}

simd_fn! {
    /// Rows of `dy`: `dlow` rows, and this block's `dBᵀ` (`[r, out]`, unscaled).
    fn dy_rows(f: &Factors, dy: &[f32], low: &[f32], dlow: &mut [f32]) -> Vec<f32> {
        let mut dbt = vec![0f32; f.r * f.out];
        for ((dy, low), dlow) in dy
            .chunks(f.out)
            .zip(low.chunks(f.r))
            .zip(dlow.chunks_mut(f.r))
        {
            for (j, (dl, &l)) in dlow.iter_mut().zip(low).enumerate() {
                *dl = f.scale * dot(dy, &f.bt[j * f.out..(j + 1) * f.out]);
                axpy(&mut dbt[j * f.out..(j + 1) * f.out], l, dy);
            }
        }
        dbt
    }
}

simd_fn! {
    /// Rows of `x` and `dx`: `dx += (dlow A) ⊙ mask`, and this block's `dA` (`[r, inp]`).
    fn x_rows(
        f: &Factors,
        x: &[f32],
        mask: Option<&DropMask>,
        row0: usize,
        dlow: &[f32],
        dx: &mut [f32],
    ) -> Vec<f32> {
        let mut da = vec![0f32; f.r * f.inp];
        let mut xd = vec![0f32; f.inp];
        let mut t = vec![0f32; f.inp];
        for (i, ((x, dx), dlow)) in x
            .chunks(f.inp)
            .zip(dx.chunks_mut(f.inp))
            .zip(dlow.chunks(f.r))
            .enumerate()
        {
            let start = (row0 + i) * f.inp;
            masked_row(x, mask, start, &mut xd);
            t.fill(0.0);
            for (j, (&dl, a)) in dlow.iter().zip(f.a.chunks(f.inp)).enumerate() {
                axpy(&mut da[j * f.inp..(j + 1) * f.inp], dl, &xd);
                axpy(&mut t, dl, a);
            }
            // The mask's backward: the same mask applied to the gradient.
            masked_row(&t, mask, start, &mut xd);
            for (d, v) in dx.iter_mut().zip(&xd) {
                *d += v;
            }
        }
        da
    }
}

/// Sums per-block partial results in block order.
fn sum_blocks(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut total = vec![0f32; len];
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Given `dy` (`[T, out]`), the forward input `x` with its `mask` and the kept `low`: adds the LoRA
/// path's input gradient into `dx` and returns `(dA, dB)`.
pub(super) fn backward(
    f: &Factors,
    x: &[f32],
    mask: Option<&DropMask>,
    low: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) -> LoraPair {
    let rows = x.len() / f.inp.max(1);
    let mut dlow = vec![0f32; rows * f.r];
    let parts: Vec<Vec<f32>> = dy
        .par_chunks(ROWS * f.out)
        .zip(low.par_chunks(ROWS * f.r))
        .zip(dlow.par_chunks_mut(ROWS * f.r))
        .map(|((dy, low), dlow)| dy_rows(f, dy, low, dlow))
        .collect();
    let dbt = sum_blocks(parts, f.r * f.out);
    let mut db = vec![0f32; f.out * f.r];
    for (j, row) in dbt.chunks(f.out).enumerate() {
        for (o, &v) in row.iter().enumerate() {
            db[o * f.r + j] = f.scale * v;
        }
    }
    let parts: Vec<Vec<f32>> = x
        .par_chunks(ROWS * f.inp)
        .zip(dx.par_chunks_mut(ROWS * f.inp))
        .zip(dlow.par_chunks(ROWS * f.r))
        .enumerate()
        .map(|(c, ((x, dx), dlow))| x_rows(f, x, mask, c * ROWS, dlow, dx))
        .collect();
    LoraPair {
        a: sum_blocks(parts, f.r * f.inp),
        b: db,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::Target;
    use crate::qlora::Dropout;

    #[test]
    fn masked_rows_match_the_mask_values_aligned_or_not() {
        let d = Dropout { p: 0.3, seed: 7 };
        for cols in [64, 128, 48, 100] {
            let mask = DropMask::new(d, 2, Target::UpProj, 5, cols);
            let values = mask.values();
            let x: Vec<f32> = (0..cols).map(|i| i as f32 - 20.0).collect();
            let mut out = vec![0f32; cols];
            for row in 0..5 {
                masked_row(&x, Some(&mask), row * cols, &mut out);
                for (i, (&o, &x)) in out.iter().zip(&x).enumerate() {
                    assert_eq!(
                        o,
                        x * values[row * cols + i],
                        "cols {cols} row {row} col {i}"
                    );
                }
            }
            let kept = values.iter().filter(|&&v| v > 0.0).count() as f64 / values.len() as f64;
            assert!((kept - 0.7).abs() < 0.15, "kept share {kept}");
        }
    }
}
