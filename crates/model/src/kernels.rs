//! Matrix × few-vectors kernels on quantized rows, for token-by-token decoding.
//!
//! Decoding one token reads every weight once, so its speed is set by how many bytes are read: these
//! kernels multiply straight from the GGUF blocks (Q4_0, Q4_1, Q8_0; other types are widened to f32 rows at
//! load) without materialising f32 weights. Activations stay f32: per block,
//! `Σ (d·q + m)·x = d·Σ q·x + m·Σ x`, so the only rounding differences from a dequantize-then-matmul are in
//! summation order. AVX2+FMA (and AVX-512 for batch 1) code paths are chosen at run time, with a portable
//! fallback; rows are split across threads with rayon.

use rayon::prelude::*;

use crate::quants::{dequantize, GgmlType};

/// How far ahead of the block being multiplied its weights are prefetched (bytes).
const PREFETCH: usize = 2048;

/// Most vectors multiplied per weight read (a decode batch).
pub const MAX_BATCH: usize = 8;

/// Dot product in eight independent lanes (vectorizes, also inside AVX2 code that inlines it; a fixed
/// summation order, so deterministic). For the f32 rows of attention and the training step's row loops.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A weight matrix `[rows, cols]` in a format the kernels read directly.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub format: QFormat,
    data: Vec<u8>,
}

/// Row formats the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    F32,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    fn ggml(self) -> GgmlType {
        match self {
            QFormat::F32 => GgmlType::F32,
            QFormat::Q4_0 => GgmlType::Q4_0,
            QFormat::Q4_1 => GgmlType::Q4_1,
            QFormat::Q8_0 => GgmlType::Q8_0,
        }
    }
}

impl QMatrix {
    /// From f32 values, row-major.
    pub fn from_f32(values: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols);
        QMatrix {
            rows,
            cols,
            format: QFormat::F32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// From GGML blocks; types without a kernel are widened to f32.
    pub fn from_ggml(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Self {
        let format = match ty {
            GgmlType::Q4_0 => Some(QFormat::Q4_0),
            GgmlType::Q4_1 => Some(QFormat::Q4_1),
            GgmlType::Q8_0 => Some(QFormat::Q8_0),
            GgmlType::F32 => Some(QFormat::F32),
            _ => None,
        };
        match format {
            Some(format) => QMatrix {
                rows,
                cols,
                format,
                data: bytes.to_vec(),
            },
            None => {
                let mut values = vec![0f32; rows * cols];
                dequantize(ty, bytes, &mut values);
                Self::from_f32(&values, rows, cols)
            }
        }
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows
    }

    /// Bytes read by one product (all rows).
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// The rows of several matrices stacked into one, when they share format and width: one product then
    /// reads the input once for all of them (and wakes the worker threads once).
    pub fn stack(parts: &[&QMatrix]) -> Option<QMatrix> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|m| m.format != first.format || m.cols != first.cols)
        {
            return None;
        }
        Some(QMatrix {
            rows: parts.iter().map(|m| m.rows).sum(),
            cols: first.cols,
            format: first.format,
            data: parts.iter().flat_map(|m| m.data.iter().copied()).collect(),
        })
    }

