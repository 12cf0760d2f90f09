//! AVX2 + FMA + F16C kernels: the quantized-row dot products of decoding (any batch up to
//! [`super::MAX_BATCH`]).

use std::arch::x86_64::*;

use super::{Job, QFormat, MAX_BATCH, NF4_BLOCK_BYTES, PREFETCH};

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

/// The 32 weights of block `k` of a row as 4 × 8 lanes, with the block's scale (and Q4_1's offset)
/// already applied: `d·q + m`, exactly the dequantized values. Computed once per block and used for
/// every vector of the batch, so each vector costs four FMAs per block and nothing else.
// Always inlined into `row_dot`, whose target features then apply to the intrinsics.
#[inline(always)]
unsafe fn scaled_block(format: QFormat, row: *const u8, k: usize) -> [__m256; 4] {
    match format {
        QFormat::F32 => {
            let w = (row as *const f32).add(k * 32);
            [
                _mm256_loadu_ps(w),
                _mm256_loadu_ps(w.add(8)),
                _mm256_loadu_ps(w.add(16)),
                _mm256_loadu_ps(w.add(24)),
            ]
        }
        QFormat::Q8_0 => {
            let blk = row.add(k * 34);
            let d = _mm256_set1_ps(f16_ptr(blk));
            let a = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let c = _mm_loadu_si128(blk.add(18) as *const __m128i);
            [
                _mm256_mul_ps(d, i8x8(a)),
                _mm256_mul_ps(d, i8x8(_mm_unpackhi_epi64(a, a))),
                _mm256_mul_ps(d, i8x8(c)),
                _mm256_mul_ps(d, i8x8(_mm_unpackhi_epi64(c, c))),
            ]
        }
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let q4_1 = format == QFormat::Q4_1;
            let blk = row.add(k * if q4_1 { 20 } else { 18 });
            let d = f16_ptr(blk);
            // Q4_1: d·q + m; Q4_0: d·(q − 8) = d·q − 8d.
            let m = _mm256_set1_ps(if q4_1 { f16_ptr(blk.add(2)) } else { -8.0 * d });
            let d = _mm256_set1_ps(d);
            let q = _mm_loadu_si128(blk.add(if q4_1 { 4 } else { 2 }) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            [
                _mm256_fmadd_ps(u8x8(lo), d, m),
                _mm256_fmadd_ps(u8x8(_mm_unpackhi_epi64(lo, lo)), d, m),
                _mm256_fmadd_ps(u8x8(hi), d, m),
                _mm256_fmadd_ps(u8x8(_mm_unpackhi_epi64(hi, hi)), d, m),
            ]
        }
        QFormat::Nf4 | QFormat::Int8 => unreachable!("read by rows_dot_nf4 / rows_dot_int8"),
    }
}

