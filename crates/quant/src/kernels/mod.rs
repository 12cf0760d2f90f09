//! Matrix × few-vectors kernels on quantized rows, for token-by-token decoding.
//!
//! Decoding one token reads every weight once, so its speed is set by how many bytes are read: these
//! kernels multiply straight from the GGUF blocks (Q4_0, Q4_1, Q8_0; other types are widened to f32 rows at
//! load) without materialising f32 weights. Activations stay f32: per block,
//! `Σ (d·q + m)·x = d·Σ q·x + m·Σ x` for one vector (the batched kernels dequantize each block once into
//! registers and reuse it for every vector instead), so the only rounding differences from a
//! dequantize-then-matmul are in summation order. AVX2+FMA (and AVX-512 for batch 1) code paths are chosen at run time, with a portable
//! fallback; rows are split across threads with rayon.

use rayon::prelude::*;

use crate::cpu::Simd;
use crate::ggml::{dequantize, GgmlType};
use crate::nf4::NF4_BLOCK;
use crate::{BaseQuant, Int8Matrix, Nf4Tensor};

#[cfg(target_arch = "x86_64")]
mod avx2;
/// The batch-1 kernel with 16-lane AVX-512 vectors: half the instructions per block of the AVX2 one.
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

use portable::portable_row_dot;

/// How far ahead of the block being multiplied its weights are prefetched (bytes).
const PREFETCH: usize = 2048;

/// Most vectors multiplied per weight read (a decode batch).
pub const MAX_BATCH: usize = 8;

/// Dot product in eight independent lanes (vectorizes, also inside AVX2 code that inlines it; a fixed
/// summation order, so deterministic). For the f32 rows of attention and the training step's row loops.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// How each row is stored.
    pub format: QFormat,
    data: Vec<u8>,
}

/// Row formats the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// Plain f32 rows.
    F32,
    /// GGML Q4_0 blocks.
    Q4_0,
    /// GGML Q4_1 blocks.
    Q4_1,
    /// GGML Q8_0 blocks.
    Q8_0,
    /// NF4 ([`crate::Nf4Tensor`]) per 64-value block: the block's absmax as an f32 (double quantization
    /// already resolved), then 32 bytes of codes, high nibble first. Rows are whole blocks.
    Nf4,
    /// Per-row int8 ([`crate::Int8Matrix`]): the row's scale (`absmax / 127`) as an f32, then one byte
    /// per column.
    Int8,
}

/// Bytes of one [`QFormat::Nf4`] block: the f32 absmax and 64 four-bit codes.
const NF4_BLOCK_BYTES: usize = 4 + NF4_BLOCK / 2;

impl QFormat {
    /// The GGML type with the same blocks, for the GGML formats.
    fn ggml(self) -> Option<GgmlType> {
        match self {
            QFormat::F32 => Some(GgmlType::F32),
            QFormat::Q4_0 => Some(GgmlType::Q4_0),
            QFormat::Q4_1 => Some(GgmlType::Q4_1),
            QFormat::Q8_0 => Some(GgmlType::Q8_0),
            QFormat::Nf4 | QFormat::Int8 => None,
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

    /// `values` (row-major `[rows, cols]`) quantized as a frozen base's weights are for (Q)LoRA: the
    /// same codes and scales as [`Nf4Tensor::quantize`] (double-quantized) and [`Int8Matrix::quantize`],
    /// so these products see exactly the weights the training step dequantizes. NF4 rows that are not
    /// whole 64-value blocks (blocks then straddle rows) are kept as the f32 values of that round trip.
    pub fn quantize(values: &[f32], rows: usize, cols: usize, quant: BaseQuant) -> Self {
        assert_eq!(values.len(), rows * cols);
        match quant {
            BaseQuant::None => Self::from_f32(values, rows, cols),
            BaseQuant::Int8 => {
                let q = Int8Matrix::quantize(values, rows, cols);
                let mut data = Vec::with_capacity(rows * (4 + cols));
                for (codes, &m) in q.codes.chunks_exact(cols.max(1)).zip(&q.absmax) {
                    data.extend_from_slice(&(m / 127.0).to_le_bytes());
                    data.extend(codes.iter().map(|&c| c as u8));
                }
                QMatrix {
                    rows,
                    cols,
                    format: QFormat::Int8,
                    data,
                }
            }
            BaseQuant::Nf4 => {
                let q = Nf4Tensor::quantize(values, &[rows, cols], true);
                if !cols.is_multiple_of(NF4_BLOCK) {
                    return Self::from_f32(&q.dequantize(), rows, cols);
                }
                let absmax = q.absmax.values();
                let mut data = Vec::with_capacity(absmax.len() * NF4_BLOCK_BYTES);
                for (codes, m) in q.packed.chunks_exact(NF4_BLOCK / 2).zip(absmax) {
                    data.extend_from_slice(&m.to_le_bytes());
                    data.extend_from_slice(codes);
                }
                QMatrix {
                    rows,
                    cols,
                    format: QFormat::Nf4,
                    data,
                }
            }
        }
    }

    /// Every value as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_f32(r, row);
        }
        out
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
        let row = &self.data[r * rb..(r + 1) * rb];
        match self.format.ggml() {
            Some(ty) => dequantize(ty, row, out),
            None => portable::row_values(self.format, row, out),
        }
    }

