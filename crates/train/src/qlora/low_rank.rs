//! LoRA's own products on the host, each a single pass over the wide matrices.
//!
//! With rank `r` (8 by default) every LoRA product is thin: `r` multiply-adds per element of a
//! `[T, width]` activation. As general matrix products each one packs and streams a whole activation
//! for a handful of columns, and one adapted projection took six such passes plus the dropout mask's.
//! Here a task walks a block of rows once per direction: forward `low = dropout(x) Aᵀ` and
//! `y += s · low Bᵀ` together; backward `dlow = s · dy B` with `dB = s · dyᵀ low` over `dy`, then
//! `dA = dlowᵀ dropout(x)` with `dx += (dlow A) ⊙ mask` over `x` and `dx`. Each row is `r` dot
//! products (`dots`) and one combination of `r` rows (`add_combination`); `dA` and `dBᵀ` are
//! outer-product sums over a block of rows (`add_outer`). With AVX2 + FMA these three and the mask
//! expansion keep their partial sums in registers (module `avx`, about half the time of the plain
//! loops); the portable loops are the reference for other CPUs.
//!
//! Determinism: rows are split into fixed blocks of [`ROWS`] (backward: [`BACKWARD_ROWS`]); a block's partial `dA` / `dB` are summed
//! in block order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::dropout::DropMask;
use supportlm_model::lora::LoraPair;
#[cfg(target_arch = "x86_64")]
use supportlm_quant::cpu::avx2_fma;
use supportlm_quant::kernels::dot;
use supportlm_quant::simd_fn;

/// Rows per task.
const ROWS: usize = 32;
/// Rows per task in the backward passes, whose tasks each return partial `dA` / `dB` to be summed.
const BACKWARD_ROWS: usize = 64;

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
    #[cfg(target_arch = "x86_64")]
    if start.is_multiple_of(64) && avx2_fma() {
        assert!(
            words.len() * 64 >= start + x.len() && out.len() == x.len(),
            "masked_row: mask too short"
        );
        // SAFETY: the CPU has AVX2; the assert bounds the words read.
        return unsafe { avx::masked_row(x, &words[start / 64..], keep, out) };
    }
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

/// `out[j] = x · m_j` for the rows `m_j` of `m` (`[out.len(), x.len()]`).
#[inline]
fn dots(x: &[f32], m: &[f32], out: &mut [f32]) {
    assert!(m.len() >= out.len() * x.len(), "dots: matrix too short");
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA; the assert bounds every row read.
        return unsafe { avx::dots(x, m, out) };
    }
    for (o, row) in out.iter_mut().zip(m.chunks_exact(x.len().max(1))) {
        *o = dot(x, row);
    }
}

/// `y += Σ_j c[j] · m_j` over the rows `m_j` of `m` (`[c.len(), y.len()]`).
#[inline]
fn add_combination(y: &mut [f32], c: &[f32], m: &[f32]) {
    assert!(
        m.len() >= c.len() * y.len(),
        "add_combination: matrix too short"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: as in `dots`.
        return unsafe { avx::add_combination(y, c, m) };
    }
    let n = y.len();
    for (&cj, row) in c.iter().zip(m.chunks_exact(n.max(1))) {
        y.iter_mut().zip(row).for_each(|(y, x)| *y += cj * x);
    }
}

/// `acc_j += Σ_i c[i][j] · x_i` for a block of rows `x_i` (the first `n` values of every `stride`
/// in `x`) and coefficients `c` (`[rows, r]`), into `acc` (`[r, n]`): the outer-product sums `cᵀ x`
/// that make `dA` and `dBᵀ`.
#[inline]
fn add_outer(acc: &mut [f32], c: &[f32], x: &[f32], stride: usize, r: usize) {
    let n = acc.len() / r.max(1);
    let rows = c.len() / r.max(1);
    assert!(
        acc.len() == r * n && n <= stride && (rows == 0 || (rows - 1) * stride + n <= x.len()),
        "add_outer: shapes disagree"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: as in `dots`.
        return unsafe { avx::add_outer(acc, c, x, stride, r) };
    }
    for (x, c) in x.chunks(stride).zip(c.chunks_exact(r)) {
        for (out, &cj) in acc.chunks_exact_mut(n.max(1)).zip(c) {
            out.iter_mut().zip(&x[..n]).for_each(|(a, x)| *a += cj * x);
        }
    }
}

