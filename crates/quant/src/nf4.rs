//! NF4 with optional double quantization, in bitsandbytes' exact layout (QLoRA's 4-bit base).
//!
//! Values are flattened row-major and cut into blocks of [`NF4_BLOCK`]. Each value is divided by its
//! block's absmax (multiplied by the f32 reciprocal, as bitsandbytes does), clamped to [-1, 1] and
//! replaced by the index of the nearest NF4 code value (first index on ties). Two indices per byte:
//! element `2i` in the high nibble of byte `i`, element `2i + 1` in the low nibble.
//!
//! Double quantization stores the block absmax values themselves in 8 bits: their mean is subtracted
//! (`offset`), and the centred values are quantized in blocks of [`STATE2_BLOCK`] with the signed dynamic
//! code and one f32 absmax per 256 blocks: `absmax[b] = code2[c[b]] * absmax2[b / 256] + offset`.

use rayon::prelude::*;

use crate::nf4_tables::{DYNAMIC_SIGNED_BITS, NF4_BITS};

/// Weights per NF4 block.
pub const NF4_BLOCK: usize = 64;
/// Block absmax values per second-level block (double quantization).
pub const STATE2_BLOCK: usize = 256;

/// The 16 NF4 code values.
pub fn nf4_code() -> [f32; 16] {
    NF4_BITS.map(f32::from_bits)
}

/// bitsandbytes' signed 8-bit dynamic code.
pub fn dynamic_code() -> [f32; 256] {
    DYNAMIC_SIGNED_BITS.map(f32::from_bits)
}

/// The per-block absmax values, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Single(Vec<f32>),
    /// 8-bit codes into [`dynamic_code`], one f32 scale per [`STATE2_BLOCK`] codes, plus the mean.
    Double {
        /// One 8-bit code per block absmax (index into the signed dynamic code).
        codes: Vec<u8>,
        /// One f32 absmax per [`STATE2_BLOCK`] block absmax values.
        state2_absmax: Vec<f32>,
        /// The mean subtracted from the block absmax values before quantizing them.
        offset: f32,
    },
}

impl Absmax {
    /// The block absmax values as the dequantizer uses them.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Single(v) => v.clone(),
            Absmax::Double {
                codes,
                state2_absmax,
                offset,
            } => {
                let code = dynamic_code();
                codes
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| code[c as usize] * state2_absmax[b / STATE2_BLOCK] + offset)
                    .collect()
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Absmax::Single(v) => 4 * v.len(),
            Absmax::Double {
                codes,
                state2_absmax,
                ..
            } => codes.len() + 4 * state2_absmax.len() + 4,
        }
    }
}

/// A tensor in NF4: packed 4-bit indices and block absmax values.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// The tensor's shape (PyTorch order).
    pub shape: Vec<usize>,
    /// Two 4-bit codes per byte, high nibble first.
    pub packed: Vec<u8>,
    /// Each block's absmax, plain or double-quantized.
    pub absmax: Absmax,
}

