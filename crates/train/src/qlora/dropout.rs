//! LoRA dropout for training: masks drawn from counters (so forward, backward and a recomputed layer
//! see the same ones) and the layer a training step runs, with dropout on each adapter's input.

use std::sync::Arc;

use burn::tensor::{DType, Device, Int, Tensor};
use rayon::prelude::*;
use supportlm_model::llama::{DecoderLayer, LoraDelta, LowRank};
use supportlm_model::lora::Target;

use super::target_index;

/// Dropout on the LoRA inputs for one step: each `(layer, target)` mask is drawn from `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    /// Probability of dropping an input element.
    pub p: f64,
    /// The step's seed (masks of each layer and projection derive from it).
    pub seed: u64,
}

/// SplitMix64: a counter-based generator, so every mask element is a pure function of
/// `(seed, layer, target, index)` and the same masks come back when a layer is recomputed.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Wellons' two-round 32-bit integer hash (hash-prospector's `0x21f0aaad` / `0x735a2d97` variant).
/// Both multipliers are below 2^31, so the device version ([`DeviceHash`]) stays exact on backends
/// whose integers are 64 bits wide as well as on 32-bit ones.
pub(crate) fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(MIX_MUL[0]);
    x ^= x >> 15;
    x = x.wrapping_mul(MIX_MUL[1]);
    x ^ (x >> 15)
}

const MIX_MUL: [u32; 2] = [0x21f0_aaad, 0x735a_2d97];

/// The uniforms of one `(layer, target)` mask: element `e`'s 16-bit uniform is half `e % 2` (low half
/// first) of `mix32(mix32((e / 2) ^ k0) ^ k1)`, where `k0`, `k1` are the halves of the mask's 64-bit
/// stream. Each uniform is a pure function of `(seed, layer, target, e)`, computed the same way on the
/// host ([`DropMask`]) and on a device ([`dropout_mask`]), so both draw the same masks.
#[derive(Debug, Clone, Copy)]
struct MaskStream {
    keys: [u32; 2],
    /// Elements with a uniform below this are dropped: `p` at a resolution of 1/65536.
    threshold: u32,
    /// `1/(1-p)`: the scale of a kept element.
    keep: f32,
}

impl MaskStream {
    fn new(d: Dropout, layer: usize, target: Target) -> Self {
        let stream =
            splitmix(d.seed ^ splitmix(((layer as u64) << 8) | target_index(target) as u64));
        MaskStream {
            keys: [stream as u32, (stream >> 32) as u32],
            threshold: (d.p * 65536.0).round() as u32,
            keep: (1.0 / (1.0 - d.p)) as f32,
        }
    }

    /// The two uniforms of elements `2w` (low half) and `2w + 1` (high half).
    fn pair(&self, w: u32) -> u32 {
        mix32(mix32(w ^ self.keys[0]) ^ self.keys[1])
    }
}

/// An inverted-dropout mask over `[rows, cols]` (row-major) as bits: element `e` is kept (and scaled by
/// `1/(1-p)`) when bit `e % 64` of word `e / 64` is set. The bits are [`MaskStream`]'s.
pub(crate) struct DropMask {
    bits: Vec<u64>,
    /// `1/(1-p)`.
    pub keep: f32,
}

impl DropMask {
    pub fn new(d: Dropout, layer: usize, target: Target, rows: usize, cols: usize) -> Self {
        let stream = MaskStream::new(d, layer, target);
        let len = rows * cols;
        let mut bits = vec![0u64; len.div_ceil(64)];
        bits.par_chunks_mut(256).enumerate().for_each(|(c, words)| {
            for (i, word) in words.iter_mut().enumerate() {
                // Word `c·256 + i` covers elements 64·(c·256 + i) .., 32 hashes of two each.
                let first = ((c * 256 + i) * 32) as u32;
                let mut w = 0u64;
                for j in 0..32u32 {
                    let h = stream.pair(first.wrapping_add(j));
                    let lo = (h & 0xffff) >= stream.threshold;
                    let hi = (h >> 16) >= stream.threshold;
                    w |= (lo as u64) << (2 * j) | (hi as u64) << (2 * j + 1);
                }
                *word = w;
            }
        });
        // Bits past the end stay unused.
        DropMask {
            bits,
            keep: stream.keep,
        }
    }

