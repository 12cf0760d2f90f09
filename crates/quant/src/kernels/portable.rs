//! The reference kernel, in plain Rust: the fallback on machines without AVX2 and what the tests hold
//! the others to.

use super::{Job, QFormat};

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
        }
        y[bi] = acc;
    }
}