/// `y[b] = Σ_k w_k·x_b[k]` for one row and `B` vectors (2 ≤ B ≤ 8), accumulators in registers: per
/// block the weights are dequantized once, then each vector adds four FMAs. Small batches keep two
/// accumulators per vector so that at least eight FMA chains are in flight.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot<const B: usize, const F: u8>(job: &Job<'_>, i: usize, y: &mut [f32]) {
    let format = format_of(F);
    let p = job.row(i).as_ptr();
    let n_blocks = job.n_blocks;
    let two = B <= 4;
    let mut acc = [_mm256_setzero_ps(); B];
    let mut acc2 = [_mm256_setzero_ps(); B];
    let xp: [*const f32; B] = std::array::from_fn(|b| job.xs[b].as_ptr());
    let block_bytes = job.row_bytes / n_blocks.max(1);
    for k in 0..n_blocks {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(k * block_bytes + PREFETCH) as *const i8);
        let w = scaled_block(format, p, k);
        for b in 0..B {
            let x = xp[b].add(k * 32);
            if two {
                acc[b] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[b]);
                acc2[b] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), acc2[b]);
                acc[b] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), acc[b]);
                acc2[b] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), acc2[b]);
            } else {
                acc[b] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[b]);
                acc[b] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), acc[b]);
                acc[b] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), acc[b]);
                acc[b] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), acc[b]);
            }
        }
    }
    let mut tail = [0f32; B];
    if format == QFormat::F32 {
        // f32 rows need not be whole 32-wide blocks: the tail.
        let w = p as *const f32;
        let cols = job.row_bytes / 4;
        for (b, t) in tail.iter_mut().enumerate() {
            for k in n_blocks * 32..cols {
                *t += *w.add(k) * *xp[b].add(k);
            }
        }
    }
    for b in 0..B {
        let a = if two {
            _mm256_add_ps(acc[b], acc2[b])
        } else {
            acc[b]
        };
        y[b] = hsum(a) + tail[b];
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

/// Batch-1 Q4_1 (`Q4_1 = true`) or Q4_0 rows: `d·Σ q·x` per block into a vector accumulator, the
/// offset term (`m·Σx`, or `−8d·Σx` for Q4_0's `q + 8` codes) into a scalar one. The block's leading f16
/// pair (Q4_1's d and m) is widened by one instruction; one loop per format, no branch inside.
#[inline(always)]
unsafe fn dot1_q4<const Q4_1: bool>(job: &Job<'_>, i: usize) -> f32 {
    let (size, qs) = if Q4_1 { (20, 4) } else { (18, 2) };
    let row = job.row(i).as_ptr();
    let x = job.xs[0].as_ptr();
    let sums = job.block_sums.as_ptr();
    let zero = _mm256_setzero_ps();
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut extra = _mm_setzero_ps();
    for k in 0..job.n_blocks {
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
        // Lane 0: d; lane 1: Q4_1's m (for Q4_0, the first two code bytes, unused).
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), s, acc);
        let offset = if Q4_1 {
            _mm_movehdup_ps(dm)
        } else {
            _mm_mul_ss(dm, _mm_set_ss(-8.0))
        };
        extra = _mm_fmadd_ss(offset, _mm_load_ss(sums.add(k)), extra);
    }
    hsum(acc) + _mm_cvtss_f32(extra)
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
    match job.format {
        QFormat::Q4_1 => return dot1_q4::<true>(job, i),
        QFormat::Q4_0 => return dot1_q4::<false>(job, i),
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
        QFormat::Nf4 | QFormat::Int8 => unreachable!("read by rows_dot_nf4 / rows_dot_int8"),
    }
    hsum(acc) + extra
}

// The formats [`row_dot`] is compiled for, as const parameters (one loop per format, no branch inside).
const F32: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;
const Q8_0: u8 = 3;

#[inline(always)]
const fn format_of(f: u8) -> QFormat {
    match f {
        F32 => QFormat::F32,
        Q4_0 => QFormat::Q4_0,
        Q4_1 => QFormat::Q4_1,
        _ => QFormat::Q8_0,
    }
}

/// Every row of a job, for every vector.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dot(job: &Job<'_>, out: &mut [f32]) {
    if job.xs.len() == 1 {
        for (i, y) in out.iter_mut().enumerate() {
            *y = dot1(job, i);
        }
        return;
    }
    match job.format {
        QFormat::F32 => rows_dot_batch::<F32>(job, out),
        QFormat::Q4_0 => rows_dot_batch::<Q4_0>(job, out),
        QFormat::Q4_1 => rows_dot_batch::<Q4_1>(job, out),
        QFormat::Q8_0 => rows_dot_batch::<Q8_0>(job, out),
        QFormat::Nf4 | QFormat::Int8 => unreachable!("read by rows_dot_nf4 / rows_dot_int8"),
    }
}

/// [`rows_dot`] for 2 to [`MAX_BATCH`] vectors, rows of format `F`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_dot_batch<const F: u8>(job: &Job<'_>, out: &mut [f32]) {
    let b = job.xs.len();
    for (i, y) in out.chunks_exact_mut(b).enumerate() {
        match b {
            2 => row_dot::<2, F>(job, i, y),
            3 => row_dot::<3, F>(job, i, y),
            4 => row_dot::<4, F>(job, i, y),
            5 => row_dot::<5, F>(job, i, y),
            6 => row_dot::<6, F>(job, i, y),
            7 => row_dot::<7, F>(job, i, y),
            _ => row_dot::<MAX_BATCH, F>(job, i, y),
        }
    }
}

