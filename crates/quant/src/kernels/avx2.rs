//! AVX2 + FMA + F16C kernels: the quantized-row dot products of decoding (any batch up to
//! [`super::MAX_BATCH`]) and the NF4 block lookup.

use std::arch::x86_64::*;

use super::{Job, QFormat, PREFETCH};

// Always inlined into `row_dot`, whose target features then apply to the intrinsics.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Eight unsigned bytes as eight f32.
// Always inlined into `row_dot`, whose target features then apply to the intrinsics.
#[inline(always)]
unsafe fn u8x8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

/// Eight signed bytes as eight f32.
// Always inlined into `row_dot`, whose target features then apply to the intrinsics.
#[inline(always)]
unsafe fn i8x8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// An f16 at `p` as f32, with the F16C conversion instruction.
// Always inlined into its caller, whose target features then apply to the intrinsics.
#[inline(always)]
pub(super) unsafe fn f16_ptr(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The 32 weights of block `k` of a row as 4 × 8 lanes, and the block's scale.
// Always inlined into `row_dot`, whose target features then apply to the intrinsics.
#[inline(always)]
unsafe fn block(format: QFormat, row: *const u8, k: usize) -> ([__m256; 4], f32) {
    match format {
        QFormat::F32 => {
            let w = (row as *const f32).add(k * 32);
            let ws = [
                _mm256_loadu_ps(w),
                _mm256_loadu_ps(w.add(8)),
                _mm256_loadu_ps(w.add(16)),
                _mm256_loadu_ps(w.add(24)),
            ];
            (ws, 1.0)
        }
        QFormat::Q8_0 => {
            let blk = row.add(k * 34);
            let a = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let c = _mm_loadu_si128(blk.add(18) as *const __m128i);
            let ws = [
                i8x8(a),
                i8x8(_mm_srli_si128(a, 8)),
                i8x8(c),
                i8x8(_mm_srli_si128(c, 8)),
            ];
            (ws, f16_ptr(blk))
        }
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let (size, qs, minus) = if format == QFormat::Q4_0 {
                (18, 2, 8.0)
            } else {
                (20, 4, 0.0)
            };
            let blk = row.add(k * size);
            let q = _mm_loadu_si128(blk.add(qs) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            let m = _mm256_set1_ps(minus);
            let ws = [
                _mm256_sub_ps(u8x8(lo), m),
                _mm256_sub_ps(u8x8(_mm_srli_si128(lo, 8)), m),
                _mm256_sub_ps(u8x8(hi), m),
                _mm256_sub_ps(u8x8(_mm_srli_si128(hi, 8)), m),
            ];
            (ws, f16_ptr(blk))
        }
    }
}

/// `y[b] = Σ_k scale_k · Σ w·x_b` for one row and `B` vectors, accumulators in registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot<const B: usize>(job: &Job<'_>, i: usize, y: &mut [f32]) {
    let row = job.row(i);
    let p = row.as_ptr();
    let n_blocks = job.n_blocks;
    let mut acc = [_mm256_setzero_ps(); B];
    let mut extra = [0f32; B];
    let xp: [*const f32; B] = std::array::from_fn(|b| job.xs[b].as_ptr());
    let block_bytes = job.row_bytes / n_blocks.max(1);
    for k in 0..n_blocks {
        _mm_prefetch::<_MM_HINT_T0>(p.add(k * block_bytes + PREFETCH) as *const i8);
        let (w, scale) = block(job.format, p, k);
        let d = _mm256_set1_ps(scale);
        for b in 0..B {
            let x = xp[b].add(k * 32);
            let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
            s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), s);
            s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), s);
            s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), s);
            acc[b] = _mm256_fmadd_ps(d, s, acc[b]);
        }
        if job.format == QFormat::Q4_1 {
            let m = f16_ptr(p.add(k * 20 + 2));
            for (b, e) in extra.iter_mut().enumerate() {
                *e += m * job.block_sums[b * n_blocks + k];
            }
        }
    }
    if job.format == QFormat::F32 {
        // f32 rows need not be whole 32-wide blocks: the tail.
        let w = p as *const f32;
        let cols = job.row_bytes / 4;
        for (b, e) in extra.iter_mut().enumerate() {
            for k in n_blocks * 32..cols {
                *e += *w.add(k) * *xp[b].add(k);
            }
        }
    }
    for b in 0..B {
        y[b] = hsum(acc[b]) + extra[b];
    }
}

/// Eight f32 weights from the low 8 bytes of `v`, times eight x values, added to `s`.
#[inline(always)]
unsafe fn fma_u8(v: __m128i, x: *const f32, s: __m256) -> __m256 {
    _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)),
        _mm256_loadu_ps(x),
        s,
    )
}

#[inline(always)]
unsafe fn fma_i8(v: __m128i, x: *const f32, s: __m256) -> __m256 {
    _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
        _mm256_loadu_ps(x),
        s,
    )
}

