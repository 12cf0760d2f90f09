//! The reference kernel, in plain Rust: the fallback on machines without AVX2 and what the tests hold
//! the others to.

use super::{Job, QFormat, NF4_BLOCK_BYTES};
use crate::nf4::{nf4_code, NF4_BLOCK};

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The reference kernel (and the fallback on machines without AVX2).
pub(super) fn portable_row_dot(job: &Job<'_>, i: usize, y: &mut [f32]) {
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
            QFormat::Nf4 | QFormat::Int8 => {
                let mut w = vec![0f32; x.len()];
                row_values(job.format, row, &mut w);
                acc = w.iter().zip(x.iter()).map(|(w, x)| w * x).sum();
            }
        }
        y[bi] = acc;
    }
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// One row of a non-GGML format ([`QFormat::Nf4`], [`QFormat::Int8`]) as f32: exactly the values
/// `Nf4Tensor::dequantize` / `Int8Matrix::dequantize` give.
pub(super) fn row_values(format: QFormat, row: &[u8], out: &mut [f32]) {
    match format {
        QFormat::Nf4 => {
            let code = nf4_code();
            for (blk, vals) in row
                .chunks_exact(NF4_BLOCK_BYTES)
                .zip(out.chunks_exact_mut(NF4_BLOCK))
            {
                let scaled = code.map(|c| c * f32_at(blk, 0));
                for (pair, &byte) in vals.chunks_exact_mut(2).zip(&blk[4..]) {
                    pair[0] = scaled[(byte >> 4) as usize];
                    pair[1] = scaled[(byte & 0x0f) as usize];
                }
            }
        }
        QFormat::Int8 => {
            let s = f32_at(row, 0);
            for (o, &q) in out.iter_mut().zip(&row[4..]) {
                *o = (q as i8) as f32 * s;
            }
        }
        QFormat::F32 | QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q8_0 => {
            unreachable!("GGML formats are dequantized by ggml::dequantize")
        }
    }
}