    /// Reorders rows: row `i` of the result is row `order[i]` of `self`.
    pub fn reorder_rows(&self, order: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(&self.data[r * rb..(r + 1) * rb]);
        }
        QMatrix { data, ..*self }
    }

    /// One row dequantized (embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        dequantize(self.format.ggml(), &self.data[r * rb..(r + 1) * rb], out);
    }

    /// `ys[b][r] = Σ_k W[r, k] · xs[b][k]` for up to [`MAX_BATCH`] vectors; `ys` is `[rows][batch]`.
    pub fn matvecs(&self, xs: &[&[f32]], ys: &mut [f32]) {
        self.matvecs_with(Simd::detect(), xs, ys)
    }

    /// [`QMatrix::matvecs`] with a chosen instruction set (never above what the CPU has).
    fn matvecs_with(&self, simd: Simd, xs: &[&[f32]], ys: &mut [f32]) {
        let simd = simd.min(Simd::detect());
        let b = xs.len();
        assert!(b <= MAX_BATCH && b > 0);
        assert!(xs.iter().all(|x| x.len() == self.cols));
        assert_eq!(ys.len(), self.rows * b);
        // Per-block sums of x (for the `m · Σx` term of Q4_1), `[batch][block]` flattened.
        let n_blocks = self.cols / 32;
        let block_sums: Vec<f32> = if matches!(self.format, QFormat::Q4_1 | QFormat::Q4_0) {
            xs.iter()
                .flat_map(|x| x.chunks_exact(32).map(|c| c.iter().sum::<f32>()))
                .collect()
        } else {
            Vec::new()
        };
        let rb = self.row_bytes();
        // One task per thread for small matrices (scheduling costs more than imbalance), ~256 KiB tasks beyond.
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = self
            .rows
            .div_ceil(threads)
            .min((256 * 1024 / rb.max(1)).max(16));
        ys.par_chunks_mut(rows_per_task * b)
            .enumerate()
            .for_each(|(chunk, out)| {
                let first = chunk * rows_per_task;
                let n_rows = out.len() / b;
                let job = Job {
                    format: self.format,
                    rows: &self.data[first * rb..(first + n_rows) * rb],
                    row_bytes: rb,
                    xs,
                    block_sums: &block_sums,
                    n_blocks,
                };
                #[cfg(target_arch = "x86_64")]
                match simd {
                    // SAFETY (both): the instruction sets were detected at run time (`Simd::detect`).
                    Simd::Avx512 if b == 1 => return unsafe { avx512::rows_dot1(&job, out) },
                    Simd::Avx2 | Simd::Avx512 => return unsafe { avx2::rows_dot(&job, out) },
                    Simd::Portable => {}
                }
                for (i, y) in out.chunks_exact_mut(b).enumerate() {
                    portable_row_dot(&job, i, y);
                }
            });
    }
}

/// One thread's share of a product: a run of rows and every input vector.
struct Job<'a> {
    format: QFormat,
    rows: &'a [u8],
    row_bytes: usize,
    xs: &'a [&'a [f32]],
    /// `[batch][block]` sums of x (4-bit formats only).
    block_sums: &'a [f32],
    n_blocks: usize,
}

impl Job<'_> {
    fn row(&self, i: usize) -> &[u8] {
        &self.rows[i * self.row_bytes..(i + 1) * self.row_bytes]
    }
}

/// The instruction sets the kernels can use, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The above plus AVX-512F (used for batch 1).
    Avx512,
}

