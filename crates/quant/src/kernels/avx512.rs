//! AVX-512F kernels: the batch-1 quantized-row dot product, 16 lanes per vector (half the
//! instructions per block of the AVX2 one).

use std::arch::x86_64::*;

use super::avx2::f16_ptr;
use super::{Job, QFormat, PREFETCH};

#[inline(always)]
unsafe fn dot1(job: &Job<'_>, i: usize) -> f32 {
    let row = job.row(i).as_ptr();
    let x = job.xs[0].as_ptr();
    let n = job.n_blocks;
    let mut acc = _mm512_setzero_ps();
    let mut extra = 0f32;
    match job.format {
        QFormat::Q4_1 | QFormat::Q4_0 => {
            let (size, qs) = if job.format == QFormat::Q4_1 {
                (20, 4)
            } else {
                (18, 2)
            };
            let mask = _mm_set1_epi8(0x0f);
            for k in 0..n {
                let blk = row.add(k * size);
                _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
                let xk = x.add(k * 32);
                let q = _mm_loadu_si128(blk.add(qs) as *const __m128i);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                    _mm_srli_epi16(q, 4),
                    mask,
                )));
                let s = _mm512_fmadd_ps(
                    hi,
                    _mm512_loadu_ps(xk.add(16)),
                    _mm512_mul_ps(lo, _mm512_loadu_ps(xk)),
                );
                let d = f16_ptr(blk);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
                let sum = *job.block_sums.get_unchecked(k);
                if job.format == QFormat::Q4_1 {
                    extra += f16_ptr(blk.add(2)) * sum;
                } else {
                    extra -= 8.0 * d * sum; // Q4_0 stores q + 8
                }
            }
        }
        QFormat::Q8_0 => {
            for k in 0..n {
                let blk = row.add(k * 34);
                _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
                let xk = x.add(k * 32);
                let a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    blk.add(2) as *const __m128i
                )));
                let c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    blk.add(18) as *const __m128i
                )));
                let s = _mm512_fmadd_ps(
                    c,
                    _mm512_loadu_ps(xk.add(16)),
                    _mm512_mul_ps(a, _mm512_loadu_ps(xk)),
                );
                acc = _mm512_fmadd_ps(_mm512_set1_ps(f16_ptr(blk)), s, acc);
            }
        }
        QFormat::F32 => {
            let w = row as *const f32;
            let cols = job.row_bytes / 4;
            for k in 0..cols / 16 {
                let (wk, xk) = (
                    _mm512_loadu_ps(w.add(k * 16)),
                    _mm512_loadu_ps(x.add(k * 16)),
                );
                acc = _mm512_fmadd_ps(wk, xk, acc);
            }
            for k in cols / 16 * 16..cols {
                extra += *w.add(k) * *x.add(k);
            }
        }
        QFormat::Nf4 | QFormat::Int8 => {
            unreachable!("read by the AVX2 rows_dot_nf4 / rows_dot_int8")
        }
    }
    _mm512_reduce_add_ps(acc) + extra
}

/// Every row of a batch-1 job.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn rows_dot1(job: &Job<'_>, out: &mut [f32]) {
    for (i, y) in out.iter_mut().enumerate() {
        *y = dot1(job, i);
    }
}
