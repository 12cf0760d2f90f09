//! The stored-activation training step on the CPU backend, on host buffers: the same maths as
//! `backprop` (and the head of [`QloraModel::head`]), written as matrix products through `gemm` plus
//! fused row loops.
//!
//! Why: at 8 × 128 tokens the products of a step run at about 92% of the square-matrix GEMM rate when
//! called directly, but through tensor ops the step took twice that time: every elementwise op
//! allocated and filled a fresh tensor, LoRA's thin products and the residual adds were separate ops,
//! and the attention heads went through transposed copies. Here residuals and summed input gradients
//! are accumulated by the product that produces them (`dst += a·b`), LoRA's products are single row
//! passes (`low_rank`), attention reads each head's queries, keys and values in place through strides
//! (one rayon task per sequence row), dropout masks are bits drawn once per step, and RMSNorm, SwiGLU
//! and RoPE are single passes over rows (SwiGLU, softmax and cross-entropy with AVX2 + FMA when the
//! CPU has them). NF4 at 8 × 128: 10.8 s per step through tensor ops, about 6.6 s here.
//!
//! Layout: activations are row-major `[T, width]` with `T = b·s`; a head's slice of `q` is the
//! `d` columns at `head·d` (row stride `hidden`). Attention probabilities are kept as `[b, heads, s, s]`.

use std::collections::BTreeMap;

use gemm::Parallelism;
use rayon::prelude::*;

use super::layout::Layout;
use super::low_rank::{self, Factors};
use super::pointwise::{cross_entropy, exp, simd_fn, softmax_row, CHUNK};
use super::{target_index, DropMask, Dropout, LossSum, QloraModel, StepClock, StepGrads};
use crate::error::{ModelError, Result};
use crate::kernels::dot;
use crate::llama::{rope_tables, to_vec};
use crate::lora::{Adapter, LoraPair, Target};

/// Products of at least this many multiply-adds use every thread (as the CPU backend decides).
const PARALLEL_WORK: usize = 192 * 192 * 192;
/// Rows per rayon task in row loops.
const ROWS_PER_TASK: usize = 16;

/// A matrix operand: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Op<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Op<'a> {
    /// Row-major with `cols` columns (a row stride of `cols`).
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Op {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// Row-major rows of stride `rs` (a column block of a wider matrix).
    fn strided(data: &'a [f32], rs: usize) -> Self {
        Op { data, rs, cs: 1 }
    }

    fn t(self) -> Self {
        Op {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "{what} operand out of bounds");
        }
    }
}

/// `dst[m, n] (+)= beta · a[m, k] · b[k, n]`, `dst` row-major with row stride `dst_rs`; accumulates
/// into `dst` when `add`. `threads`: let gemm split large products over rayon's pool.
#[allow(clippy::too_many_arguments)]
fn mm(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: Op,
    b: Op,
    beta: f32,
    add: bool,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "product destination out of bounds"
    );
    a.check(m, k, "left");
    b.check(k, n, "right");
    if k == 0 {
        if !add {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = if threads && m * n * k >= PARALLEL_WORK {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every element gemm reads or writes inside the three slices, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            add,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// One projection of a layer: the dequantized frozen weight and, when adapted, its LoRA factors.
struct Proj<'a> {
    /// `[out, inp]`.
    weight: &'a [f32],
    bias: Option<Vec<f32>>,
    out: usize,
    inp: usize,
    lora: Option<Factors<'a>>,
}

impl Proj<'_> {
    /// `y (+)= x Wᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ` for `x` `[rows, inp]`; returns the low-rank
    /// activation `dropout(x) Aᵀ` when adapted.
    fn forward(
        &self,
        x: &[f32],
        mask: Option<&DropMask>,
        rows: usize,
        y: &mut [f32],
        add: bool,
    ) -> Option<Vec<f32>> {
        let (out, inp) = (self.out, self.inp);
        let w = Op::rows(self.weight, inp).t();
        mm(
            y,
            out,
            (rows, out, inp),
            Op::rows(x, inp),
            w,
            1.0,
            add,
            true,
        );
        if let Some(bias) = &self.bias {
            y.par_chunks_mut(out * ROWS_PER_TASK).for_each(|block| {
                for row in block.chunks_mut(out) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            });
        }
        let lora = self.lora.as_ref()?;
        Some(low_rank::forward(lora, x, mask, y))
    }

    /// Given `dy` `[rows, out]`: `dx (+)= dy W + ((s · dy B) A) ⊙ mask`, and `(dA, dB)` when adapted
    /// (`x` is the forward input, `mask` its dropout mask, `low` the kept low-rank activation).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        mask: Option<&DropMask>,
        low: Option<&[f32]>,
        dy: &[f32],
        rows: usize,
        dx: &mut [f32],
        add: bool,
    ) -> Option<LoraPair> {
        let (out, inp) = (self.out, self.inp);
        let dy_op = Op::rows(dy, out);
        mm(
            dx,
            inp,
            (rows, inp, out),
            dy_op,
            Op::rows(self.weight, inp),
            1.0,
            add,
            true,
        );
        let (lora, low) = (self.lora.as_ref()?, low?);
        Some(low_rank::backward(lora, x, mask, low, dy, dx))
    }
}

