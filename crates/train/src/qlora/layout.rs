//! How a training batch is laid out for the model. Sequences that share a long prompt prefix (the
//! system prompt and chat scaffolding of every example) are packed into one row: the prefix once, then
//! each sequence's remainder at the positions it would have had, seeing the prefix and itself (a tree
//! mask). Otherwise the rows are right-padded. Both layouts give the same loss and gradients; packing
//! skips recomputing the prefix for every sequence.

use burn::tensor::{Device, Tensor, TensorData};

use super::Sequence;
use supportlm_model::llama::Rope;

/// Pack when the shared prefix is at least this long…
const MIN_SHARED: usize = 16;
/// …and packing saves at least this share of the padded layout's tokens.
const MIN_SAVING: f64 = 0.3;

/// A batch ready for the layers.
pub(super) struct Layout {
    /// Rows and tokens per row.
    pub b: usize,
    pub s: usize,
    /// Token ids, row-major `[b, s]` (0 for padding).
    pub ids: Vec<i64>,
    /// Position of every token (padding: its index).
    pub positions: Vec<Vec<usize>>,
    /// Additive attention mask `[s, s]`, the same for every row.
    pub mask: Vec<f32>,
    /// `(flat index of the predicting token, target id)` for every loss position.
    pub targets: Vec<(i64, i64)>,
}

impl Layout {
    pub fn rows(&self) -> usize {
        self.b * self.s
    }

    /// RoPE tables and the mask as tensors.
    pub fn tensors(&self, rope: &Rope, device: &Device) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let (cos, sin) = rope.tables(&self.positions, device);
        let mask = Tensor::<4>::from_data(
            TensorData::new(self.mask.clone(), [1, 1, self.s, self.s]),
            device,
        );
        (cos, sin, mask)
    }

    /// Right-padded rows with a causal mask.
    pub fn padded(batch: &[Sequence]) -> Self {
        let b = batch.len();
        let s = batch.iter().map(|q| q.ids.len()).max().unwrap_or(0);
        let ids = batch
            .iter()
            .flat_map(|q| (0..s).map(move |t| q.ids.get(t).copied().unwrap_or(0) as i64))
            .collect();
        let mut mask = vec![0f32; s * s];
        for i in 0..s {
            for j in i + 1..s {
                mask[i * s + j] = -1e30;
            }
        }
        let mut targets = Vec::new();
        for (r, q) in batch.iter().enumerate() {
            for t in 1..q.ids.len() {
                if q.loss_mask[t] {
                    targets.push(((r * s + t - 1) as i64, q.ids[t] as i64));
                }
            }
        }
        Layout {
            b,
            s,
            ids,
            positions: vec![(0..s).collect(); b],
            mask,
            targets,
        }
    }

    /// One row: the shared prefix (`p` tokens), then each sequence's tokens after it.
    pub fn packed(batch: &[Sequence], p: usize) -> Self {
        let s = p + batch.iter().map(|q| q.ids.len() - p).sum::<usize>();
        let mut ids: Vec<i64> = batch[0].ids[..p].iter().map(|&t| t as i64).collect();
        let mut positions: Vec<usize> = (0..p).collect();
        let mut mask = vec![-1e30f32; s * s];
        for i in 0..p {
            for j in 0..=i {
                mask[i * s + j] = 0.0;
            }
        }
        let mut targets = Vec::new();
        for q in batch {
            let start = ids.len();
            for (k, &t) in q.ids[p..].iter().enumerate() {
                let i = start + k;
                ids.push(t as i64);
                positions.push(p + k);
                for j in 0..p {
                    mask[i * s + j] = 0.0;
                }
                for j in start..=i {
                    mask[i * s + j] = 0.0;
                }
            }
            // Token t is predicted from token t - 1, in the prefix or in this sequence's part.
            for t in 1..q.ids.len() {
                if q.loss_mask[t] {
                    let from = if t - 1 < p { t - 1 } else { start + t - 1 - p };
                    targets.push((from as i64, q.ids[t] as i64));
                }
            }
        }
        Layout {
            b: 1,
            s,
            ids,
            positions: vec![positions],
            mask,
            targets,
        }
    }

    /// The packed layout when the batch shares a long enough prefix and packing saves enough,
    /// otherwise the padded one.
    pub fn choose(batch: &[Sequence]) -> Self {
        let shortest = batch.iter().map(|q| q.ids.len()).min().unwrap_or(0);
        let first = &batch[0].ids;
        // Leave every sequence at least one token of its own.
        let p = (0..shortest.saturating_sub(1))
            .take_while(|&i| batch.iter().all(|q| q.ids[i] == first[i]))
            .count();
        let padded_tokens = batch.len() * batch.iter().map(|q| q.ids.len()).max().unwrap_or(0);
        let packed_tokens = p + batch.iter().map(|q| q.ids.len() - p).sum::<usize>();
        let saving = 1.0 - packed_tokens as f64 / padded_tokens.max(1) as f64;
        if batch.len() > 1 && p >= MIN_SHARED && saving >= MIN_SAVING {
            Layout::packed(batch, p)
        } else {
            Layout::padded(batch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(ids: Vec<u32>) -> Sequence {
        let n = ids.len();
        Sequence {
            ids,
            loss_mask: (0..n).map(|i| i + 1 == n).collect(),
        }
    }

    #[test]
    fn packs_only_when_a_long_prefix_saves_enough() {
        let prefix: Vec<u32> = (0..20).collect();
        let with = |tail: &[u32]| seq(prefix.iter().chain(tail).copied().collect());
        let packed = Layout::choose(&[with(&[50, 51]), with(&[60, 61, 62])]);
        assert_eq!((packed.b, packed.s), (1, 20 + 2 + 3));
        // The second sequence's last token is predicted from its own previous token, at position 21.
        assert_eq!(packed.targets, vec![(20, 51), (23, 62)]);
        assert_eq!(packed.positions[0][22..], [20, 21, 22]);
        // Its tokens do not see the first sequence's.
        assert!(packed.mask[22 * 25 + 20] < -1e29 && packed.mask[22 * 25 + 19] == 0.0);
        // A short shared prefix, or one sequence: padded rows.
        let short = Layout::choose(&[seq(vec![1, 2, 3]), seq(vec![1, 2, 4, 5])]);
        assert_eq!((short.b, short.s), (2, 4));
        let one = Layout::choose(&[with(&[50, 51])]);
        assert_eq!(one.b, 1);
        assert_eq!(one.s, 22);
        assert_eq!(one.mask[1], -1e30);
    }
}
