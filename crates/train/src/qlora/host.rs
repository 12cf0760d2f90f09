//! The stored-activation training step on the CPU backend, on host buffers: the same maths as
//! `backprop` (and the head of [`QloraModel::head`]), written as matrix products through `gemm` plus
//! fused row loops.
//!
//! Why: called directly, the products of a step run close to the square-matrix GEMM rate, but through
//! tensor ops the step took about twice as long (README: training speed): every elementwise op
//! allocated and filled a fresh tensor, LoRA's thin products and the residual adds were separate ops,
//! and the attention heads went through transposed copies. Here residuals and summed input gradients
//! are accumulated by the product that produces them (`dst += a·b`), LoRA's products are single row
//! passes (`low_rank`), attention reads each head's queries, keys and values in place through strides
//! (one rayon task per sequence row), dropout masks are bits drawn once per step, and RMSNorm, SwiGLU
//! and RoPE are single passes over rows (SwiGLU, softmax and cross-entropy with AVX2 + FMA when the
//! CPU has them).
//!
//! Frozen weights: quantized ones are dequantized into four buffers reused from layer to layer; f32
//! ones are read in place from the CPU backend's storage (`BaseWeight::host_f32`, no copy). The whole
//! step runs on a worker of rayon's pool.
//!
//! Layout: activations are row-major `[T, width]` with `T = b·s`. Projections that read the same input
//! are one product with stacked weights, so queries, keys and values are the column blocks of one
//! `[T, hidden + 2·kv_width]` activation (a head's queries: the `d` columns at `head·d`), and gate and up
//! the two halves of `[T, 2·intermediate]`. Attention probabilities are kept as `[b, heads, s, s]`.

use rayon::prelude::*;

use super::driver::{LayerGrads, Pass, StepClock, StepInputs};
use super::dropout::DropMask;
use super::layout::Layout;
use super::low_rank::{self, Factors};
use super::pointwise::cross_entropy;
use super::{target_index, LossSum, QloraModel};
use supportlm_model::error::Result;
use supportlm_model::llama::{rope_tables, to_vec};
use supportlm_model::lora::{Adapter, LoraPair, Target};
use supportlm_model::rows::{normed, rms, rope, swiglu, ROWS_PER_TASK};
use supportlm_model::weight::HostF32;
use supportlm_quant::gemm::{mm, Op};
use supportlm_quant::kernels::dot;
use supportlm_quant::pointwise::{exp, softmax_row};
use supportlm_quant::simd_fn;

/// One product of a layer: the projections that read the same input (`[q; k; v]`, `[gate; up]`, or
/// one projection alone) with their frozen weights, biases and LoRA factors. With the weights stacked
/// row-wise in one buffer each pass is one wider GEMM; weights read in place (f32 bases) are one GEMM
/// per part.
struct Proj<'a> {
    /// `[out, inp]`: the parts' rows one after another, when they lie so in memory.
    stacked: Option<&'a [f32]>,
    /// `[out]` when any part has a bias (zeros for the parts without).
    bias: Option<Vec<f32>>,
    out: usize,
    inp: usize,
    parts: Vec<Part<'a>>,
}

/// One projection inside a [`Proj`]: its `rows` output columns start at `offset`.
struct Part<'a> {
    target: Target,
    offset: usize,
    rows: usize,
    /// `[rows, inp]`.
    weight: &'a [f32],
    lora: Option<Factors<'a>>,
}

