//! The KV cache: per layer, the keys and values of every position seen so far, plus per batch row which
//! cached positions are real tokens (left/right padding is masked out) and the next RoPE position.

use burn::tensor::Tensor;

/// Keys and values of one layer, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Keys, `[batch, kv_heads, positions, head_dim]` (`None` before the first step).
    pub k: Option<Tensor<4>>,
    /// Values, same shape as the keys.
    pub v: Option<Tensor<4>>,
}

impl LayerCache {
    /// Appends new keys/values along the position axis and returns the full keys and values.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let k = match self.k.take() {
            Some(old) => Tensor::cat(vec![old, k], 2),
            None => k,
        };
        let v = match self.v.take() {
            Some(old) => Tensor::cat(vec![old, v], 2),
            None => v,
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        (k, v)
    }
}

/// The cache of a whole model for a batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// One cache per decoder layer.
    pub layers: Vec<LayerCache>,
    /// `valid[row][pos]`: whether cached position `pos` of `row` is a real token (false for padding).
    pub valid: Vec<Vec<bool>>,
    /// The RoPE position the next real token of each row gets.
    pub next_pos: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `batch` rows.
    pub fn new(n_layers: usize, batch: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); n_layers],
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// Rows (sequences) in the cache.
    pub fn batch(&self) -> usize {
        self.valid.len()
    }

    /// Cached positions (including padding).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every layer's keys and values passed through `f`.
    fn map_layers(&self, f: impl Fn(&Tensor<4>) -> Tensor<4>) -> Vec<LayerCache> {
        self.layers
            .iter()
            .map(|l| LayerCache {
                k: l.k.as_ref().map(&f),
                v: l.v.as_ref().map(&f),
            })
            .collect()
    }

    /// A batch-1 cache repeated `n` times along the batch axis: a shared prefix reused by `n` sequences.
    /// Tensors are shared until written (Burn clones are cheap handles).
    pub fn repeat(&self, n: usize) -> KvCache {
        assert_eq!(self.batch(), 1, "only a batch-1 cache can be repeated");
        KvCache {
            layers: self.map_layers(|t| t.clone().repeat_dim(0, n)),
            valid: vec![self.valid[0].clone(); n],
            next_pos: vec![self.next_pos[0]; n],
        }
    }

    /// Keeps only the given batch rows (e.g. sequences that have not finished).
    pub fn select_rows(&self, rows: &[usize]) -> KvCache {
        let pick = |t: &Tensor<4>| {
            let idx = Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(
                    rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                    [rows.len()],
                ),
                &t.device(),
            );
            t.clone().select(0, idx)
        };
        KvCache {
            layers: self.map_layers(pick),
            valid: rows.iter().map(|&r| self.valid[r].clone()).collect(),
            next_pos: rows.iter().map(|&r| self.next_pos[r]).collect(),
        }
    }

    /// Several sequences from one batch-1 cache, on its device: sequence `r` gets the cached positions
    /// `positions[r]` in that order (e.g. a shared prefix and that sequence's own tokens of a
    /// tree-masked pass), left-padded with masked positions to the longest, and continues at RoPE
    /// position `next_pos[r]`.
    pub fn gather(&self, positions: &[Vec<usize>], next_pos: Vec<usize>) -> KvCache {
        assert_eq!(self.batch(), 1, "only a batch-1 cache can be gathered from");
        assert_eq!(
            positions.len(),
            next_pos.len(),
            "one next position per sequence"
        );
        let longest = positions.iter().map(Vec::len).max().unwrap_or(0);
        let indices: Vec<i64> = positions
            .iter()
            .flat_map(|p| {
                std::iter::repeat_n(0, longest - p.len()).chain(p.iter().map(|&i| i as i64))
            })
            .collect();
        let rows = positions.len();
        let pick = |t: &Tensor<4>| {
            let [_, heads, _, dim] = t.dims();
            let idx = Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(indices.clone(), [indices.len()]),
                &t.device(),
            );
            // [1, heads, rows · longest, dim] → [heads, rows, longest, dim] → [rows, heads, longest, dim]
            t.clone()
                .select(2, idx)
                .reshape([heads, rows, longest, dim])
                .swap_dims(0, 1)
        };
        KvCache {
            layers: self.map_layers(pick),
            valid: positions
                .iter()
                .map(|p| left_padding_mask(p.len(), longest))
                .collect(),
            next_pos,
        }
    }
}

/// Which of `width` positions are real when `len` real ones are left-padded to `width`.
pub fn left_padding_mask(len: usize, width: usize) -> Vec<bool> {
    std::iter::repeat_n(false, width - len)
        .chain(std::iter::repeat_n(true, len))
        .collect()
}