impl Simd {
    fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            if avx2 && std::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if avx2 {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The reference kernel (and the fallback on machines without AVX2).
fn portable_row_dot(job: &Job<'_>, i: usize, y: &mut [f32]) {
    let row = job.row(i);
    for (bi, x) in job.xs.iter().enumerate() {
        let mut acc = 0f32;
        match job.format {
            QFormat::F32 => {
                for (w, xv) in row.chunks_exact(4).zip(x.iter()) {
                    acc += f32::from_le_bytes([w[0], w[1], w[2], w[3]]) * xv;
                }
            }
            QFormat::Q8_0 => {
                for (blk, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
                    let s: f32 = (0..32).map(|j| (blk[2 + j] as i8) as f32 * xb[j]).sum();
                    acc += f16_at(blk, 0) * s;
                }
            }
            QFormat::Q4_0 => {
                for (blk, xb) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
                    let s: f32 = (0..16)
                        .map(|j| {
                            let q = blk[2 + j];
                            ((q & 15) as i32 - 8) as f32 * xb[j]
                                + ((q >> 4) as i32 - 8) as f32 * xb[j + 16]
                        })
                        .sum();
                    acc += f16_at(blk, 0) * s;
                }
            }
            QFormat::Q4_1 => {
                for (k, (blk, xb)) in row.chunks_exact(20).zip(x.chunks_exact(32)).enumerate() {
                    let s: f32 = (0..16)
                        .map(|j| {
                            let q = blk[4 + j];
                            (q & 15) as f32 * xb[j] + (q >> 4) as f32 * xb[j + 16]
                        })
                        .sum();
                    acc +=
                        f16_at(blk, 0) * s + f16_at(blk, 2) * job.block_sums[bi * job.n_blocks + k];
                }
            }
        }
        y[bi] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
}

/// The batch-1 kernel with 16-lane AVX-512 vectors: half the instructions per block of the AVX2 one.
#[cfg(target_arch = "x86_64")]
mod avx512 {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn blocks(ty: GgmlType, n_blocks: usize, seed: u32) -> Vec<u8> {
        let (_, size) = ty.block().unwrap();
        let mut bytes: Vec<u8> = random(n_blocks * size, seed)
            .iter()
            .map(|v| ((v + 0.5) * 255.0) as u8)
            .collect();
        for b in 0..n_blocks {
            let scale = half::f16::from_f32(0.01 + 0.001 * b as f32).to_le_bytes();
            bytes[b * size..b * size + 2].copy_from_slice(&scale);
            if ty == GgmlType::Q4_1 {
                bytes[b * size + 2..b * size + 4]
                    .copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    fn every_format_matches_dequantize_then_dot() {
        for (ty, rows, cols) in [
            (GgmlType::Q4_0, 37, 96),
            (GgmlType::Q4_1, 37, 96),
            (GgmlType::Q8_0, 37, 96),
            (GgmlType::F32, 37, 96),
            (GgmlType::F32, 5, 44), // f32 rows need not be whole blocks
        ] {
            let bytes = if ty == GgmlType::F32 {
                random(rows * cols, 3)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            } else {
                blocks(ty, rows * cols / 32, 9)
            };
            let m = QMatrix::from_ggml(ty, &bytes, rows, cols);
            let mut dense = vec![0f32; rows * cols];
            dequantize(ty, &bytes, &mut dense);
            // Batch 1 has its own kernel; batch 3 goes through the generic one.
            for batch in [1, 3] {
                let xs: Vec<Vec<f32>> = (0..batch).map(|i| random(cols, 100 + i as u32)).collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                let mut ys = vec![0f32; rows * batch];
                m.matvecs(&refs, &mut ys);
                for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
                    let mut other = vec![0f32; rows * batch];
                    m.matvecs_with(simd, &refs, &mut other);
                    let diff = ys
                        .iter()
                        .zip(&other)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff < 1e-4,
                        "{ty:?} batch {batch} {simd:?} differs by {diff}"
                    );
                }
                let block_sums: Vec<f32> = xs
                    .iter()
                    .flat_map(|x| x.chunks_exact(32).map(|c| c.iter().sum::<f32>()))
                    .collect();
                let job = Job {
                    format: m.format,
                    rows: &bytes,
                    row_bytes: m.row_bytes(),
                    xs: &refs,
                    block_sums: &block_sums,
                    n_blocks: cols / 32,
                };
                let mut portable = vec![0f32; batch];
                for r in 0..rows {
                    portable_row_dot(&job, r, &mut portable);
                    for b in 0..batch {
                        let want: f32 = (0..cols).map(|k| dense[r * cols + k] * xs[b][k]).sum();
                        let got = ys[r * batch + b];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{ty:?} batch {batch} row {r}: {got} vs {want}"
                        );
                        assert!((portable[b] - want).abs() < 1e-4, "{ty:?} portable row {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn widened_types_and_row_reordering() {
        let (rows, cols) = (4, 256);
        let bytes = blocks(GgmlType::Q6K, rows, 11);
        let m = QMatrix::from_ggml(GgmlType::Q6K, &bytes, rows, cols);
        assert_eq!(m.format, QFormat::F32);
        let r = m.reorder_rows(&[3, 2, 1, 0]);
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        m.row_f32(0, &mut a);
        r.row_f32(3, &mut b);
        assert_eq!(a, b);
    }
}