impl Proj<'_> {
    /// `y (+)= x Wᵀ + bias`, plus `s · (dropout(x) Aᵀ) Bᵀ` into each adapted part's columns, for `x`
    /// `[rows, inp]`; keeps each adapted part's low-rank activation `dropout(x) Aᵀ` in `lows`.
    fn forward(
        &self,
        x: &[f32],
        masks: &[Option<DropMask>; 7],
        rows: usize,
        y: &mut [f32],
        add: bool,
        lows: &mut [Option<Vec<f32>>; 7],
    ) {
        let (out, inp) = (self.out, self.inp);
        let x_op = Op::rows(x, inp);
        match self.stacked {
            Some(w) => mm(
                y,
                out,
                (rows, out, inp),
                x_op,
                Op::rows(w, inp).t(),
                1.0,
                add,
                true,
            ),
            None => {
                for part in &self.parts {
                    let w = Op::rows(part.weight, inp).t();
                    let y = &mut y[part.offset..];
                    mm(y, out, (rows, part.rows, inp), x_op, w, 1.0, add, true);
                }
            }
        }
        if let Some(bias) = &self.bias {
            y.par_chunks_mut(out * ROWS_PER_TASK).for_each(|block| {
                for row in block.chunks_mut(out) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            });
        }
        for part in &self.parts {
            if let Some(lora) = &part.lora {
                let i = target_index(part.target);
                let y = &mut y[part.offset..];
                lows[i] = Some(low_rank::forward(lora, x, masks[i].as_ref(), y, out));
            }
        }
    }

    /// Given `dy` `[rows, out]`: `dx (+)= dy W + Σ_parts ((s · dy B) A) ⊙ mask`, and each adapted
    /// part's `(dA, dB)` (`x` is the forward input, `masks` and `lows` what the forward pass kept).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        masks: &[Option<DropMask>; 7],
        lows: &[Option<Vec<f32>>; 7],
        dy: &[f32],
        rows: usize,
        dx: &mut [f32],
        add: bool,
        grads: &mut Vec<(Target, LoraPair)>,
    ) {
        let (out, inp) = (self.out, self.inp);
        match self.stacked {
            Some(w) => mm(
                dx,
                inp,
                (rows, inp, out),
                Op::rows(dy, out),
                Op::rows(w, inp),
                1.0,
                add,
                true,
            ),
            None => {
                for (i, part) in self.parts.iter().enumerate() {
                    let dy = Op::strided(&dy[part.offset..], out);
                    let w = Op::rows(part.weight, inp);
                    mm(
                        dx,
                        inp,
                        (rows, inp, part.rows),
                        dy,
                        w,
                        1.0,
                        add || i > 0,
                        true,
                    );
                }
            }
        }
        for part in &self.parts {
            let i = target_index(part.target);
            if let (Some(lora), Some(low)) = (&part.lora, &lows[i]) {
                let dy = &dy[part.offset..];
                let pair = low_rank::backward(lora, x, masks[i].as_ref(), low, dy, out, dx);
                grads.push((part.target, pair));
            }
        }
    }
}

/// One layer's frozen weights (dequantized, stacked where projections share an input), norms and
/// adapter factors.
struct Layer<'a> {
    norm1: Vec<f32>,
    norm2: Vec<f32>,
    /// `[q; k; v]`.
    qkv: Proj<'a>,
    o: Proj<'a>,
    /// `[gate; up]`.
    gate_up: Proj<'a>,
    down: Proj<'a>,
}

/// Where [`QloraModel::host_layer`] puts a layer's frozen weights, kept from layer to layer: one
/// buffer per product for dequantized weights, and in-place views of f32 weights (indexed like
/// [`Target::ALL`]).
#[derive(Default)]
struct LayerWeights {
    buffers: [Vec<f32>; 4],
    views: [Option<HostF32>; 7],
}

/// The projections each product of a layer stacks, in [`Layer`]'s order.
const PRODUCTS: [&[Target]; 4] = [
    &[Target::QProj, Target::KProj, Target::VProj],
    &[Target::OProj],
    &[Target::GateProj, Target::UpProj],
    &[Target::DownProj],
];

/// What the backward pass of one layer reads (see `backprop::Saved`).
pub(super) struct Saved {
    x: Vec<f32>,
    inv1: Vec<f32>,
    /// `[T, hidden + 2·kv_width]`: rotated queries and keys, values.
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    mid: Vec<f32>,
    inv2: Vec<f32>,
    /// `[T, 2·intermediate]`: gate, then up.
    gate_up: Vec<f32>,
    /// `dropout(x) Aᵀ` of each adapted projection, indexed like [`Target::ALL`].
    lows: [Option<Vec<f32>>; 7],
    /// The dropout masks of the projections' inputs, indexed the same way.
    masks: [Option<DropMask>; 7],
}

/// Shapes and per-batch tables shared by every layer.
struct Geometry<'a> {
    b: usize,
    s: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    eps: f32,
    /// Position of each of the `T` rows.
    positions: Vec<usize>,
    /// RoPE tables `[max_positions, d]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Additive mask `[s, s]`.
    mask: &'a [f32],
}

