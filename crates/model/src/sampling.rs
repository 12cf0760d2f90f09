//! Choosing the next token: greedy, or seeded sampling with temperature, top-k and top-p; on the host
//! ([`Sampler::sample`]) or, for logits on a GPU, on their device ([`sample_on_device`]) with the same
//! rule and the same random draws, so only the chosen ids come back.

use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How to pick tokens. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// 0: greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Sample among the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to `p`.
    pub top_p: Option<f32>,
    /// Seed of the sampler's RNG.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 42,
        }
    }
}

/// A token picker with its own RNG state.
#[derive(Debug, Clone)]
pub enum Sampler {
    /// The most likely token.
    Greedy,
    /// A draw from the tempered, truncated distribution.
    Random {
        /// The seeded generator.
        rng: Box<ChaCha8Rng>,
        /// Logits are divided by this.
        temperature: f32,
        /// Keep the `k` most likely tokens.
        top_k: Option<usize>,
        /// Keep the smallest set whose probability reaches `p`.
        top_p: Option<f32>,
    },
}

impl Sampler {
    /// The sampler `config` describes.
    pub fn new(config: &SamplingConfig) -> Self {
        if config.temperature <= 0.0 {
            Sampler::Greedy
        } else {
            Sampler::Random {
                rng: Box::new(ChaCha8Rng::seed_from_u64(config.seed)),
                temperature: config.temperature,
                top_k: config.top_k,
                top_p: config.top_p,
            }
        }
    }

    /// The next uniform draw in `[0, 1)` of a random sampler (the one [`Sampler::sample`] would use for
    /// this token), `None` for greedy.
    pub fn next_uniform(&mut self) -> Option<f64> {
        match self {
            Sampler::Greedy => None,
            Sampler::Random { rng, .. } => Some(rng.random::<f64>()),
        }
    }

    /// Whether this sampler always takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        matches!(self, Sampler::Greedy)
    }

    /// Picks a token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self {
            Sampler::Greedy => argmax(logits) as u32,
            Sampler::Random {
                rng,
                temperature,
                top_k,
                top_p,
            } => {
                let mut idx: Vec<usize> = (0..logits.len()).collect();
                idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                if let Some(k) = *top_k {
                    idx.truncate(k.max(1));
                }
                let max = logits[idx[0]];
                let mut probs: Vec<f64> = idx
                    .iter()
                    .map(|&i| (((logits[i] - max) / *temperature) as f64).exp())
                    .collect();
                let total: f64 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= total);
                if let Some(p) = *top_p {
                    let mut acc = 0.0;
                    let keep = probs
                        .iter()
                        .position(|q| {
                            acc += q;
                            acc >= p as f64
                        })
                        .map_or(probs.len(), |i| i + 1);
                    probs.truncate(keep);
                    idx.truncate(keep);
                }
                let total: f64 = probs.iter().sum();
                let mut r = rng.random::<f64>() * total;
                for (p, &i) in probs.iter().zip(&idx) {
                    r -= p;
                    if r <= 0.0 {
                        return i as u32;
                    }
                }
                idx[idx.len() - 1] as u32
            }
        }
    }
}

/// One token per row of `logits` (`[rows, vocab]`) drawn on their device by [`Sampler::sample`]'s rule:
/// logits divided by `config.temperature`, the `top_k` most likely kept, then the smallest prefix of
/// them whose probability reaches `top_p`, then the first token whose cumulative probability reaches
/// `uniform[row] · total`. `uniform[row]` is that row's draw ([`Sampler::next_uniform`]), so a seed
/// gives the CPU's tokens up to f32 rounding (the host sums in f64). Returns the ids, `[rows]`.
pub fn sample_on_device(
    logits: Tensor<2>,
    config: &SamplingConfig,
    uniform: &[f64],
) -> Tensor<1, Int> {
    let [rows, vocab] = logits.dims();
    let device = logits.device();
    let k = config.top_k.unwrap_or(vocab).clamp(1, vocab);
    let (sorted, order) = logits.sort_descending_with_indices(1);
    let (sorted, order) = (sorted.narrow(1, 0, k), order.narrow(1, 0, k));
    let max = sorted.clone().narrow(1, 0, 1);
    let mut probs = ((sorted - max) / f64::from(config.temperature)).exp();
    probs = probs.clone() / probs.sum_dim(1);
    // Kept: the tokens before which less than top_p has accumulated (the first one always).
    let kept = match config.top_p {
        Some(p) => {
            let before = probs.clone().cumsum(1) - probs.clone();
            before.lower_elem(f64::from(p)).float()
        }
        None => Tensor::ones([rows, k], &device),
    };
    probs = probs * kept.clone();
    let cumulative = probs.clone().cumsum(1);
    let u = Tensor::<2>::from_data(
        TensorData::new(uniform.iter().map(|&u| u as f32).collect(), [rows, 1]),
        &device,
    );
    let target = (u * cumulative.clone().narrow(1, k - 1, 1)).repeat_dim(1, k);
    // The first position reaching the target: how many fall short of it, at most the last kept one.
    let short = cumulative.lower(target).int().sum_dim(1);
    let last_kept = kept.int().sum_dim(1) - 1;
    let pick = short.min_pair(last_kept);
    order.gather(1, pick).reshape([rows])
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// `log(softmax(x))` of one row, in f64 for a stable sum.
pub fn log_softmax(values: &[f32]) -> Vec<f32> {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = values.iter().map(|v| ((v - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    values.iter().map(|v| v - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_sampling_is_seeded() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(&SamplingConfig::default()).sample(&logits), 1);
        let cfg = SamplingConfig {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(&cfg);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&cfg);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let top1 = SamplingConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(&top1);
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        let top_p = SamplingConfig {
            temperature: 1.0,
            top_p: Some(0.9),
            ..Default::default()
        };
        let mut s = Sampler::new(&top_p);
        assert!((0..50).all(|_| matches!(s.sample(&logits), 1 | 2)));
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = l.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
