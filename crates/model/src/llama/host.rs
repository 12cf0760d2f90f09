//! [`Llama`]'s forward on the CPU backend, on host buffers: prefill, scoring trees, and every other
//! pass of several tokens. The same maths and layout as the tensor forward of [`crate::llama`] (the
//! tests hold the two to each other), written as matrix products through `supportlm_quant::gemm` plus
//! fused row loops.
//!
//! Why: through tensor ops the prompt pass ran at half the matmul rate on AVX2 machines (README:
//! inference speed): its seven products per layer reached ~70% of it, and every elementwise op (RMSNorm, RoPE,
//! the head transposes, SiLU, the residual adds) allocated and filled a fresh tensor. Here the
//! projections write straight into column blocks of one activation (`[q | k | v]`, `[gate | up]`), the
//! residual adds are the output products' accumulation (`x += a·b`), and RMSNorm, RoPE and SwiGLU are
//! single passes over rows.
//!
//! Weights: f32 ones are read in place from the backend's storage ([`HostF32`]); int8 and NF4 ones are
//! dequantized into one buffer reused from projection to projection. An attached adapter's update runs
//! in tensor ops on the projection's input (a thin product) and is added to its columns. Keys and
//! values already cached are read in place too; the cache gets each layer's keys and values as one new
//! tensor, as the tensor path's concatenation leaves them.

use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use supportlm_quant::gemm::{mm, Op};
use supportlm_quant::pointwise::softmax_row;

use super::{to_vec, DecoderLayer, Linear, Llama, MASK_BELOW};
use crate::cache::{KvCache, LayerCache};
use crate::error::Result;
use crate::rows::{rms, rope, swiglu};
use crate::weight::HostF32;

/// Shapes of one pass and its per-row tables.
struct Geometry<'a> {
    b: usize,
    s: usize,
    /// Cached positions before this pass plus its `s`.
    total: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    eps: f32,
    /// RoPE position of each of the `b·s` rows.
    positions: Vec<usize>,
    /// RoPE tables `[max_positions, d]`.
    cos: &'a [f32],
    sin: &'a [f32],
    /// Additive mask `[b, s, total]` (0 visible, -1e30 hidden).
    mask: &'a [f32],
    device: &'a Device,
}

impl Geometry<'_> {
    fn rows(&self) -> usize {
        self.b * self.s
    }

    fn q_width(&self) -> usize {
        self.heads * self.d
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.d
    }

    /// Width of a row of `[q | k | v]`.
    fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

/// Runs `b × s` tokens through `llama` with explicit RoPE positions and an additive mask
/// `[b, 1, s, cached + s]`, appending their keys and values to `cache`: `Llama::run`'s contract, on
/// host buffers. Returns the final hidden states (after the last norm), `[b, s, hidden]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    llama: &Llama,
    tokens: &[u32],
    b: usize,
    s: usize,
    positions: &[Vec<usize>],
    mask: &[f32],
    cache: &mut KvCache,
    mut collect: Option<&mut Vec<Tensor<3>>>,
) -> Result<Tensor<3>> {
    let c = &llama.config;
    let past = cache
        .layers
        .first()
        .and_then(|l| l.k.as_ref())
        .map_or(0, |k| k.dims()[2]);
    let (cos, sin) = (host(&llama.rope.cos)?, host(&llama.rope.sin)?);
    let g = Geometry {
        b,
        s,
        total: past + s,
        hidden: c.hidden_size,
        heads: c.num_attention_heads,
        kv_heads: c.kv_heads(),
        d: c.head_dim(),
        eps: c.rms_norm_eps as f32,
        positions: positions.iter().flatten().copied().collect(),
        cos: cos.values(),
        sin: sin.values(),
        mask,
        device: &llama.device,
    };
    let device = &llama.device;
    let as_tensor =
        |x: &[f32]| Tensor::<3>::from_data(TensorData::new(x.to_vec(), [b, s, g.hidden]), device);

    let embed = host(&llama.embed_tokens)?;
    let mut x = vec![0f32; g.rows() * g.hidden];
    for (row, &t) in x.chunks_mut(g.hidden).zip(tokens) {
        let t = t as usize;
        row.copy_from_slice(&embed.values()[t * g.hidden..(t + 1) * g.hidden]);
    }
    if let Some(c) = collect.as_deref_mut() {
        c.push(as_tensor(&x));
    }
    let mut weights = Projector {
        scratch: Vec::new(),
        device,
    };
    for (layer, lc) in llama.layers.iter().zip(cache.layers.iter_mut()) {
        forward_layer(layer, &mut x, lc, &g, &mut weights)?;
        if let Some(c) = collect.as_deref_mut() {
            c.push(as_tensor(&x));
        }
    }
    let (normed, _) = rms(&x, host(&llama.norm.weight)?.values(), g.eps);
    Ok(as_tensor(&normed))
}

