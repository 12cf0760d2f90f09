//! LoRA dropout for training: masks drawn from counters (so forward, backward and a recomputed layer
//! see the same ones) and the layer a training step runs, with dropout on each adapter's input.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
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

/// An inverted-dropout mask over `[rows, cols]` (row-major) as bits: element `e` is kept (and scaled by
/// `1/(1-p)`) when bit `e % 64` of word `e / 64` is set. Each element is a pure function of
/// `(seed, layer, target, e)`: the 64-bit hash of `e / 4` gives four 16-bit uniforms, so `p` is applied
/// with a resolution of 1/65536.
pub(crate) struct DropMask {
    bits: Vec<u64>,
    len: usize,
    /// `1/(1-p)`.
    pub keep: f32,
}

impl DropMask {
    pub fn new(d: Dropout, layer: usize, target: Target, rows: usize, cols: usize) -> Self {
        let stream =
            splitmix(d.seed ^ splitmix(((layer as u64) << 8) | target_index(target) as u64));
        let threshold = (d.p * 65536.0).round() as u64;
        let len = rows * cols;
        let mut bits = vec![0u64; len.div_ceil(64)];
        bits.par_chunks_mut(256).enumerate().for_each(|(c, words)| {
            for (i, word) in words.iter_mut().enumerate() {
                let first = ((c * 256 + i) * 16) as u64;
                let mut w = 0u64;
                for j in 0..16u64 {
                    let h = splitmix(stream.wrapping_add(first + j));
                    for k in 0..4 {
                        let kept = (h >> (16 * k)) & 0xffff >= threshold;
                        w |= (kept as u64) << (4 * j + k);
                    }
                }
                *word = w;
            }
        });
        // Bits past the end stay unused.
        DropMask {
            bits,
            len,
            keep: (1.0 / (1.0 - d.p)) as f32,
        }
    }

    /// The mask's words, each covering 64 consecutive elements.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// The mask as values (`0` or `1/(1-p)`).
    pub fn values(&self) -> Vec<f32> {
        let mut values = vec![0f32; self.len];
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

/// The inverted-dropout mask of `(layer, target)` as a tensor `[rows, cols]` (see [`DropMask`]).
pub(crate) fn dropout_mask(
    d: Dropout,
    layer: usize,
    target: Target,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Tensor<2> {
    let values = DropMask::new(d, layer, target, rows, cols).values();
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
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
