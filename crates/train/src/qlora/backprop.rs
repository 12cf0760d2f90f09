//! Hand-written backpropagation through one decoder layer with LoRA on a frozen base.
//!
//! [`forward_saving`] runs a layer like `DecoderLayer::forward` (attention with its probabilities
//! materialized instead of the fused kernel) and keeps what the backward pass reads: the layer input,
//! the RMS factors, the rotated queries and keys, the values, the attention probabilities, the
//! attention output, the residual between the two blocks, the MLP's gate and up projections and every
//! adapter's low-rank activation. [`backward`] then gives the gradient at the layer's input and
//! every adapter factor's gradient from those, without running the layer again and without autodiff.
//! The frozen weights and the dropout masks are not kept: the caller rebuilds the layer (dequantizes
//! again, draws the same masks from their counters) for the backward pass.
//!
//! Shapes: `T = b·s` rows; queries are grouped per KV head as `[b, kv_heads, rep·s, d]` so that keys
//! and values are never repeated (the gradients of keys and values sum over the group in the matmul).

use burn::tensor::Tensor;

use super::pointwise::{sigmoid, softmax_last};
use supportlm_model::config::ModelConfig;
use supportlm_model::error::Result;
use supportlm_model::llama::Rope;

use super::dropout::TrainLayer;
use supportlm_model::lora::Target;

/// What the backward pass of one layer reads (see the module docs).
pub(super) struct Saved {
    x: Tensor<2>,
    inv1: Tensor<2>,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    probs: Tensor<4>,
    attn: Tensor<2>,
    mid: Tensor<2>,
    inv2: Tensor<2>,
    gate: Tensor<2>,
    up: Tensor<2>,
    /// `dropout(x) · Aᵀ` of each adapted projection, in [`Target::ALL`] order.
    lows: [Option<Tensor<2>>; 7],
}

/// The gradients of one adapter pair: `(dA [r, in], dB [out, r])`.
pub(super) type PairGrad = (Tensor<2>, Tensor<2>);

/// Shapes and the RoPE tables / mask of the batch, shared by every layer.
pub(super) struct Geometry<'a> {
    pub b: usize,
    pub s: usize,
    pub rope: &'a Rope,
    pub cos: &'a Tensor<4>,
    pub sin: &'a Tensor<4>,
    /// `-sin`: RoPE's inverse rotation, which is its backward.
    pub sin_neg: &'a Tensor<4>,
    /// The additive mask repeated for the grouped query rows, `[1, 1, rep·s, s]`.
    pub grouped_mask: &'a Tensor<4>,
}

fn rms(x: &Tensor<2>, weight: &Tensor<1>, eps: f64) -> (Tensor<2>, Tensor<2>) {
    let inv = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    (normed(x, &inv, weight), inv)
}

/// `x · inv · w`: the RMSNorm output from its kept factor (forward, and again in backward).
fn normed(x: &Tensor<2>, inv: &Tensor<2>, weight: &Tensor<1>) -> Tensor<2> {
    x.clone() * inv.clone() * weight.clone().unsqueeze_dim(0)
}

/// Gradient at `x` of `n = x · inv · w` (with `inv = 1/sqrt(mean(x²) + eps)`) given `dn`.
fn rms_backward(dn: Tensor<2>, x: &Tensor<2>, inv: &Tensor<2>, weight: &Tensor<1>) -> Tensor<2> {
    let g = dn * weight.clone().unsqueeze_dim(0);
    let mean_gx = (g.clone() * x.clone()).mean_dim(1);
    g * inv.clone() - x.clone() * inv.clone().powi_scalar(3) * mean_gx
}