/// One layer's frozen weights (dequantized), norms and adapter factors.
struct Layer<'a> {
    norm1: Vec<f32>,
    norm2: Vec<f32>,
    /// Indexed like [`Target::ALL`].
    proj: Vec<Proj<'a>>,
}

/// What the backward pass of one layer reads (see `backprop::Saved`).
struct Saved {
    x: Vec<f32>,
    inv1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    mid: Vec<f32>,
    inv2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
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
}

/// RMSNorm of each row: returns `x · inv · w` and `inv = 1/sqrt(mean(x²) + eps)` per row.
fn rms(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let inv: Vec<f32> = x
        .par_chunks(n)
        .map(|x| 1.0 / (dot(x, x) / n as f32 + eps).sqrt())
        .collect();
    (normed(x, &inv, w), inv)
}

/// `x · inv · w` from a kept factor.
fn normed(x: &[f32], inv: &[f32], w: &[f32]) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n * ROWS_PER_TASK)
        .zip(x.par_chunks(n * ROWS_PER_TASK))
        .zip(inv.par_chunks(ROWS_PER_TASK))
        .for_each(|((out, x), inv)| {
            for ((o, x), iv) in out.chunks_mut(n).zip(x.chunks(n)).zip(inv) {
                for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * iv * w;
                }
            }
        });
    out
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

/// Rotates every head of `x` (`[T, heads·d]`) by its row's position; `sign = -1` rotates back (the
/// backward of the rotation).
fn rope(x: &mut [f32], width: usize, g: &Geometry, sign: f32) {
    let d = g.d;
    let half = d / 2;
    x.par_chunks_mut(width)
        .zip(&g.positions)
        .for_each(|(row, &pos)| {
            let cos = &g.cos[pos * d..(pos + 1) * d];
            let sin = &g.sin[pos * d..(pos + 1) * d];
            for head in row.chunks_mut(d) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sign * sin[i];
                    x2[i] = b * cos[half + i] + a * sign * sin[half + i];
                }
            }
        });
}

