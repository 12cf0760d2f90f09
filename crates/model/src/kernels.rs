//! Matrix × few-vectors kernels on quantized rows, for token-by-token decoding.
//!
//! Decoding one token reads every weight once, so its speed is set by how many bytes are read: these
//! kernels multiply straight from the GGUF blocks (Q4_0, Q4_1, Q8_0; other types are widened to f32 rows at
//! load) without materialising f32 weights. Activations stay f32: per block,
//! `Σ (d·q + m)·x = d·Σ q·x + m·Σ x`, so the only rounding differences from a dequantize-then-matmul are in
//! summation order. AVX2+FMA code paths are chosen at run time, with a portable fallback; rows are split
//! across threads with rayon.

use rayon::prelude::*;

use crate::quants::{dequantize, GgmlType};

/// Most vectors multiplied per weight read (a decode batch).
pub const MAX_BATCH: usize = 8;

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
        let b = xs.len();
        assert!(b <= MAX_BATCH && b > 0);
        assert!(xs.iter().all(|x| x.len() == self.cols));
        assert_eq!(ys.len(), self.rows * b);
        // Per-block sums of x (for the `m · Σx` term of Q4_1).
        let block_sums: Vec<Vec<f32>> = if self.format == QFormat::Q4_1 {
            xs.iter()
                .map(|x| x.chunks_exact(32).map(|c| c.iter().sum()).collect())
                .collect()
        } else {
            Vec::new()
        };
        let rb = self.row_bytes();
        let rows_per_task = (16384 / rb.max(1)).clamp(8, 256);
        ys.par_chunks_mut(rows_per_task * b)
            .enumerate()
            .for_each(|(chunk, out)| {
                let first = chunk * rows_per_task;
                for (i, y) in out.chunks_exact_mut(b).enumerate() {
                    let row = &self.data[(first + i) * rb..(first + i + 1) * rb];
                    row_dot(self.format, row, xs, &block_sums, y);
                }
            });
    }
}

fn row_dot(format: QFormat, row: &[u8], xs: &[&[f32]], block_sums: &[Vec<f32>], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features the function needs were just detected.
            unsafe { avx2::row_dot(format, row, xs, block_sums, y) };
            return;
        }
    }
    portable_row_dot(format, row, xs, block_sums, y);
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The reference kernel (and the fallback on machines without AVX2).
fn portable_row_dot(
    format: QFormat,
    row: &[u8],
    xs: &[&[f32]],
    block_sums: &[Vec<f32>],
    y: &mut [f32],
) {
    for (bi, x) in xs.iter().enumerate() {
        let mut acc = 0f32;
        match format {
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
                    acc += f16_at(blk, 0) * s + f16_at(blk, 2) * block_sums[bi][k];
                }
            }
        }
        y[bi] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{f16_at, QFormat, MAX_BATCH};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Eight bytes as eight f32 (unsigned or signed).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn i8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// Multiplies one block's 32 weights (as 4 × 8 f32 lanes) with every vector's block and accumulates
    /// `scale · Σ w·x` per vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate(
        w: [__m256; 4],
        scale: f32,
        xs: &[&[f32]],
        offset: usize,
        acc: &mut [__m256; MAX_BATCH],
    ) {
        let d = _mm256_set1_ps(scale);
        for (b, x) in xs.iter().enumerate() {
            let p = x.as_ptr().add(offset);
            let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(p));
            s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(p.add(8)), s);
            s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(p.add(16)), s);
            s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(p.add(24)), s);
            acc[b] = _mm256_fmadd_ps(d, s, acc[b]);
        }
    }

    /// Low and high nibbles of 16 bytes: weights 0..16 and 16..32 of a 4-bit block, as 4 × 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8, minus: __m256) -> [__m256; 4] {
        let q = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        [
            _mm256_sub_ps(u8x8(lo), minus),
            _mm256_sub_ps(u8x8(_mm_srli_si128(lo, 8)), minus),
            _mm256_sub_ps(u8x8(hi), minus),
            _mm256_sub_ps(u8x8(_mm_srli_si128(hi, 8)), minus),
        ]
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot(
        format: QFormat,
        row: &[u8],
        xs: &[&[f32]],
        block_sums: &[Vec<f32>],
        y: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); MAX_BATCH];
        let mut extra = [0f32; MAX_BATCH];
        match format {
            QFormat::F32 => {
                let w = row.as_ptr() as *const f32;
                let n = row.len() / 4;
                for k in (0..n / 32).map(|b| b * 32) {
                    let ws = [
                        _mm256_loadu_ps(w.add(k)),
                        _mm256_loadu_ps(w.add(k + 8)),
                        _mm256_loadu_ps(w.add(k + 16)),
                        _mm256_loadu_ps(w.add(k + 24)),
                    ];
                    accumulate(ws, 1.0, xs, k, &mut acc);
                }
                for (b, x) in xs.iter().enumerate() {
                    for k in (n / 32 * 32)..n {
                        extra[b] += *w.add(k) * x[k];
                    }
                }
            }
            QFormat::Q8_0 => {
                for (k, blk) in row.chunks_exact(34).enumerate() {
                    let p = blk.as_ptr().add(2);
                    let a = _mm_loadu_si128(p as *const __m128i);
                    let c = _mm_loadu_si128(p.add(16) as *const __m128i);
                    let ws = [
                        i8x8(a),
                        i8x8(_mm_srli_si128(a, 8)),
                        i8x8(c),
                        i8x8(_mm_srli_si128(c, 8)),
                    ];
                    accumulate(ws, f16_at(blk, 0), xs, k * 32, &mut acc);
                }
            }
            QFormat::Q4_0 => {
                let eight = _mm256_set1_ps(8.0);
                for (k, blk) in row.chunks_exact(18).enumerate() {
                    accumulate(
                        nibbles(blk.as_ptr().add(2), eight),
                        f16_at(blk, 0),
                        xs,
                        k * 32,
                        &mut acc,
                    );
                }
            }
            QFormat::Q4_1 => {
                let zero = _mm256_setzero_ps();
                for (k, blk) in row.chunks_exact(20).enumerate() {
                    accumulate(
                        nibbles(blk.as_ptr().add(4), zero),
                        f16_at(blk, 0),
                        xs,
                        k * 32,
                        &mut acc,
                    );
                    let m = f16_at(blk, 2);
                    for (b, sums) in block_sums.iter().enumerate().take(xs.len()) {
                        extra[b] += m * sums[k];
                    }
                }
            }
        }
        for b in 0..xs.len() {
            y[b] = hsum(acc[b]) + extra[b];
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
        let (rows, cols) = (37, 96);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::F32,
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
            let xs: Vec<Vec<f32>> = (0..3).map(|i| random(cols, 100 + i)).collect();
            let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
            let mut ys = vec![0f32; rows * 3];
            m.matvecs(&refs, &mut ys);
            let mut portable = vec![0f32; 3];
            let block_sums: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| x.chunks_exact(32).map(|c| c.iter().sum()).collect())
                .collect();
            for r in 0..rows {
                portable_row_dot(
                    m.format,
                    &bytes[r * m.row_bytes()..(r + 1) * m.row_bytes()],
                    &refs,
                    &block_sums,
                    &mut portable,
                );
                for b in 0..3 {
                    let want: f32 = (0..cols).map(|k| dense[r * cols + k] * xs[b][k]).sum();
                    assert!(
                        (ys[r * 3 + b] - want).abs() < 1e-4,
                        "{ty:?} row {r}: {} vs {want}",
                        ys[r * 3 + b]
                    );
                    assert!((portable[b] - want).abs() < 1e-4, "{ty:?} portable row {r}");
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