    /// `ys[b][r] = Σ_k W[r, k] · xs[b][k]` for up to [`MAX_BATCH`] vectors; `ys` is `[rows][batch]`.
    pub fn matvecs(&self, xs: &[&[f32]], ys: &mut [f32]) {
        self.matvecs_with(crate::cpu::simd(), xs, ys)
    }

    /// [`QMatrix::matvecs`] with a chosen instruction set (never above what the CPU has).
    fn matvecs_with(&self, simd: Simd, xs: &[&[f32]], ys: &mut [f32]) {
        let simd = simd.min(crate::cpu::simd());
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
                    // SAFETY (all): the instruction sets were detected at run time (`cpu::simd`).
                    Simd::Avx2 | Simd::Avx512 if self.format == QFormat::Nf4 => {
                        return unsafe { avx2::rows_dot_nf4(&job, out) }
                    }
                    Simd::Avx2 | Simd::Avx512 if self.format == QFormat::Int8 => {
                        return unsafe { avx2::rows_dot_int8(&job, out) }
                    }
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
    /// `[batch][block]` sums of x (4-bit formats only; the batch-1 and portable kernels add the
    /// blocks' offsets through them, the batched AVX2 one dequantizes instead).
    block_sums: &'a [f32],
    n_blocks: usize,
}

impl Job<'_> {
    fn row(&self, i: usize) -> &[u8] {
        &self.rows[i * self.row_bytes..(i + 1) * self.row_bytes]
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
            // Batch 1 has its own kernel; 2-4 keep two accumulators per vector, 5-8 one.
            for batch in [1, 2, 3, 5, MAX_BATCH] {
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
    fn base_formats_hold_the_trainers_values_and_multiply_like_them() {
        // (quant, rows, cols, format kept): NF4 rows of whole blocks, NF4 blocks straddling rows (kept
        // as the f32 round trip), int8 with a tail past the 8-wide loop.
        for (quant, rows, cols, format) in [
            (BaseQuant::Nf4, 7, 128, QFormat::Nf4),
            (BaseQuant::Nf4, 5, 96, QFormat::F32),
            (BaseQuant::Int8, 7, 100, QFormat::Int8),
            (BaseQuant::None, 3, 40, QFormat::F32),
        ] {
            let values = random(rows * cols, 21);
            let m = QMatrix::quantize(&values, rows, cols, quant);
            assert_eq!(m.format, format, "{quant}");
            let dense = match quant {
                BaseQuant::Nf4 => Nf4Tensor::quantize(&values, &[rows, cols], true).dequantize(),
                BaseQuant::Int8 => Int8Matrix::quantize(&values, rows, cols).dequantize(),
                BaseQuant::None => values.clone(),
            };
            assert_eq!(
                m.dequantize(),
                dense,
                "{quant}: not the dequantizer's values"
            );
            for batch in [1, 3, MAX_BATCH] {
                let xs: Vec<Vec<f32>> = (0..batch).map(|i| random(cols, 50 + i as u32)).collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
                    let mut ys = vec![0f32; rows * batch];
                    m.matvecs_with(simd, &refs, &mut ys);
                    for r in 0..rows {
                        for b in 0..batch {
                            let want: f32 = (0..cols).map(|k| dense[r * cols + k] * xs[b][k]).sum();
                            let got = ys[r * batch + b];
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{quant} {simd:?} batch {batch} row {r}: {got} vs {want}"
                            );
                        }
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