/// `y = x Wᵀ + b + s · B(A(dropout(x)))`, and the low-rank activation `dropout(x) Aᵀ` when adapted.
fn linear_forward(layer: &TrainLayer, t: Target, x: &Tensor<2>) -> (Tensor<2>, Option<Tensor<2>>) {
    let l = layer.base.linear(t);
    let mut y = x.clone().matmul(l.weight.tensor(&x.device()).transpose());
    if let Some(bias) = &l.bias {
        y = y + bias.clone().unsqueeze_dim(0);
    }
    let Some(lora) = layer.lora(t) else {
        return (y, None);
    };
    let low = lora
        .dropped(x.clone())
        .matmul(lora.delta.a.clone().transpose());
    let y = y + (low.clone() * lora.delta.scale).matmul(lora.delta.b.clone().transpose());
    (y, Some(low))
}

/// Gradient at the input of [`linear_forward`] and, when adapted, of its `A` and `B`.
fn linear_backward(
    layer: &TrainLayer,
    t: Target,
    x: &Tensor<2>,
    low: Option<Tensor<2>>,
    dy: Tensor<2>,
) -> (Tensor<2>, Option<PairGrad>) {
    let dx = dy
        .clone()
        .matmul(layer.base.linear(t).weight.tensor(&dy.device()));
    let (Some(lora), Some(low)) = (layer.lora(t), low) else {
        return (dx, None);
    };
    let scale = lora.delta.scale;
    let db = dy.clone().transpose().matmul(low) * scale;
    let dlow = dy.matmul(lora.delta.b.clone()) * scale;
    let da = dlow.clone().transpose().matmul(lora.dropped(x.clone()));
    let mut dx_low = dlow.matmul(lora.delta.a.clone());
    if let Some(mask) = &lora.mask {
        dx_low = dx_low * mask.clone();
    }
    (dx + dx_low, Some((da, db)))
}

/// Runs `layer` on `x` (`[T, hidden]`) and returns its output and what [`backward`] needs.
pub(super) fn forward_saving(
    c: &ModelConfig,
    layer: &TrainLayer,
    x: Tensor<2>,
    g: &Geometry,
) -> Result<(Tensor<2>, Saved)> {
    let (b, s) = (g.b, g.s);
    let (h, kvh, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
    let rep = h / kvh;
    let eps = c.rms_norm_eps;

    let (n1, inv1) = rms(&x, &layer.base.input_layernorm.weight, eps);
    let (q, lq) = linear_forward(layer, Target::QProj, &n1);
    let (k, lk) = linear_forward(layer, Target::KProj, &n1);
    let (v, lv) = linear_forward(layer, Target::VProj, &n1);
    drop(n1);
    let heads = |t: Tensor<2>, n: usize| t.reshape([b, s, n, d]).swap_dims(1, 2);
    let q = g
        .rope
        .apply(heads(q, h), g.cos, g.sin)
        .reshape([b, kvh, rep * s, d]);
    let k = g.rope.apply(heads(k, kvh), g.cos, g.sin);
    let v = heads(v, kvh);
    let scale = (d as f64).powf(-0.5);
    let scores = q.clone().matmul(k.clone().transpose()) * scale + g.grouped_mask.clone();
    let probs = softmax_last(scores)?;
    let attn = probs
        .clone()
        .matmul(v.clone())
        .reshape([b, h, s, d])
        .swap_dims(1, 2)
        .reshape([b * s, h * d]);
    let (o, lo) = linear_forward(layer, Target::OProj, &attn);
    let mid = x.clone() + o;

    let (n2, inv2) = rms(&mid, &layer.base.post_attention_layernorm.weight, eps);
    let (gate, lg) = linear_forward(layer, Target::GateProj, &n2);
    let (up, lu) = linear_forward(layer, Target::UpProj, &n2);
    drop(n2);
    let silu_gate = gate.clone() * sigmoid(gate.clone())?;
    let (down, ld) = linear_forward(layer, Target::DownProj, &(silu_gate * up.clone()));
    let out = mid.clone() + down;
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
        lows: [lq, lk, lv, lo, lg, lu, ld],
    };
    Ok((out, saved))
}