/// Attention of every head (rotated `q`, `k`, and `v`): probabilities `[b, heads, s, s]` and the output
/// `[T, hidden]`. One task per sequence row; products inside a task run on its thread unless there are
/// fewer rows than threads.
fn attention(q: &[f32], k: &[f32], v: &[f32], g: &Geometry) -> (Vec<f32>, Vec<f32>) {
    let (s, h, d, hidden) = (g.s, g.heads, g.d, g.hidden);
    let kvw = g.kv_width();
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
            let (q, k, v) = (
                &q[bi * s * hidden..],
                &k[bi * s * kvw..],
                &v[bi * s * kvw..],
            );
            for head in 0..h {
                let kv = head / rep * d;
                let p = &mut probs[head * s * s..(head + 1) * s * s];
                let qh = Op::strided(&q[head * d..], hidden);
                let kt = Op::strided(&k[kv..], kvw).t();
                mm(p, s, (s, s, d), qh, kt, scale, false, inner);
                for (row, mask) in p.chunks_mut(s).zip(g.mask.chunks(s)) {
                    row.iter_mut().zip(mask).for_each(|(x, m)| *x += m);
                    softmax_row(row);
                }
                let vh = Op::strided(&v[kv..], kvw);
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

/// Backward of [`attention`] given `dout` `[T, hidden]`: gradients at the rotated `q`, `k` and at `v`.
fn attention_backward(saved: &Saved, dout: &[f32], g: &Geometry) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (s, h, d, hidden) = (g.s, g.heads, g.d, g.hidden);
    let kvw = g.kv_width();
    let rep = h / g.kv_heads;
    let scale = (d as f32).powf(-0.5);
    let inner = g.b < rayon::current_num_threads();
    let rows = g.rows();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; rows * hidden],
        vec![0f32; rows * kvw],
        vec![0f32; rows * kvw],
    );
    dq.par_chunks_mut(s * hidden)
        .zip(dk.par_chunks_mut(s * kvw))
        .zip(dv.par_chunks_mut(s * kvw))
        .enumerate()
        .for_each(|(bi, ((dq, dk), dv))| {
            let q = &saved.q[bi * s * hidden..];
            let (k, v) = (&saved.k[bi * s * kvw..], &saved.v[bi * s * kvw..]);
            let dout = &dout[bi * s * hidden..];
            let mut ds = vec![0f32; s * s];
            for head in 0..h {
                let kv = head / rep * d;
                let p = &saved.probs[(bi * h + head) * s * s..(bi * h + head + 1) * s * s];
                let p_op = Op::rows(p, s);
                let doh = Op::strided(&dout[head * d..], hidden);
                mm(
                    &mut dv[kv..],
                    kvw,
                    (s, d, s),
                    p_op.t(),
                    doh,
                    1.0,
                    true,
                    inner,
                );
                let vt = Op::strided(&v[kv..], kvw).t();
                mm(&mut ds, s, (s, s, d), doh, vt, 1.0, false, inner);
                for (dr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                    let dot = dot(dr, pr);
                    dr.iter_mut()
                        .zip(pr)
                        .for_each(|(x, p)| *x = p * (*x - dot) * scale);
                }
                let ds_op = Op::rows(&ds, s);
                let kh = Op::strided(&k[kv..], kvw);
                mm(
                    &mut dq[head * d..],
                    hidden,
                    (s, d, s),
                    ds_op,
                    kh,
                    1.0,
                    false,
                    inner,
                );
                let qh = Op::strided(&q[head * d..], hidden);
                mm(
                    &mut dk[kv..],
                    kvw,
                    (s, d, s),
                    ds_op.t(),
                    qh,
                    1.0,
                    true,
                    inner,
                );
            }
        });
    (dq, dk, dv)
}

simd_fn! {
    fn swiglu_chunk(act: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((a, &g), &u) in act.iter_mut().zip(gate).zip(up) {
            *a = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// `silu(gate) · up`.
fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut act = vec![0f32; gate.len()];
    act.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((a, g), u)| swiglu_chunk(a, g, u));
    act
}

simd_fn! {
    fn swiglu_backward_chunk(dact: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32]) {
        for (((da, du), &g), &u) in dact.iter_mut().zip(dup).zip(gate).zip(up) {
            let sg = 1.0 / (1.0 + exp(-g));
            *du = *da * g * sg;
            *da = *da * u * sg * (1.0 + g * (1.0 - sg));
        }
    }
}

/// Turns `dact` into the gradient at `gate` and writes the one at `up` into `dup`:
/// `d up = dact · silu(g)`, `d gate = dact · up · σ(g) · (1 + g · (1 − σ(g)))`.
fn swiglu_backward(dact: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32]) {
    dact.par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|(((da, du), g), u)| swiglu_backward_chunk(da, du, g, u));
}