/// A tensor's values in place on the CPU backend, or a copy where they are not one contiguous block.
fn host<const D: usize>(t: &Tensor<D>) -> Result<Values> {
    Ok(match HostF32::of(t) {
        Some(view) => Values::InPlace(view),
        None => Values::Copied(to_vec(t.clone())?),
    })
}

enum Values {
    InPlace(HostF32),
    Copied(Vec<f32>),
}

impl Values {
    fn values(&self) -> &[f32] {
        match self {
            Values::InPlace(v) => v.values(),
            Values::Copied(v) => v,
        }
    }
}

/// One decoder layer on the residual stream `x` (`[b·s, hidden]`, updated in place), appending the
/// pass's keys and values to `cache`.
fn forward_layer(
    layer: &DecoderLayer,
    x: &mut [f32],
    cache: &mut LayerCache,
    g: &Geometry,
    weights: &mut Projector,
) -> Result<()> {
    let rows = g.rows();
    let attn = &layer.self_attn;
    let (qw, kvw, w) = (g.q_width(), g.kv_width(), g.qkv_width());

    let (n, _) = rms(x, host(&layer.input_layernorm.weight)?.values(), g.eps);
    let mut qkv = vec![0f32; rows * w];
    weights.project(&attn.q_proj, &n, rows, &mut qkv, w, false)?;
    weights.project(&attn.k_proj, &n, rows, &mut qkv[qw..], w, false)?;
    weights.project(&attn.v_proj, &n, rows, &mut qkv[qw + kvw..], w, false)?;
    rope(
        &mut qkv,
        w,
        qw + kvw,
        g.d,
        &g.positions,
        (g.cos, g.sin),
        1.0,
    );
    let (keys, values) = cached_with_new(cache, &qkv, g)?;
    let out = attention(&qkv, &keys, &values, g);
    let dims = [g.b, g.kv_heads, g.total, g.d];
    cache.k = Some(Tensor::from_data(TensorData::new(keys, dims), g.device));
    cache.v = Some(Tensor::from_data(TensorData::new(values, dims), g.device));
    weights.project(&attn.o_proj, &out, rows, x, g.hidden, true)?;

    let mlp = &layer.mlp;
    let (n, _) = rms(
        x,
        host(&layer.post_attention_layernorm.weight)?.values(),
        g.eps,
    );
    let inter = mlp.down_proj.weight.dims()[1];
    let mut gate_up = vec![0f32; rows * 2 * inter];
    weights.project(&mlp.gate_proj, &n, rows, &mut gate_up, 2 * inter, false)?;
    weights.project(
        &mlp.up_proj,
        &n,
        rows,
        &mut gate_up[inter..],
        2 * inter,
        false,
    )?;
    let act = swiglu(&gate_up, inter);
    weights.project(&mlp.down_proj, &act, rows, x, g.hidden, true)?;
    Ok(())
}

/// Runs the linear layers: reads f32 weights in place, dequantizes the others into one buffer reused
/// from projection to projection.
struct Projector<'a> {
    scratch: Vec<f32>,
    /// Where an attached adapter's update runs (tensor ops).
    device: &'a Device,
}

impl Projector<'_> {
    /// `dst[:, ..out] (+)= x Wᵀ + bias (+ LoRA)` for `x` `[rows, in]` and `dst` rows of stride `dst_rs`
    /// (a column block of a wider activation: `dst` starts at the block); replaces those columns
    /// unless `add`.
    fn project(
        &mut self,
        linear: &Linear,
        x: &[f32],
        rows: usize,
        dst: &mut [f32],
        dst_rs: usize,
        add: bool,
    ) -> Result<()> {
        let [out, inp] = linear.weight.dims();
        let view = linear.weight.host_f32();
        let w: &[f32] = match &view {
            Some(view) => view.values(),
            None => {
                self.scratch.resize(out * inp, 0.0);
                linear.weight.dequantize_into(&mut self.scratch)?;
                &self.scratch
            }
        };
        mm(
            dst,
            dst_rs,
            (rows, out, inp),
            Op::rows(x, inp),
            Op::rows(w, inp).t(),
            1.0,
            add,
            true,
        );
        if let Some(bias) = &linear.bias {
            let bias = host(bias)?;
            add_rows(dst, dst_rs, rows, out, |_| bias.values());
        }
        if let Some(lora) = &linear.lora {
            let input =
                Tensor::<2>::from_data(TensorData::new(x.to_vec(), [rows, inp]), self.device);
            let delta = to_vec(lora.forward(input))?;
            add_rows(dst, dst_rs, rows, out, |r| &delta[r * out..(r + 1) * out]);
        }
        Ok(())
    }
}

/// Adds `values(r)` (`width` values) to the first `width` columns of each row `r` of `rows` rows of
/// stride `rs`.
fn add_rows<'v>(
    dst: &mut [f32],
    rs: usize,
    rows: usize,
    width: usize,
    values: impl Fn(usize) -> &'v [f32],
) {
    for r in 0..rows {
        dst[r * rs..r * rs + width]
            .iter_mut()
            .zip(values(r))
            .for_each(|(d, v)| *d += v);
    }
}