/// AVX2 + FMA versions of the three row kernels. Each keeps several independent accumulators in
/// registers, where the portable loops wait on one chain of additions or reload and store their
/// destination once per term (about a third of the speed, and LoRA's passes were an eighth of a step).
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    const L: usize = 8;

    /// `out = x ⊙ mask` where bit `e % 64` of `words[e / 64]` keeps element `e` (scaled by `keep`).
    /// Safety: `words` covers `x.len()` bits, `out` is as long as `x`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn masked_row(x: &[f32], words: &[u64], keep: f32, out: &mut [f32]) {
        let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let kv = _mm256_set1_ps(keep);
        let body = x.len() / L * L;
        for k in (0..body).step_by(L) {
            let byte = (words[k / 64] >> (k % 64)) as i32 & 0xff;
            let set = _mm256_and_si256(_mm256_set1_epi32(byte), lanes);
            let kept = _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lanes));
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(k)), kv);
            _mm256_storeu_ps(out.as_mut_ptr().add(k), _mm256_and_ps(v, kept));
        }
        for e in body..x.len() {
            out[e] = if words[e / 64] >> (e % 64) & 1 == 1 {
                x[e] * keep
            } else {
                0.0
            };
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn sum(v: __m256) -> f32 {
        let mut lanes = [0f32; L];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    /// Four rows at a time: `x` is loaded once per group and the four sums are independent chains.
    /// Safety: `m` holds `out.len()` rows of `x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(x: &[f32], m: &[f32], out: &mut [f32]) {
        const G: usize = 4;
        let n = x.len();
        let body = n / L * L;
        let (xp, mp) = (x.as_ptr(), m.as_ptr());
        let mut j = 0;
        while j < out.len() {
            let g = G.min(out.len() - j);
            let mut acc = [_mm256_setzero_ps(); G];
            let mut k = 0;
            while k < body {
                let xv = _mm256_loadu_ps(xp.add(k));
                for (i, acc) in acc.iter_mut().enumerate().take(g) {
                    *acc = _mm256_fmadd_ps(xv, _mm256_loadu_ps(mp.add((j + i) * n + k)), *acc);
                }
                k += L;
            }
            for (i, acc) in acc.iter().enumerate().take(g) {
                let row = &m[(j + i) * n..(j + i + 1) * n];
                let tail: f32 = x[body..].iter().zip(&row[body..]).map(|(a, b)| a * b).sum();
                out[j + i] = sum(*acc) + tail;
            }
            j += g;
        }
    }

    /// Four vectors of `y` at a time, each loaded and stored once.
    /// Safety: `m` holds `c.len()` rows of `y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_combination(y: &mut [f32], c: &[f32], m: &[f32]) {
        const U: usize = 4;
        let n = y.len();
        let (yp, mp) = (y.as_mut_ptr(), m.as_ptr());
        let mut k = 0;
        while k + U * L <= n {
            let mut acc: [__m256; U] = std::array::from_fn(|u| _mm256_loadu_ps(yp.add(k + u * L)));
            for (j, &cj) in c.iter().enumerate() {
                let cv = _mm256_set1_ps(cj);
                for (u, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(cv, _mm256_loadu_ps(mp.add(j * n + k + u * L)), *acc);
                }
            }
            for (u, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(yp.add(k + u * L), *acc);
            }
            k += U * L;
        }
        for e in k..n {
            for (j, &cj) in c.iter().enumerate() {
                y[e] = cj.mul_add(m[j * n + e], y[e]);
            }
        }
    }

    /// Rows of `x` eight at a time (rows of a wide `x` are a multiple of 4 KiB apart and would evict
    /// each other from L1 in larger groups); for each group, four vectors of every row of `acc` at a
    /// time: loaded once, the group's rows added, stored.
    /// Safety: `acc` is `[r, n]`, `c` `[rows, r]`, `x` holds `rows` rows of `n` at `stride`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_outer(acc: &mut [f32], c: &[f32], x: &[f32], stride: usize, r: usize) {
        const U: usize = 4;
        const ROWS: usize = 8;
        let n = acc.len() / r;
        let rows = c.len() / r;
        let (ap, xp) = (acc.as_mut_ptr(), x.as_ptr());
        let body = n / (U * L) * (U * L);
        for i0 in (0..rows).step_by(ROWS) {
            let group = i0..(i0 + ROWS).min(rows);
            for k in (0..body).step_by(U * L) {
                for j in 0..r {
                    let o = ap.add(j * n + k);
                    let mut a: [__m256; U] = std::array::from_fn(|u| _mm256_loadu_ps(o.add(u * L)));
                    for i in group.clone() {
                        let cv = _mm256_set1_ps(c[i * r + j]);
                        for (u, a) in a.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(
                                cv,
                                _mm256_loadu_ps(xp.add(i * stride + k + u * L)),
                                *a,
                            );
                        }
                    }
                    for (u, a) in a.iter().enumerate() {
                        _mm256_storeu_ps(o.add(u * L), *a);
                    }
                }
            }
            for j in 0..r {
                for e in body..n {
                    for i in group.clone() {
                        acc[j * n + e] = c[i * r + j].mul_add(x[i * stride + e], acc[j * n + e]);
                    }
                }
            }
        }
    }
}