/// Eight NF4 values from eight 4-bit indices (the low 8 bytes of `idx`, one index per byte): two
/// in-register table lookups (codes 0–7 and 8–15), picked by the index's bit 3.
// Always inlined into `rows_dot_nf4`, whose target features then apply to the intrinsics.
#[inline(always)]
unsafe fn nf4_values8(low_table: __m256, high_table: __m256, idx: __m128i) -> __m256 {
    let i = _mm256_cvtepu8_epi32(idx);
    let from_low = _mm256_permutevar8x32_ps(low_table, i);
    let from_high = _mm256_permutevar8x32_ps(high_table, i);
    // Bit 3 moved to the sign bit, which is what blendv reads.
    _mm256_blendv_ps(
        from_low,
        from_high,
        _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)),
    )
}

/// [`QFormat::Nf4`] rows times every vector: per 64-value block, the code values are looked up in
/// registers once, `Σ code·x` is taken for every vector, and the block's absmax multiplies that sum
/// (`Σ (code·m)·x = m·Σ code·x`: summation order is the only difference from the dequantized weights).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows_dot_nf4(job: &Job<'_>, out: &mut [f32]) {
    let b = job.xs.len();
    let code = crate::nf4::nf4_code();
    let low_table = _mm256_loadu_ps(code.as_ptr());
    let high_table = _mm256_loadu_ps(code.as_ptr().add(8));
    let nibble = _mm_set1_epi8(0x0f);
    let blocks = job.row_bytes / NF4_BLOCK_BYTES;
    for (i, y) in out.chunks_exact_mut(b).enumerate() {
        let row = job.row(i).as_ptr();
        let mut acc = [_mm256_setzero_ps(); MAX_BATCH];
        for k in 0..blocks {
            let blk = row.add(k * NF4_BLOCK_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let m = _mm256_set1_ps((blk as *const f32).read_unaligned());
            let mut w = [_mm256_setzero_ps(); 8];
            for half in 0..2 {
                // Sixteen bytes hold 32 values, high nibble first.
                let v = _mm_loadu_si128(blk.add(4 + half * 16) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
                let lo = _mm_and_si128(v, nibble);
                let first = _mm_unpacklo_epi8(hi, lo);
                let second = _mm_unpackhi_epi8(hi, lo);
                w[half * 4] = nf4_values8(low_table, high_table, first);
                w[half * 4 + 1] = nf4_values8(low_table, high_table, _mm_srli_si128(first, 8));
                w[half * 4 + 2] = nf4_values8(low_table, high_table, second);
                w[half * 4 + 3] = nf4_values8(low_table, high_table, _mm_srli_si128(second, 8));
            }
            for (bi, acc) in acc.iter_mut().enumerate().take(b) {
                let x = job.xs[bi].as_ptr().add(k * 64);
                let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
                for (j, w) in w.iter().enumerate().skip(1) {
                    s = _mm256_fmadd_ps(*w, _mm256_loadu_ps(x.add(j * 8)), s);
                }
                *acc = _mm256_fmadd_ps(m, s, *acc);
            }
        }
        for (bi, y) in y.iter_mut().enumerate() {
            *y = hsum(acc[bi]);
        }
    }
}

/// [`QFormat::Int8`] rows times every vector: `scale · Σ q·x` per row.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows_dot_int8(job: &Job<'_>, out: &mut [f32]) {
    let b = job.xs.len();
    let cols = job.row_bytes - 4;
    for (i, y) in out.chunks_exact_mut(b).enumerate() {
        let row = job.row(i);
        let scale = f32::from_le_bytes([row[0], row[1], row[2], row[3]]);
        let q = row.as_ptr().add(4);
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(job.row_bytes + PREFETCH) as *const i8);
        for (bi, y) in y.iter_mut().enumerate() {
            let x = job.xs[bi].as_ptr();
            let mut s = _mm256_setzero_ps();
            for k in 0..cols / 8 {
                s = fma_i8(
                    _mm_loadl_epi64(q.add(k * 8) as *const __m128i),
                    x.add(k * 8),
                    s,
                );
            }
            let mut tail = 0f32;
            for k in cols / 8 * 8..cols {
                tail += (*q.add(k) as i8) as f32 * *x.add(k);
            }
            *y = (hsum(s) + tail) * scale;
        }
    }
}