fn forward_layer(
    l: &Layer,
    masks: [Option<DropMask>; 7],
    x: Vec<f32>,
    g: &Geometry,
) -> (Vec<f32>, Saved) {
    let rows = g.rows();
    let mut lows: [Option<Vec<f32>>; 7] = Default::default();
    // `y (+)= p(input)`, keeping the projection's low-rank activation.
    let mut run = |t: Target, input: &[f32], y: &mut [f32], add: bool| {
        let i = target_index(t);
        lows[i] = l.proj[i].forward(input, masks[i].as_ref(), rows, y, add);
    };
    let fresh = |t: Target| vec![0f32; rows * l.proj[target_index(t)].out];

    let (n1, inv1) = rms(&x, &l.norm1, g.eps);
    let (mut q, mut k, mut v) = (
        fresh(Target::QProj),
        fresh(Target::KProj),
        fresh(Target::VProj),
    );
    run(Target::QProj, &n1, &mut q, false);
    run(Target::KProj, &n1, &mut k, false);
    run(Target::VProj, &n1, &mut v, false);
    drop(n1);
    rope(&mut q, g.hidden, g, 1.0);
    rope(&mut k, g.kv_width(), g, 1.0);
    let (probs, attn) = attention(&q, &k, &v, g);
    let mut mid = x.clone();
    run(Target::OProj, &attn, &mut mid, true);

    let (n2, inv2) = rms(&mid, &l.norm2, g.eps);
    let (mut gate, mut up) = (fresh(Target::GateProj), fresh(Target::UpProj));
    run(Target::GateProj, &n2, &mut gate, false);
    run(Target::UpProj, &n2, &mut up, false);
    drop(n2);
    let act = swiglu(&gate, &up);
    let mut out = mid.clone();
    run(Target::DownProj, &act, &mut out, true);
    let saved = Saved {
        x,
        inv1,
        q,
        k,
        v,
        probs,
        attn,
        mid,
        inv2,
        gate,
        up,
        lows,
        masks,
    };
    (out, saved)
}

/// Back-propagates `dout` through the layer [`forward_layer`] ran: the gradient at its input and
/// each adapted projection's factors' gradients, in [`Target::ALL`] order.
fn backward_layer(
    l: &Layer,
    saved: Saved,
    dout: Vec<f32>,
    g: &Geometry,
) -> (Vec<f32>, Vec<(Target, LoraPair)>) {
    let rows = g.rows();
    let (hidden, inter) = (g.hidden, l.proj[target_index(Target::GateProj)].out);
    let p = |t: Target| &l.proj[target_index(t)];
    let low = |t: Target| saved.lows[target_index(t)].as_deref();
    let mask = |t: Target| saved.masks[target_index(t)].as_ref();
    // `dx (+)= dy`'s gradient through projection `t` with forward input `x`; its factors' gradients.
    let back = |t: Target, x: &[f32], dy: &[f32], dx: &mut [f32], add: bool| {
        p(t).backward(x, mask(t), low(t), dy, rows, dx, add)
    };
    let mut grads = Vec::with_capacity(7);

    // MLP: out = mid + down(silu(gate) · up).
    let act = swiglu(&saved.gate, &saved.up);
    let mut dact = vec![0f32; rows * inter];
    let gd = back(Target::DownProj, &act, &dout, &mut dact, false);
    drop(act);
    let mut dup = vec![0f32; rows * inter];
    swiglu_backward(&mut dact, &mut dup, &saved.gate, &saved.up);
    let n2 = normed(&saved.mid, &saved.inv2, &l.norm2);
    let mut dn2 = vec![0f32; rows * hidden];
    let gg = back(Target::GateProj, &n2, &dact, &mut dn2, false);
    let gu = back(Target::UpProj, &n2, &dup, &mut dn2, true);
    drop((n2, dact, dup));
    let mut dmid = dout;
    rms_backward_add(&mut dmid, &dn2, &saved.mid, &saved.inv2, &l.norm2);
    drop(dn2);

    // Attention: mid = x + o_proj(softmax(q kᵀ / √d + mask) v).
    let mut dattn = vec![0f32; rows * hidden];
    let go = back(Target::OProj, &saved.attn, &dmid, &mut dattn, false);
    let (mut dq, mut dk, dv) = attention_backward(&saved, &dattn, g);
    drop(dattn);
    rope(&mut dq, hidden, g, -1.0);
    rope(&mut dk, g.kv_width(), g, -1.0);
    let n1 = normed(&saved.x, &saved.inv1, &l.norm1);
    let mut dn1 = vec![0f32; rows * hidden];
    let gq = back(Target::QProj, &n1, &dq, &mut dn1, false);
    let gk = back(Target::KProj, &n1, &dk, &mut dn1, true);
    let gv = back(Target::VProj, &n1, &dv, &mut dn1, true);
    drop(n1);
    let mut dx = dmid;
    rms_backward_add(&mut dx, &dn1, &saved.x, &saved.inv1, &l.norm1);
    for (t, pair) in [
        (Target::DownProj, gd),
        (Target::OProj, go),
        (Target::GateProj, gg),
        (Target::UpProj, gu),
        (Target::QProj, gq),
        (Target::KProj, gk),
        (Target::VProj, gv),
    ] {
        if let Some(pair) = pair {
            grads.push((t, pair));
        }
    }
    (dx, grads)
}