/// The index of the code value nearest to `x` (first on ties). An all-zero block (absmax 0, so
/// `0 · (1/0)` is NaN) maps to the code value nearest zero, as bitsandbytes does.
fn nearest(code: &[f32], x: f32) -> u8 {
    let x = if x.is_nan() { 0.0 } else { x };
    let mut best = 0usize;
    let mut best_d = (x - code[0]).abs();
    for (i, &c) in code.iter().enumerate().skip(1) {
        let d = (x - c).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

/// Absmax of each block of `block` values and every value's nearest-code index.
fn quantize_blocks(values: &[f32], block: usize, code: &[f32]) -> (Vec<f32>, Vec<u8>) {
    let absmax: Vec<f32> = values
        .par_chunks(block)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let mut idx = vec![0u8; values.len()];
    idx.par_chunks_mut(block)
        .zip(values.par_chunks(block))
        .zip(absmax.par_iter())
        .for_each(|((out, vals), &m)| {
            let inv = 1.0 / m;
            for (o, &v) in out.iter_mut().zip(vals) {
                o.clone_from(&nearest(code, (v * inv).clamp(-1.0, 1.0)));
            }
        });
    (absmax, idx)
}

impl Nf4Tensor {
    /// Quantizes `values` (row-major, `shape`); `double` also quantizes the absmax values.
    pub fn quantize(values: &[f32], shape: &[usize], double: bool) -> Self {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        let (absmax, idx) = quantize_blocks(values, NF4_BLOCK, &nf4_code());
        let packed = idx
            .chunks(2)
            .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
            .collect();
        let absmax = if double {
            let offset = mean_f32(&absmax);
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (state2_absmax, codes) = quantize_blocks(&centred, STATE2_BLOCK, &dynamic_code());
            Absmax::Double {
                codes,
                state2_absmax,
                offset,
            }
        } else {
            Absmax::Single(absmax)
        };
        Nf4Tensor {
            shape: shape.to_vec(),
            packed,
            absmax,
        }
    }

    /// Values in the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the dequantized values into `out` (length [`Nf4Tensor::len`]).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.len(),
            "NF4 output buffer has the wrong length"
        );
        let code = nf4_code();
        let absmax = self.absmax.values();
        // A few hundred blocks per parallel task (one block per task costs more in scheduling than the
        // work); each byte holds two values, high nibble first, and blocks start at even indices.
        const BLOCKS_PER_TASK: usize = 256;
        out.par_chunks_mut(NF4_BLOCK * BLOCKS_PER_TASK)
            .zip(self.packed.par_chunks(NF4_BLOCK / 2 * BLOCKS_PER_TASK))
            .zip(absmax.par_chunks(BLOCKS_PER_TASK))
            .for_each(|((out, packed), absmax)| {
                for ((block, bytes), &m) in out
                    .chunks_mut(NF4_BLOCK)
                    .zip(packed.chunks(NF4_BLOCK / 2))
                    .zip(absmax)
                {
                    let scaled = code.map(|c| c * m);
                    #[cfg(target_arch = "x86_64")]
                    if block.len() == NF4_BLOCK && crate::cpu::simd() >= crate::cpu::Simd::Avx2 {
                        // SAFETY: the CPU has AVX2; the block is full (64 values, 32 bytes).
                        unsafe { nf4_block(&scaled, bytes, block) };
                        continue;
                    }
                    for (pair, &byte) in block.chunks_mut(2).zip(bytes) {
                        pair[0] = scaled[(byte >> 4) as usize];
                        if let Some(o) = pair.get_mut(1) {
                            *o = scaled[(byte & 0x0f) as usize];
                        }
                    }
                }
            });
    }

    /// The values as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.dequantize_into(&mut out);
        out
    }

    /// Bytes held: packed indices plus absmax storage.
    pub fn resident_bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }
}

/// The f32 mean as torch computes it for these sizes (sum in higher precision, rounded once).
fn mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64) as f32
}

/// One full block looked up eight values at a time: the nibbles are spread to 32-bit lanes in element
/// order and each picks its scaled code with two in-register table lookups (codes 0–7 and 8–15). The
/// same values as the scalar loop (a lookup, no arithmetic).
///
/// Safety: the CPU has AVX2; `bytes` holds 32 bytes, `out` 64 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn nf4_block(scaled: &[f32; 16], bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_high_nibble_first_and_round_trips_code_values() {
        let code = nf4_code();
        // A block whose values are exactly the code values (absmax 1).
        let values: Vec<f32> = (0..64).map(|i| code[i % 16]).collect();
        let q = Nf4Tensor::quantize(&values, &[64], false);
        assert_eq!(q.packed[0], 0x01);
        assert_eq!(q.packed[1], 0x23);
        assert_eq!(q.dequantize(), values);
    }

    #[test]
    fn partial_last_block_is_handled() {
        let values: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 7.0).collect();
        let q = Nf4Tensor::quantize(&values, &[100], true);
        assert_eq!(q.packed.len(), 50);
        let back = q.dequantize();
        // The widest gap between NF4 codes is 0.304 (between -1 and -0.696): half of it times absmax.
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= 0.153 * 7.15, "{a} vs {b}");
        }
    }
}