    /// The mask's words, each covering 64 consecutive elements.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// The mask's first `len` elements as values (`0` or `1/(1-p)`).
    #[cfg(test)]
    pub fn values(&self, len: usize) -> Vec<f32> {
        let mut values = vec![0f32; len];
        values
            .par_chunks_mut(64)
            .zip(&self.bits)
            .for_each(|(chunk, &w)| {
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v = if w >> j & 1 == 1 { self.keep } else { 0.0 };
                }
            });
        values
    }
}

/// 32-bit unsigned arithmetic in a backend's integer tensors, whatever their width: a 64-bit backend
/// keeps values in `0..2^32` (masking after products), a 32-bit one wraps as two's complement and
/// reads the same bits.
struct DeviceHash {
    wide: bool,
}

impl DeviceHash {
    /// `v` as the backend's integer scalar with the same low 32 bits.
    fn scalar(&self, v: u32) -> i64 {
        if self.wide {
            i64::from(v)
        } else {
            i64::from(v as i32)
        }
    }

    /// `x >> k`, unsigned (a 32-bit backend shifts the sign in: masked away).
    fn shr(&self, x: Tensor<1, Int>, k: u32) -> Tensor<1, Int> {
        x.bitwise_right_shift_scalar(i64::from(k))
            .bitwise_and_scalar((1i64 << (32 - k)) - 1)
    }

    /// `x · c mod 2^32` for `c < 2^31`.
    fn mul(&self, x: Tensor<1, Int>, c: u32) -> Tensor<1, Int> {
        let x = x.mul_scalar(i64::from(c));
        if self.wide {
            x.bitwise_and_scalar(0xffff_ffffi64)
        } else {
            x
        }
    }

    fn mix32(&self, x: Tensor<1, Int>) -> Tensor<1, Int> {
        let x = x.clone().bitwise_xor(self.shr(x, 16));
        let x = self.mul(x, MIX_MUL[0]);
        let x = x.clone().bitwise_xor(self.shr(x, 15));
        let x = self.mul(x, MIX_MUL[1]);
        x.clone().bitwise_xor(self.shr(x, 15))
    }
}

/// The inverted-dropout mask of `(layer, target)` as a tensor `[rows, cols]` (`0` or `1/(1-p)`),
/// drawn on `device` by integer tensor ops: the same values as [`DropMask`]'s on the host.
pub(crate) fn dropout_mask(
    d: Dropout,
    layer: usize,
    target: Target,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Tensor<2> {
    let stream = MaskStream::new(d, layer, target);
    let n = rows * cols;
    let pairs = n.div_ceil(2);
    let counters = Tensor::<1, Int>::arange(0..pairs as i64, device);
    let ops = DeviceHash {
        wide: counters.dtype() == DType::I64,
    };
    let h = counters.bitwise_xor_scalar(ops.scalar(stream.keys[0]));
    let h = ops.mix32(h).bitwise_xor_scalar(ops.scalar(stream.keys[1]));
    let h = ops.mix32(h);
    let low = h.clone().bitwise_and_scalar(0xffff);
    let high = ops.shr(h, 16);
    let uniforms = Tensor::stack::<2>(vec![low, high], 1)
        .reshape([2 * pairs])
        .narrow(0, 0, n);
    uniforms
        .greater_equal_elem(i64::from(stream.threshold))
        .float()
        .mul_scalar(stream.keep)
        .reshape([rows, cols])
}

/// A LoRA update with inverted dropout on its input, `s · B(A(mask ⊙ x))`: what training attaches to
/// the decoder's [`LowRank`] slot (inference attaches a plain [`LoraDelta`]).
#[derive(Debug, Clone)]
pub(crate) struct DroppedLora {
    pub delta: LoraDelta,
    /// `0` or `1/(1-p)` per input element, `[rows, in]`; `None` without dropout.
    pub mask: Option<Tensor<2>>,
}

impl DroppedLora {
    /// `mask ⊙ x` (or `x` without dropout).
    pub fn dropped(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.mask {
            Some(mask) => x * mask.clone(),
            None => x,
        }
    }
}

impl LowRank for DroppedLora {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        LoraDelta::apply(
            self.dropped(x),
            &self.delta.a,
            &self.delta.b,
            self.delta.scale,
        )
    }
}

