//! GGML tensor types and their dequantization to f32, following the block layouts of ggml / gguf-py.
//!
//! Each dequantizer writes `q * d + m` (or `q * d`) as separate f32 operations, exactly as gguf-py does, so
//! the results are bit-identical to the reference (no fused multiply-add).

use half::{bf16, f16};

/// The GGML tensor types this crate reads, plus the ones it recognises by name only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// Blocks of 32 4-bit values with one f16 scale (`q · d`, `q - 8` centred).
    Q4_0,
    /// Blocks of 32 4-bit values with an f16 scale and an f16 minimum (`q · d + m`).
    Q4_1,
    /// Blocks of 32 signed 8-bit values with one f16 scale.
    Q8_0,
    /// K-quant super-blocks of 256 4-bit values with 6-bit sub-block scales and minima.
    Q4K,
    /// K-quant super-blocks of 256 6-bit values with 8-bit sub-block scales.
    Q6K,
    /// bfloat16.
    BF16,
    /// Any other GGML type id (recognised so errors can name it, never dequantized).
    Other(u32),
}

impl GgmlType {
    /// The type with GGML's numeric id `id` (types this crate cannot read become `Other`).
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// GGML's numeric id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// The name ggml uses.
    pub fn name(self) -> String {
        let known = match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
            GgmlType::Other(id) => {
                const NAMES: [(u32, &str); 16] = [
                    (6, "Q5_0"),
                    (7, "Q5_1"),
                    (9, "Q8_1"),
                    (10, "Q2_K"),
                    (11, "Q3_K"),
                    (13, "Q5_K"),
                    (15, "Q8_K"),
                    (16, "IQ2_XXS"),
                    (17, "IQ2_XS"),
                    (18, "IQ3_XXS"),
                    (19, "IQ1_S"),
                    (20, "IQ4_NL"),
                    (21, "IQ3_S"),
                    (22, "IQ2_S"),
                    (23, "IQ4_XS"),
                    (29, "IQ1_M"),
                ];
                return NAMES
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(_, n)| n.to_string())
                    .unwrap_or_else(|| format!("type id {id}"));
            }
        };
        known.to_string()
    }

    /// (weights per block, bytes per block), or `None` for types this crate cannot read.
    pub fn block(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Q4K => Some((256, 144)),
            GgmlType::Q6K => Some((256, 210)),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes taken by `n` weights (which must be a whole number of blocks).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (per_block, bytes) = self.block()?;
        if n.is_multiple_of(per_block) {
            (n / per_block).checked_mul(bytes)
        } else {
            None
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `data` (a whole number of blocks of type `ty`) into `out` (one f32 per weight).
/// Panics only on a programming error (wrong lengths); callers check sizes when reading files.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (per_block, bytes) = ty
        .block()
        .expect("dequantize called with an unsupported type");
    assert_eq!(
        data.len() / bytes * per_block,
        out.len(),
        "dequantize: length mismatch"
    );
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    let q = b[2 + j];
                    y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (y, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    let q = b[4 + j];
                    y[j] = (q & 0x0f) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (y, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(144)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (k, chunk) in y.chunks_exact_mut(64).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * k..32 * k + 32];
                    for l in 0..32 {
                        chunk[l] = d1 * (q[l] & 0x0f) as f32 - min1;
                        chunk[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (y, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(210)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        GgmlType::Other(_) => unreachable!("checked by block()"),
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_matches_the_documented_example() {
        // First block of blk.0.attn_q.weight row 0 (fixtures README): d = 0.1268, m = -0.7305, w[0] = 5*d+m.
        let mut block = vec![0x0f, 0x30, 0xd8, 0xb9, 0x45, 0x87, 0x65, 0x40];
        block.resize(20, 0);
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &block, &mut out);
        let d = f16::from_le_bytes([0x0f, 0x30]).to_f32();
        let m = f16::from_le_bytes([0xd8, 0xb9]).to_f32();
        assert_eq!(out[0], 5.0 * d + m);
        assert_eq!(out[16], 4.0 * d + m);
        assert!((out[0] + 0.0963).abs() < 1e-3);
    }

    #[test]
    fn unknown_types_are_named() {
        assert_eq!(GgmlType::from_id(13).name(), "Q5_K");
        assert_eq!(GgmlType::from_id(99).name(), "type id 99");
        assert!(GgmlType::from_id(13).block().is_none());
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(65), None);
    }
}