/// One row times one vector: the batch-1 decode case. Straight-line loops per format, everything in
/// registers (no arrays of vectors, which the compiler spills and reloads at a different width).
#[inline(always)]
unsafe fn dot1(job: &Job<'_>, i: usize) -> f32 {
    let row = job.row(i).as_ptr();
    let x = job.xs[0].as_ptr();
    let n = job.n_blocks;
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0f32;
    let zero = _mm256_setzero_ps();
    let mask = _mm_set1_epi8(0x0f);
    match job.format {
        QFormat::Q4_1 | QFormat::Q4_0 => {
            let (size, qs) = if job.format == QFormat::Q4_1 {
                (20, 4)
            } else {
                (18, 2)
            };
            for k in 0..n {
                let blk = row.add(k * size);
                _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
                let xk = x.add(k * 32);
                let q = _mm_loadu_si128(blk.add(qs) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let mut s = fma_u8(lo, xk, zero);
                s = fma_u8(_mm_unpackhi_epi64(lo, lo), xk.add(8), s);
                s = fma_u8(hi, xk.add(16), s);
                s = fma_u8(_mm_unpackhi_epi64(hi, hi), xk.add(24), s);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_ptr(blk)), s, acc);
                if job.format == QFormat::Q4_1 {
                    extra += f16_ptr(blk.add(2)) * *job.block_sums.get_unchecked(k);
                } else {
                    // Q4_0 stores q + 8: subtract 8·Σx of the block.
                    let sum = *job.block_sums.get_unchecked(k);
                    extra -= 8.0 * f16_ptr(blk) * sum;
                }
            }
        }
        QFormat::Q8_0 => {
            for k in 0..n {
                let blk = row.add(k * 34);
                _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
                let xk = x.add(k * 32);
                let a = _mm_loadu_si128(blk.add(2) as *const __m128i);
                let c = _mm_loadu_si128(blk.add(18) as *const __m128i);
                let mut s = fma_i8(a, xk, zero);
                s = fma_i8(_mm_unpackhi_epi64(a, a), xk.add(8), s);
                s = fma_i8(c, xk.add(16), s);
                s = fma_i8(_mm_unpackhi_epi64(c, c), xk.add(24), s);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_ptr(blk)), s, acc);
            }
        }
        QFormat::F32 => {
            let w = row as *const f32;
            let cols = job.row_bytes / 4;
            for k in 0..cols / 8 {
                let (wk, xk) = (_mm256_loadu_ps(w.add(k * 8)), _mm256_loadu_ps(x.add(k * 8)));
                acc = _mm256_fmadd_ps(wk, xk, acc);
            }
            for k in cols / 8 * 8..cols {
                extra += *w.add(k) * *x.add(k);
            }
        }
    }
    hsum(acc) + extra
}

/// Every row of a job, for every vector.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dot(job: &Job<'_>, out: &mut [f32]) {
    let b = job.xs.len();
    if b == 1 {
        for (i, y) in out.iter_mut().enumerate() {
            *y = dot1(job, i);
        }
        return;
    }
    for (i, y) in out.chunks_exact_mut(b).enumerate() {
        match b {
            1 => row_dot::<1>(job, i, y),
            2 => row_dot::<2>(job, i, y),
            3 => row_dot::<3>(job, i, y),
            4 => row_dot::<4>(job, i, y),
            5 => row_dot::<5>(job, i, y),
            6 => row_dot::<6>(job, i, y),
            7 => row_dot::<7>(job, i, y),
            _ => row_dot::<8>(job, i, y),
        }
    }
}

/// One full block looked up eight values at a time: the nibbles are spread to 32-bit lanes in element
/// order and each picks its scaled code with two in-register table lookups (codes 0–7 and 8–15). The
/// same values as the scalar loop (a lookup, no arithmetic).
///
/// Safety: the CPU has AVX2; `bytes` holds 32 bytes, `out` 64 values.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn nf4_block(scaled: &[f32; 16], bytes: &[u8], out: &mut [f32]) {
    assert!(bytes.len() >= 32 && out.len() >= 64);
    let low_table = _mm256_loadu_ps(scaled.as_ptr());
    let high_table = _mm256_loadu_ps(scaled.as_ptr().add(8));
    let nibble = _mm_set1_epi8(0x0f);
    let seven = _mm256_set1_epi32(7);
    for half in 0..4 {
        // Eight bytes hold sixteen values: high nibble first.
        let v = _mm_loadl_epi64(bytes.as_ptr().add(half * 8) as *const __m128i);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
        let lo = _mm_and_si128(v, nibble);
        let idx = _mm_unpacklo_epi8(hi, lo);
        for (part, idx) in [idx, _mm_srli_si128(idx, 8)].into_iter().enumerate() {
            let i = _mm256_cvtepu8_epi32(idx);
            let from_low = _mm256_permutevar8x32_ps(low_table, i);
            let from_high = _mm256_permutevar8x32_ps(high_table, i);
            let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, seven));
            let values = _mm256_blendv_ps(from_low, from_high, high);
            _mm256_storeu_ps(out.as_mut_ptr().add(half * 16 + part * 8), values);
        }
    }
}