simd_fn! {
    /// Rows `row0..` of the forward pass: `low`, and `y += s · low Bᵀ` (`y`'s rows `stride` apart).
    fn forward_rows(
        f: &Factors,
        x: &[f32],
        mask: Option<&DropMask>,
        row0: usize,
        y: &mut [f32],
        stride: usize,
        low: &mut [f32],
    ) {
        let mut xd = vec![0f32; f.inp];
        let mut scaled = vec![0f32; f.r];
        for (i, ((x, y), low)) in x
            .chunks(f.inp)
            .zip(y.chunks_mut(stride))
            .zip(low.chunks_mut(f.r))
            .enumerate()
        {
            masked_row(x, mask, (row0 + i) * f.inp, &mut xd);
            dots(&xd, f.a, low);
            scaled.iter_mut().zip(&*low).for_each(|(s, l)| *s = f.scale * l);
            add_combination(&mut y[..f.out], &scaled, &f.bt);
        }
    }
}

/// `y += s · (dropout(x) Aᵀ) Bᵀ` for `x` `[T, inp]`, where `y` holds the first `out` columns of
/// rows `stride` apart (a column block of a wider output); returns `dropout(x) Aᵀ` (`[T, r]`).
pub(super) fn forward(
    f: &Factors,
    x: &[f32],
    mask: Option<&DropMask>,
    y: &mut [f32],
    stride: usize,
) -> Vec<f32> {
    let rows = x.len() / f.inp.max(1);
    assert!(
        f.out <= stride && (rows == 0 || (rows - 1) * stride + f.out <= y.len()),
        "LoRA forward: output too short"
    );
    let mut low = vec![0f32; rows * f.r];
    y.par_chunks_mut(ROWS * stride)
        .zip(x.par_chunks(ROWS * f.inp))
        .zip(low.par_chunks_mut(ROWS * f.r))
        .enumerate()
        .for_each(|(c, ((y, x), low))| forward_rows(f, x, mask, c * ROWS, y, stride, low));
    low
}