impl QloraModel {
    /// Layer `index` on the host: weights dequantized now into `buffers` (one per projection, reused
    /// from layer to layer: no allocation or page faults for the 100-odd MB each pass dequantizes), the
    /// adapter's factors borrowed.
    fn host_layer<'a>(
        &self,
        index: usize,
        adapter: &'a Adapter,
        buffers: &'a mut [Vec<f32>; 7],
    ) -> Result<Layer<'a>> {
        let frozen = &self.layers[index];
        let scale = adapter.config.scale() as f32;
        for (f, buffer) in frozen.linears.iter().zip(buffers.iter_mut()) {
            f.weight.dequantize_into(buffer)?;
        }
        let mut proj = Vec::with_capacity(7);
        for ((t, f), weight) in Target::ALL.into_iter().zip(&frozen.linears).zip(&*buffers) {
            let [out, inp] = f.weight.dims();
            let lora = adapter
                .weights
                .get(&(index, t))
                .map(|pair| Factors::new(&pair.a, &pair.b, adapter.config.r, scale));
            proj.push(Proj {
                weight,
                bias: f.bias.clone().map(to_vec).transpose()?,
                out,
                inp,
                lora,
            });
        }
        Ok(Layer {
            norm1: to_vec(frozen.input_layernorm.clone())?,
            norm2: to_vec(frozen.post_attention_layernorm.clone())?,
            proj,
        })
    }

    /// [`QloraModel::loss_and_grads`] with stored activations, on host buffers (see the module docs).
    pub(super) fn grads_on_host(
        &self,
        adapter: &Adapter,
        layout: &Layout,
        dropout: Option<Dropout>,
    ) -> Result<StepGrads> {
        let c = &self.config;
        let d = c.head_dim();
        let positions: Vec<usize> = layout.positions.iter().flatten().copied().collect();
        let used = positions.iter().max().map_or(0, |p| p + 1);
        let (cos, sin) = rope_tables(d, c.rope_theta, used);
        let g = Geometry {
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
        let rows = g.rows();
        let mut clock = StepClock::start();
        let mut x = to_vec(self.embed_tokens.rows(&layout.ids, &self.device))?;
        let mut saved = Vec::with_capacity(self.layers.len());
        let mut buffers: [Vec<f32>; 7] = Default::default();
        for l in 0..self.layers.len() {
            let layer = self.host_layer(l, adapter, &mut buffers)?;
            let masks = Target::ALL.map(|t| {
                let inp = t.shape(c)[1];
                dropout
                    .filter(|d| d.p > 0.0 && adapter.weights.contains_key(&(l, t)))
                    .map(|d| DropMask::new(d, l, t, rows, inp))
            });
            let (next, kept) = forward_layer(&layer, masks, x, &g);
            saved.push(kept);
            x = next;
        }
        clock.forward_done();
        let (loss, mut grad) = self.head_on_host(&x, layout)?;
        drop(x);
        clock.head_done();
        let mut grads = BTreeMap::new();
        for l in (0..self.layers.len()).rev() {
            let kept = saved
                .pop()
                .ok_or_else(|| ModelError::Input("a layer's activations are missing".into()))?;
            let layer = self.host_layer(l, adapter, &mut buffers)?;
            let (dx, pairs) = backward_layer(&layer, kept, grad, &g);
            for (t, pair) in pairs {
                grads.insert((l, t), pair);
            }
            grad = dx;
        }
        clock.log("host");
        Ok(StepGrads { loss, grads })
    }

    /// Final norm, LM head and chunked cross-entropy on the last layer's output `x` (`[T, hidden]`):
    /// the loss and the gradient at `x`.
    fn head_on_host(&self, x: &[f32], layout: &Layout) -> Result<(LossSum, Vec<f32>)> {
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