impl Geometry<'_> {
    fn rows(&self) -> usize {
        self.b * self.s
    }

    /// Width of the keys and values, `kv_heads · d`.
    fn kv_width(&self) -> usize {
        self.kv_heads * self.d
    }

    /// Width of a row of stacked queries, keys and values.
    fn qkv_width(&self) -> usize {
        self.hidden + 2 * self.kv_width()
    }

    /// Rotates the query and key heads of stacked `qkv` rows by each row's position; `sign = -1`
    /// rotates back (the backward of the rotation).
    fn rope(&self, qkv: &mut [f32], sign: f32) {
        let rotated = self.hidden + self.kv_width();
        let tables = (&self.cos[..], &self.sin[..]);
        rope(
            qkv,
            self.qkv_width(),
            rotated,
            self.d,
            &self.positions,
            tables,
            sign,
        );
    }
}

/// `acc += dx` where `n = x · inv · w` and `dn` is the gradient at `n`:
/// `dx = g · inv − x · inv³ · mean(g · x)` with `g = dn · w`.
fn rms_backward_add(acc: &mut [f32], dn: &[f32], x: &[f32], inv: &[f32], w: &[f32]) {
    let n = w.len();
    acc.par_chunks_mut(n * ROWS_PER_TASK)
        .zip(dn.par_chunks(n * ROWS_PER_TASK))
        .zip(x.par_chunks(n * ROWS_PER_TASK))
        .zip(inv.par_chunks(ROWS_PER_TASK))
        .for_each(|(((acc, dn), x), inv)| {
            for (((acc, dn), x), &iv) in acc
                .chunks_mut(n)
                .zip(dn.chunks(n))
                .zip(x.chunks(n))
                .zip(inv)
            {
                let mean_gx = dn
                    .iter()
                    .zip(x)
                    .zip(w)
                    .map(|((d, x), w)| d * w * x)
                    .sum::<f32>()
                    / n as f32;
                let c = iv * iv * iv * mean_gx;
                for (((a, d), x), w) in acc.iter_mut().zip(dn).zip(x).zip(w) {
                    *a += d * w * iv - x * c;
                }
            }
        });
}

/// Attention of every head over stacked `qkv` rows (rotated queries and keys, values): probabilities
/// `[b, heads, s, s]` and the output `[T, hidden]`. One task per sequence row; products inside a task
/// run on its thread unless there are fewer rows than threads.
fn attention(qkv: &[f32], g: &Geometry) -> (Vec<f32>, Vec<f32>) {
    let (s, h, d, hidden) = (g.s, g.heads, g.d, g.hidden);
    let (kvw, w) = (g.kv_width(), g.qkv_width());
    let rep = h / g.kv_heads;
    let scale = (d as f32).powf(-0.5);
    // Fewer sequence rows than threads (a packed batch): let the products use the pool instead.
    let inner = g.b < rayon::current_num_threads();
    let mut probs = vec![0f32; g.b * h * s * s];
    let mut out = vec![0f32; g.rows() * hidden];
    probs
        .par_chunks_mut(h * s * s)
        .zip(out.par_chunks_mut(s * hidden))
        .enumerate()
        .for_each(|(bi, (probs, out))| {
            let seq = &qkv[bi * s * w..];
            for head in 0..h {
                let kv = head / rep * d;
                let p = &mut probs[head * s * s..(head + 1) * s * s];
                let qh = Op::strided(&seq[head * d..], w);
                let kt = Op::strided(&seq[hidden + kv..], w).t();
                mm(p, s, (s, s, d), qh, kt, scale, false, inner);
                for (row, mask) in p.chunks_mut(s).zip(g.mask.chunks(s)) {
                    row.iter_mut().zip(mask).for_each(|(x, m)| *x += m);
                    softmax_row(row);
                }
                let vh = Op::strided(&seq[hidden + kvw + kv..], w);
                mm(
                    &mut out[head * d..],
                    hidden,
                    (s, d, s),
                    Op::rows(p, s),
                    vh,
                    1.0,
                    false,
                    inner,
                );
            }
        });
    (probs, out)
}