simd_fn! {
    /// Rows of `dy` (`stride` apart): `dlow` rows, and this block's `dBᵀ` (`[r, out]`, unscaled).
    fn dy_rows(f: &Factors, dy: &[f32], stride: usize, low: &[f32], dlow: &mut [f32]) -> Vec<f32> {
        for (dy, dlow) in dy.chunks(stride).zip(dlow.chunks_mut(f.r)) {
            dots(&dy[..f.out], &f.bt, dlow);
            dlow.iter_mut().for_each(|d| *d *= f.scale);
        }
        let mut dbt = vec![0f32; f.r * f.out];
        add_outer(&mut dbt, low, dy, stride, f.r);
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
        let mut xd = vec![0f32; x.len()];
        for (i, (x, xd)) in x.chunks(f.inp).zip(xd.chunks_mut(f.inp)).enumerate() {
            masked_row(x, mask, (row0 + i) * f.inp, xd);
        }
        let mut da = vec![0f32; f.r * f.inp];
        add_outer(&mut da, dlow, &xd, f.inp, f.r);
        let mut t = vec![0f32; f.inp];
        let mut tm = vec![0f32; f.inp];
        for (i, (dx, dlow)) in dx.chunks_mut(f.inp).zip(dlow.chunks(f.r)).enumerate() {
            t.fill(0.0);
            add_combination(&mut t, dlow, f.a);
            // The mask's backward: the same mask applied to the gradient.
            masked_row(&t, mask, (row0 + i) * f.inp, &mut tm);
            for (d, v) in dx.iter_mut().zip(&tm) {
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

/// Given `dy` (the first `out` columns of rows `stride` apart, as in [`forward`]), the forward input
/// `x` with its `mask` and the kept `low`: adds the LoRA path's input gradient into `dx` and returns
/// `(dA, dB)`.
pub(super) fn backward(
    f: &Factors,
    x: &[f32],
    mask: Option<&DropMask>,
    low: &[f32],
    dy: &[f32],
    stride: usize,
    dx: &mut [f32],
) -> LoraPair {
    let rows = x.len() / f.inp.max(1);
    assert!(
        f.out <= stride && (rows == 0 || (rows - 1) * stride + f.out <= dy.len()),
        "LoRA backward: output gradient too short"
    );
    let mut dlow = vec![0f32; rows * f.r];
    let parts: Vec<Vec<f32>> = dy
        .par_chunks(BACKWARD_ROWS * stride)
        .zip(low.par_chunks(BACKWARD_ROWS * f.r))
        .zip(dlow.par_chunks_mut(BACKWARD_ROWS * f.r))
        .map(|((dy, low), dlow)| dy_rows(f, dy, stride, low, dlow))
        .collect();
    let dbt = sum_blocks(parts, f.r * f.out);
    let mut db = vec![0f32; f.out * f.r];
    for (j, row) in dbt.chunks(f.out).enumerate() {
        for (o, &v) in row.iter().enumerate() {
            db[o * f.r + j] = f.scale * v;
        }
    }
    let parts: Vec<Vec<f32>> = x
        .par_chunks(BACKWARD_ROWS * f.inp)
        .zip(dx.par_chunks_mut(BACKWARD_ROWS * f.inp))
        .zip(dlow.par_chunks(BACKWARD_ROWS * f.r))
        .enumerate()
        .map(|(c, ((x, dx), dlow))| x_rows(f, x, mask, c * BACKWARD_ROWS, dlow, dx))
        .collect();
    LoraPair {
        a: sum_blocks(parts, f.r * f.inp),
        b: db,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qlora::Dropout;
    use supportlm_model::lora::Target;

    /// The dispatched kernels (AVX2 on this machine when it has it) against plain loops, on widths
    /// with and without a tail past the vector blocks and ranks with and without a partial group.
    #[test]
    fn row_kernels_match_plain_loops() {
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        for n in [1, 7, 8, 33, 64, 100] {
            for r in [1, 3, 4, 8, 9] {
                let rows = 11;
                let val = |i: usize, k: usize| ((i * 7 + k * 13) % 17) as f32 / 8.0 - 1.0;
                let x: Vec<f32> = (0..rows * n).map(|i| val(i, 1)).collect();
                let m: Vec<f32> = (0..r * n).map(|i| val(i, 2)).collect();
                let c: Vec<f32> = (0..rows * r).map(|i| val(i, 3)).collect();

                let mut out = vec![0f32; r];
                dots(&x[..n], &m, &mut out);
                for (j, &o) in out.iter().enumerate() {
                    let want: f32 = (0..n).map(|k| x[k] * m[j * n + k]).sum();
                    assert!(close(o, want), "dots n {n} r {r} row {j}: {o} vs {want}");
                }

                let mut y: Vec<f32> = (0..n).map(|i| val(i, 4)).collect();
                let y0 = y.clone();
                add_combination(&mut y, &c[..r], &m);
                for (k, (&y, &y0)) in y.iter().zip(&y0).enumerate() {
                    let want = y0 + (0..r).map(|j| c[j] * m[j * n + k]).sum::<f32>();
                    assert!(close(y, want), "add_combination n {n} r {r} col {k}");
                }

                let mut acc: Vec<f32> = (0..r * n).map(|i| val(i, 5)).collect();
                let acc0 = acc.clone();
                add_outer(&mut acc, &c, &x, n, r);
                for j in 0..r {
                    for k in 0..n {
                        let want = acc0[j * n + k]
                            + (0..rows).map(|i| c[i * r + j] * x[i * n + k]).sum::<f32>();
                        assert!(
                            close(acc[j * n + k], want),
                            "add_outer n {n} r {r} ({j}, {k})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn masked_rows_match_the_mask_values_aligned_or_not() {
        let d = Dropout { p: 0.3, seed: 7 };
        for cols in [64, 128, 48, 100] {
            let mask = DropMask::new(d, 2, Target::UpProj, 5, cols);
            let values = mask.values(5 * cols);
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