/// The layer's keys and values over every position, `[b, kv_heads, total, d]` each: the cached ones
/// (read in place) followed by this pass's (the rotated keys and the values of `qkv`).
fn cached_with_new(cache: &LayerCache, qkv: &[f32], g: &Geometry) -> Result<(Vec<f32>, Vec<f32>)> {
    let (s, d, total) = (g.s, g.d, g.total);
    let past = total - s;
    let (qw, kvw, w) = (g.q_width(), g.kv_width(), g.qkv_width());
    let gather = |old: Option<&Tensor<4>>, column: usize| -> Result<Vec<f32>> {
        let old = match old {
            Some(t) if past > 0 => Some(host(t)?),
            _ => None,
        };
        let mut all = vec![0f32; g.b * g.kv_heads * total * d];
        all.par_chunks_mut(total * d)
            .enumerate()
            .for_each(|(bh, dst)| {
                let (bi, head) = (bh / g.kv_heads, bh % g.kv_heads);
                if let Some(old) = &old {
                    dst[..past * d]
                        .copy_from_slice(&old.values()[bh * past * d..(bh + 1) * past * d]);
                }
                for i in 0..s {
                    let src = &qkv[(bi * s + i) * w + column + head * d..][..d];
                    dst[(past + i) * d..(past + i + 1) * d].copy_from_slice(src);
                }
            });
        Ok(all)
    };
    Ok((
        gather(cache.k.as_ref(), qw)?,
        gather(cache.v.as_ref(), qw + kvw)?,
    ))
}

/// Query rows per attention task.
const QUERY_ROWS: usize = 64;

/// Attention of every query head of `qkv` over `keys` and `values` (`[b, kv_heads, total, d]`), masked
/// by the pass's mask: `[b·s, heads·d]`. A query that sees no position gets zeros. One task per
/// (sequence, query head, block of [`QUERY_ROWS`] queries), so that two threads share even a single
/// sequence's heads evenly; a block skips the keys after the last one any of its queries sees (half
/// of a causal prompt's scores).
fn attention(qkv: &[f32], keys: &[f32], values: &[f32], g: &Geometry) -> Vec<f32> {
    let (s, d, total, w) = (g.s, g.d, g.total, g.qkv_width());
    let rep = g.heads / g.kv_heads;
    let scale = (d as f32).powf(-0.5);
    let blocks = s.div_ceil(QUERY_ROWS);
    let parts: Vec<Vec<f32>> = (0..g.b * g.heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (bh, block) = (task / blocks, task % blocks);
            let (bi, head) = (bh / g.heads, bh % g.heads);
            let (first, end) = (block * QUERY_ROWS, ((block + 1) * QUERY_ROWS).min(s));
            let rows = end - first;
            let mask = &g.mask[(bi * s + first) * total..(bi * s + end) * total];
            let seen = mask
                .chunks(total)
                .filter_map(|m| m.iter().rposition(|&x| x >= MASK_BELOW))
                .max()
                .map_or(0, |last| last + 1);
            let mut out = vec![0f32; rows * d];
            if seen == 0 {
                return out;
            }
            let kv = (bi * g.kv_heads + head / rep) * total * d;
            let mut scores = vec![0f32; rows * seen];
            let q = Op::strided(&qkv[(bi * s + first) * w + head * d..], w);
            let k = Op::rows(&keys[kv..kv + seen * d], d).t();
            mm(
                &mut scores,
                seen,
                (rows, seen, d),
                q,
                k,
                scale,
                false,
                false,
            );
            for (row, mask) in scores.chunks_mut(seen).zip(mask.chunks(total)) {
                masked_softmax(row, &mask[..seen]);
            }
            let v = Op::rows(&values[kv..kv + seen * d], d);
            let p = Op::rows(&scores, seen);
            mm(&mut out, d, (rows, d, seen), p, v, 1.0, false, false);
            out
        })
        .collect();
    let qw = g.q_width();
    let mut out = vec![0f32; g.rows() * qw];
    for (task, part) in parts.iter().enumerate() {
        let (bh, block) = (task / blocks, task % blocks);
        let (bi, head) = (bh / g.heads, bh % g.heads);
        for (i, src) in part.chunks(d).enumerate() {
            let row = bi * s + block * QUERY_ROWS + i;
            out[row * qw + head * d..][..d].copy_from_slice(src);
        }
    }
    out
}

/// Softmax over the positions `mask` leaves visible (`0` visible, below [`MASK_BELOW`] hidden); all
/// zeros when none is.
fn masked_softmax(row: &mut [f32], mask: &[f32]) {
    let mut any = false;
    for (x, &m) in row.iter_mut().zip(mask) {
        if m < MASK_BELOW {
            *x = f32::NEG_INFINITY;
        } else {
            any = true;
        }
    }
    if any {
        softmax_row(row);
    } else {
        row.fill(0.0);
    }
}