/// Backward of [`attention`] given `dout` `[T, hidden]`: the gradients at the rotated queries and keys
/// and at the values, stacked like `qkv`.
fn attention_backward(saved: &Saved, dout: &[f32], g: &Geometry) -> Vec<f32> {
    let (s, h, d, hidden) = (g.s, g.heads, g.d, g.hidden);
    let (kvw, w) = (g.kv_width(), g.qkv_width());
    let rep = h / g.kv_heads;
    let scale = (d as f32).powf(-0.5);
    let inner = g.b < rayon::current_num_threads();
    let mut dqkv = vec![0f32; g.rows() * w];
    dqkv.par_chunks_mut(s * w)
        .enumerate()
        .for_each(|(bi, dseq)| {
            let seq = &saved.qkv[bi * s * w..];
            let dout = &dout[bi * s * hidden..];
            let mut ds = vec![0f32; s * s];
            for head in 0..h {
                let kv = head / rep * d;
                let p = &saved.probs[(bi * h + head) * s * s..(bi * h + head + 1) * s * s];
                let p_op = Op::rows(p, s);
                let doh = Op::strided(&dout[head * d..], hidden);
                mm(
                    &mut dseq[hidden + kvw + kv..],
                    w,
                    (s, d, s),
                    p_op.t(),
                    doh,
                    1.0,
                    true,
                    inner,
                );
                let vt = Op::strided(&seq[hidden + kvw + kv..], w).t();
                mm(&mut ds, s, (s, s, d), doh, vt, 1.0, false, inner);
                for (dr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                    let dot = dot(dr, pr);
                    dr.iter_mut()
                        .zip(pr)
                        .for_each(|(x, p)| *x = p * (*x - dot) * scale);
                }
                let ds_op = Op::rows(&ds, s);
                let kh = Op::strided(&seq[hidden + kv..], w);
                mm(
                    &mut dseq[head * d..],
                    w,
                    (s, d, s),
                    ds_op,
                    kh,
                    1.0,
                    false,
                    inner,
                );
                let qh = Op::strided(&seq[head * d..], w);
                mm(
                    &mut dseq[hidden + kv..],
                    w,
                    (s, d, s),
                    ds_op.t(),
                    qh,
                    1.0,
                    true,
                    inner,
                );
            }
        });
    dqkv
}

simd_fn! {
    fn swiglu_backward_chunk(dgate: &mut [f32], dup: &mut [f32], dact: &[f32], gate: &[f32], up: &[f32]) {
        for ((((dg, du), &da), &g), &u) in dgate.iter_mut().zip(dup).zip(dact).zip(gate).zip(up) {
            let sg = 1.0 / (1.0 + exp(-g));
            *du = da * g * sg;
            *dg = da * u * sg * (1.0 + g * (1.0 - sg));
        }
    }
}

/// The gradients at stacked `[gate | up]` rows given the one at `silu(gate) · up`:
/// `d up = dact · silu(g)`, `d gate = dact · up · σ(g) · (1 + g · (1 − σ(g)))`.
fn swiglu_backward(dact: &[f32], gate_up: &[f32], inter: usize) -> Vec<f32> {
    let mut dgu = vec![0f32; gate_up.len()];
    dgu.par_chunks_mut(2 * inter * ROWS_PER_TASK)
        .zip(dact.par_chunks(inter * ROWS_PER_TASK))
        .zip(gate_up.par_chunks(2 * inter * ROWS_PER_TASK))
        .for_each(|((dgu, dact), gu)| {
            for ((dgu, da), gu) in dgu
                .chunks_mut(2 * inter)
                .zip(dact.chunks(inter))
                .zip(gu.chunks(2 * inter))
            {
                let (dg, du) = dgu.split_at_mut(inter);
                let (g, u) = gu.split_at(inter);
                swiglu_backward_chunk(dg, du, da, g, u);
            }
        });
    dgu
}