/// One decoder layer as a training step runs it: the inference layer (its linears carrying the
/// adapter's [`DroppedLora`] updates) and those updates again, for the hand-written backward.
pub(crate) struct TrainLayer {
    pub base: DecoderLayer,
    /// Indexed like [`Target::ALL`].
    lora: [Option<Arc<DroppedLora>>; 7],
}

impl TrainLayer {
    /// Attaches `lora` (indexed like [`Target::ALL`]) to `base`.
    pub fn new(mut base: DecoderLayer, lora: [Option<Arc<DroppedLora>>; 7]) -> Self {
        for (t, l) in Target::ALL.into_iter().zip(&lora) {
            base.linear_mut(t).lora = l.clone().map(|l| l as Arc<dyn LowRank>);
        }
        TrainLayer { base, lora }
    }

    /// The update on projection `t`, if adapted.
    pub fn lora(&self, t: Target) -> Option<&DroppedLora> {
        self.lora[target_index(t)].as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix32_is_the_published_hash() {
        // hash-prospector's two-round variant, by hand: the first two outputs.
        let reference = |mut x: u32| {
            x ^= x >> 16;
            x = x.wrapping_mul(0x21f0aaad);
            x ^= x >> 15;
            x = x.wrapping_mul(0x735a2d97);
            x ^ (x >> 15)
        };
        for x in [0u32, 1, 2, 0xdead_beef, u32::MAX] {
            assert_eq!(mix32(x), reference(x));
        }
        assert_eq!(mix32(0), 0);
        assert_ne!(mix32(1), mix32(2));
    }

    #[test]
    fn device_masks_equal_the_host_masks() {
        let device = Device::default();
        for (p, rows, cols) in [(0.1, 3, 37), (0.05, 8, 64), (0.5, 1, 1), (0.3, 5, 129)] {
            for t in [Target::QProj, Target::DownProj] {
                let d = Dropout { p, seed: 0x5eed };
                let host = DropMask::new(d, 3, t, rows, cols).values(rows * cols);
                let dev =
                    supportlm_model::llama::to_vec(dropout_mask(d, 3, t, rows, cols, &device))
                        .unwrap();
                assert_eq!(host, dev, "p {p}, {rows}x{cols}, {t}");
            }
        }
    }

    #[test]
    fn masks_drop_about_p_and_differ_across_sites_and_seeds() {
        let d = Dropout { p: 0.1, seed: 7 };
        let kept = |m: &DropMask| m.words().iter().map(|w| w.count_ones()).sum::<u32>();
        let a = DropMask::new(d, 0, Target::QProj, 64, 1024);
        let dropped = 1.0 - kept(&a) as f64 / (64.0 * 1024.0);
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        let b = DropMask::new(d, 0, Target::KProj, 64, 1024);
        let c = DropMask::new(Dropout { seed: 8, ..d }, 0, Target::QProj, 64, 1024);
        let same = |x: &DropMask, y: &DropMask| {
            x.words()
                .iter()
                .zip(y.words())
                .map(|(a, b)| (!(a ^ b)).count_ones())
                .sum::<u32>()
        };
        // Independent masks agree on about 0.9² + 0.1² = 82% of elements.
        for other in [&b, &c] {
            let agree = same(&a, other) as f64 / (64.0 * 1024.0);
            assert!((agree - 0.82).abs() < 0.01, "agree {agree}");
        }
    }
}