/// Back-propagates `dout` (gradient at the layer's output, `[T, hidden]`) through the layer that
/// [`forward_saving`] ran (`layer` rebuilt with the same weights, factors and masks): the gradient at
/// its input and each adapted projection's `(dA, dB)`, in [`Target::ALL`] order.
pub(super) fn backward(
    c: &ModelConfig,
    layer: &TrainLayer,
    saved: Saved,
    dout: Tensor<2>,
    g: &Geometry,
) -> Result<(Tensor<2>, Vec<(Target, PairGrad)>)> {
    let (b, s) = (g.b, g.s);
    let (h, kvh, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
    let rep = h / kvh;
    let Saved {
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
    } = saved;
    let [lq, lk, lv, lo, lg, lu, ld] = lows;
    let mut grads = Vec::with_capacity(7);
    let mut keep = |t: Target, pair: Option<PairGrad>| {
        if let Some(p) = pair {
            grads.push((t, p));
        }
    };

    // MLP: out = mid + down(silu(gate) · up).
    let sg = sigmoid(gate.clone())?;
    let silu_gate = gate.clone() * sg.clone();
    let act = silu_gate.clone() * up.clone();
    let (dact, gd) = linear_backward(layer, Target::DownProj, &act, ld, dout.clone());
    drop(act);
    keep(Target::DownProj, gd);
    let dup = dact.clone() * silu_gate;
    // silu'(g) = σ(g) · (1 + g · (1 − σ(g))).
    let dgate = dact * up * sg.clone() * ((sg.neg() + 1.0) * gate + 1.0);
    let n2 = normed(&mid, &inv2, &layer.base.post_attention_layernorm.weight);
    let (dn2_gate, gg) = linear_backward(layer, Target::GateProj, &n2, lg, dgate);
    let (dn2_up, gu) = linear_backward(layer, Target::UpProj, &n2, lu, dup);
    drop(n2);
    let dmid = dout
        + rms_backward(
            dn2_gate + dn2_up,
            &mid,
            &inv2,
            &layer.base.post_attention_layernorm.weight,
        );
    drop(mid);

    // Attention: mid = x + o_proj(softmax(q kᵀ / √d + mask) v).
    let (dattn, go) = linear_backward(layer, Target::OProj, &attn, lo, dmid.clone());
    drop(attn);
    let dattn = dattn
        .reshape([b, s, h, d])
        .swap_dims(1, 2)
        .reshape([b, kvh, rep * s, d]);
    let dv = probs.clone().transpose().matmul(dattn.clone());
    let dprobs = dattn.matmul(v.transpose());
    let row_dot = (dprobs.clone() * probs.clone()).sum_dim(3);
    let dscores = probs * (dprobs - row_dot) * (d as f64).powf(-0.5);
    let dq = dscores.clone().matmul(k);
    let dk = dscores.transpose().matmul(q);
    let rows = |t: Tensor<4>, n: usize| t.swap_dims(1, 2).reshape([b * s, n * d]);
    let dq = rows(g.rope.apply(dq.reshape([b, h, s, d]), g.cos, g.sin_neg), h);
    let dk = rows(g.rope.apply(dk, g.cos, g.sin_neg), kvh);
    let dv = rows(dv, kvh);
    let n1 = normed(&x, &inv1, &layer.base.input_layernorm.weight);
    let (dn1_q, gq) = linear_backward(layer, Target::QProj, &n1, lq, dq);
    let (dn1_k, gk) = linear_backward(layer, Target::KProj, &n1, lk, dk);
    let (dn1_v, gv) = linear_backward(layer, Target::VProj, &n1, lv, dv);
    drop(n1);
    let dx = dmid
        + rms_backward(
            dn1_q + dn1_k + dn1_v,
            &x,
            &inv1,
            &layer.base.input_layernorm.weight,
        );
    keep(Target::OProj, go);
    keep(Target::GateProj, gg);
    keep(Target::UpProj, gu);
    keep(Target::QProj, gq);
    keep(Target::KProj, gk);
    keep(Target::VProj, gv);
    Ok((dx, grads))
}