fn forward_layer(
    l: &Layer,
    masks: [Option<DropMask>; 7],
    x: Vec<f32>,
    g: &Geometry,
) -> (Vec<f32>, Saved) {
    let rows = g.rows();
    let mut lows: [Option<Vec<f32>>; 7] = Default::default();

    let (n1, inv1) = rms(&x, &l.norm1, g.eps);
    let mut qkv = vec![0f32; rows * l.qkv.out];
    l.qkv.forward(&n1, &masks, rows, &mut qkv, false, &mut lows);
    drop(n1);
    g.rope(&mut qkv, 1.0);
    let (probs, attn) = attention(&qkv, g);
    let mut mid = x.clone();
    l.o.forward(&attn, &masks, rows, &mut mid, true, &mut lows);

    let (n2, inv2) = rms(&mid, &l.norm2, g.eps);
    let mut gate_up = vec![0f32; rows * l.gate_up.out];
    l.gate_up
        .forward(&n2, &masks, rows, &mut gate_up, false, &mut lows);
    drop(n2);
    let act = swiglu(&gate_up, l.down.inp);
    let mut out = mid.clone();
    l.down
        .forward(&act, &masks, rows, &mut out, true, &mut lows);
    let saved = Saved {
        x,
        inv1,
        qkv,
        probs,
        attn,
        mid,
        inv2,
        gate_up,
        lows,
        masks,
    };
    (out, saved)
}

/// Back-propagates `dout` through the layer [`forward_layer`] ran: the gradient at its input and
/// each adapted projection's factors' gradients.
fn backward_layer(
    l: &Layer,
    saved: Saved,
    dout: Vec<f32>,
    g: &Geometry,
) -> (Vec<f32>, Vec<(Target, LoraPair)>) {
    let rows = g.rows();
    let (hidden, inter) = (g.hidden, l.down.inp);
    let (masks, lows) = (&saved.masks, &saved.lows);
    let mut grads = Vec::with_capacity(7);

    // MLP: out = mid + down(silu(gate) · up).
    let act = swiglu(&saved.gate_up, inter);
    let mut dact = vec![0f32; rows * inter];
    l.down
        .backward(&act, masks, lows, &dout, rows, &mut dact, false, &mut grads);
    drop(act);
    let dgate_up = swiglu_backward(&dact, &saved.gate_up, inter);
    drop(dact);
    let n2 = normed(&saved.mid, &saved.inv2, &l.norm2);
    let mut dn2 = vec![0f32; rows * hidden];
    l.gate_up.backward(
        &n2, masks, lows, &dgate_up, rows, &mut dn2, false, &mut grads,
    );
    drop((n2, dgate_up));
    let mut dmid = dout;
    rms_backward_add(&mut dmid, &dn2, &saved.mid, &saved.inv2, &l.norm2);
    drop(dn2);

    // Attention: mid = x + o_proj(softmax(q kᵀ / √d + mask) v).
    let mut dattn = vec![0f32; rows * hidden];
    l.o.backward(
        &saved.attn,
        masks,
        lows,
        &dmid,
        rows,
        &mut dattn,
        false,
        &mut grads,
    );
    let mut dqkv = attention_backward(&saved, &dattn, g);
    drop(dattn);
    g.rope(&mut dqkv, -1.0);
    let n1 = normed(&saved.x, &saved.inv1, &l.norm1);
    let mut dn1 = vec![0f32; rows * hidden];
    l.qkv
        .backward(&n1, masks, lows, &dqkv, rows, &mut dn1, false, &mut grads);
    drop((n1, dqkv));
    let mut dx = dmid;
    rms_backward_add(&mut dx, &dn1, &saved.x, &saved.inv1, &l.norm1);
    (dx, grads)
}

impl QloraModel {
    /// Layer `index` on the host: f32 weights read in place, others dequantized now into `scratch`'s
    /// buffers (one per product, reused from layer to layer: no allocation or page faults for the
    /// 100-odd MB each pass dequantizes); the adapter's factors borrowed.
    fn host_layer<'a>(
        &self,
        index: usize,
        adapter: &'a Adapter,
        scratch: &'a mut LayerWeights,
    ) -> Result<Layer<'a>> {
        let frozen = &self.layers[index];
        let linear = |t: Target| &frozen.linears[target_index(t)];
        // Fill first: views of the weights kept in f32, and the other products dequantized.
        let LayerWeights { buffers, views } = scratch;
        for (targets, buffer) in PRODUCTS.iter().zip(buffers.iter_mut()) {
            let in_place: Option<Vec<HostF32>> = targets
                .iter()
                .map(|&t| linear(t).weight.host_f32())
                .collect();
            match in_place {
                Some(parts) => {
                    for (&t, view) in targets.iter().zip(parts) {
                        views[target_index(t)] = Some(view);
                    }
                }
                None => {
                    let sizes = targets
                        .iter()
                        .map(|&t| linear(t).weight.dims().iter().product::<usize>());
                    buffer.resize(sizes.sum(), 0.0);
                    let mut start = 0;
                    for &t in *targets {
                        views[target_index(t)] = None;
                        let w = &linear(t).weight;
                        let end = start + w.dims().iter().product::<usize>();
                        w.dequantize_into(&mut buffer[start..end])?;
                        start = end;
                    }
                }
            }
        }
        // Then borrow: each part's weight is its view, or its rows of the product's buffer.
        let scale = adapter.config.scale() as f32;
        let mut products = Vec::with_capacity(4);
        for (targets, buffer) in PRODUCTS.iter().zip(buffers.iter()) {
            let inp = linear(targets[0]).weight.dims()[1];
            let out: usize = targets.iter().map(|&t| linear(t).weight.dims()[0]).sum();
            let stacked = views[target_index(targets[0])].is_none();
            let with_bias = targets.iter().any(|&t| linear(t).bias.is_some());
            let mut bias = with_bias.then(|| vec![0f32; out]);
            let (mut parts, mut offset) = (Vec::with_capacity(targets.len()), 0);
            for &t in *targets {
                let f = linear(t);
                let rows = f.weight.dims()[0];
                if let (Some(all), Some(b)) = (&mut bias, &f.bias) {
                    all[offset..offset + rows].copy_from_slice(&to_vec(b.clone())?);
                }
                let weight = match &views[target_index(t)] {
                    Some(view) => view.values(),
                    None => &buffer[offset * inp..(offset + rows) * inp],
                };
                let lora = adapter
                    .weights
                    .get(&(index, t))
                    .map(|pair| Factors::new(&pair.a, &pair.b, adapter.config.r, scale));
                parts.push(Part {
                    target: t,
                    offset,
                    rows,
                    weight,
                    lora,
                });
                offset += rows;
            }
            products.push(Proj {
                stacked: stacked.then(|| &buffer[..out * inp]),
                bias,
                out,
                inp,
                parts,
            });
        }
        let mut products = products.into_iter();
        let mut next = || products.next().expect("four products");
        Ok(Layer {
            norm1: to_vec(frozen.input_layernorm.clone())?,
            norm2: to_vec(frozen.post_attention_layernorm.clone())?,
            qkv: next(),
            o: next(),
            gate_up: next(),
            down: next(),
        })
    }

    /// Final norm, LM head and chunked cross-entropy on the last layer's output `x` (`[T, hidden]`):
    /// the loss and the gradient at `x`.
    pub(super) fn head_on_host(&self, x: &[f32], layout: &Layout) -> Result<(LossSum, Vec<f32>)> {
        let hidden = self.config.hidden_size;
        let vocab = self.config.vocab_size;
        let mut dx = vec![0f32; x.len()];
        let m = layout.targets.len();
        if m == 0 {
            return Ok((
                LossSum {
                    sum: 0.0,
                    tokens: 0,
                },
                dx,
            ));
        }
        let norm = to_vec(self.norm.clone())?;
        let mut selected = Vec::with_capacity(m * hidden);
        for &(row, _) in &layout.targets {
            let row = row as usize;
            selected.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        let (h, inv) = rms(&selected, &norm, self.config.rms_norm_eps as f32);
        let table = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let blocks = table.host_blocks()?;
        let chunk = self.loss_chunk.max(1);
        let mut dh = vec![0f32; m * hidden];
        let mut logits = vec![0f32; chunk.min(m) * vocab];
        let mut sum = 0f64;
        for start in (0..m).step_by(chunk) {
            let len = chunk.min(m - start);
            let hc = Op::rows(&h[start * hidden..(start + len) * hidden], hidden);
            let logits = &mut logits[..len * vocab];
            let mut col = 0;
            for block in &blocks {
                let n = block.len() / hidden;
                let bt = Op::rows(block, hidden).t();
                mm(
                    &mut logits[col..],
                    vocab,
                    (len, n, hidden),
                    hc,
                    bt,
                    1.0,
                    false,
                    true,
                );
                col += n;
            }
            let tgt: Vec<usize> = layout.targets[start..start + len]
                .iter()
                .map(|&(_, t)| t as usize)
                .collect();
            sum += cross_entropy(logits, vocab, &tgt, true);
            let dhc = &mut dh[start * hidden..(start + len) * hidden];
            let mut col = 0;
            for (i, block) in blocks.iter().enumerate() {
                let n = block.len() / hidden;
                let dl = Op::strided(&logits[col..], vocab);
                mm(
                    dhc,
                    hidden,
                    (len, hidden, n),
                    dl,
                    Op::rows(block, hidden),
                    1.0,
                    i > 0,
                    true,
                );
                col += n;
            }
        }
        let mut dsel = vec![0f32; m * hidden];
        rms_backward_add(&mut dsel, &dh, &selected, &inv, &norm);
        for (&(row, _), d) in layout.targets.iter().zip(dsel.chunks(hidden)) {
            let row = row as usize;
            dx[row * hidden..(row + 1) * hidden]
                .iter_mut()
                .zip(d)
                .for_each(|(a, b)| *a += b);
        }
        Ok((LossSum { sum, tokens: m }, dx))
    }
}

/// The stored-activation pass over one batch on host buffers.
pub(super) struct HostPass<'a> {
    step: StepInputs<'a>,
    adapter: &'a Adapter,
    geometry: Geometry<'a>,
    /// Dequantization buffers reused from layer to layer (forward and backward).
    scratch: LayerWeights,
}

impl<'a> HostPass<'a> {
    pub fn new(step: StepInputs<'a>, adapter: &'a Adapter) -> Self {
        let (model, layout) = (step.model, step.layout);
        let c = &model.config;
        let d = c.head_dim();
        let positions: Vec<usize> = layout.positions.iter().flatten().copied().collect();
        let used = positions.iter().max().map_or(0, |p| p + 1);
        let (cos, sin) = rope_tables(d, c.rope_theta, used);
        let geometry = Geometry {
            b: layout.b,
            s: layout.s,
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            d,
            eps: c.rms_norm_eps as f32,
            positions,
            cos,
            sin,
            mask: &layout.mask,
        };
        HostPass {
            step,
            adapter,
            geometry,
            scratch: LayerWeights::default(),
        }
    }
}

impl Pass for HostPass<'_> {
    type Hidden = Vec<f32>;
    type Kept = Saved;
    type PairGrad = LoraPair;

    fn embed(&mut self) -> Result<Vec<f32>> {
        let m = self.step.model;
        to_vec(m.embed_tokens.rows(&self.step.layout.ids, &m.device))
    }

    fn forward(
        &mut self,
        l: usize,
        x: Vec<f32>,
        clock: &mut StepClock,
    ) -> Result<(Vec<f32>, Saved)> {
        let StepInputs { model, dropout, .. } = self.step;
        let adapter = self.adapter;
        let rows = self.geometry.rows();
        let t = std::time::Instant::now();
        let layer = model.host_layer(l, adapter, &mut self.scratch)?;
        clock.weights_since(t);
        let masks = Target::ALL.map(|t| {
            let inp = t.shape(&model.config)[1];
            dropout
                .filter(|d| d.p > 0.0 && adapter.weights.contains_key(&(l, t)))
                .map(|d| DropMask::new(d, l, t, rows, inp))
        });
        Ok(forward_layer(&layer, masks, x, &self.geometry))
    }

    fn head(&mut self, x: Vec<f32>) -> Result<(LossSum, Vec<f32>)> {
        self.step.model.head_on_host(&x, self.step.layout)
    }

    fn backward(
        &mut self,
        l: usize,
        kept: Saved,
        grad: Vec<f32>,
        clock: &mut StepClock,
    ) -> Result<(Vec<f32>, LayerGrads<LoraPair>)> {
        let t = std::time::Instant::now();
        let layer = self
            .step
            .model
            .host_layer(l, self.adapter, &mut self.scratch)?;
        clock.weights_since(t);
        Ok(backward_layer(&layer, kept, grad, &self.geometry))
    }
}
