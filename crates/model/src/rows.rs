//! The decoder's row passes on host buffers (row-major `[rows, width]` activations), shared by the CPU
//! prompt pass (`llama/host.rs`) and the training step's host path (`supportlm-train`): RMSNorm, RoPE,
//! SwiGLU's product. Rows are split across rayon's threads; each row's values depend on that row
//! alone, so results do not depend on the thread count.

use rayon::prelude::*;
use supportlm_quant::kernels::dot;
use supportlm_quant::pointwise::swiglu_chunk;

/// Rows per rayon task in row loops.
pub const ROWS_PER_TASK: usize = 16;

/// RMSNorm of each row: returns `x · inv · w` and `inv = 1/sqrt(mean(x²) + eps)` per row.
pub fn rms(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let inv: Vec<f32> = x
        .par_chunks(n)
        .map(|x| 1.0 / (dot(x, x) / n as f32 + eps).sqrt())
        .collect();
    (normed(x, &inv, w), inv)
}

/// `x · inv · w` from a kept factor.
pub fn normed(x: &[f32], inv: &[f32], w: &[f32]) -> Vec<f32> {
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

/// Rotates the heads in the first `rotated` columns of each `width`-wide row (stacked queries and keys)
/// by the row's position, Hugging Face layout (pairs `(i, i + d/2)` of each `d`-wide head), with the
/// `[max_positions, d]` tables `cos` and `sin`; `sign = -1` rotates back (the backward of the rotation).
pub fn rope(
    rows: &mut [f32],
    width: usize,
    rotated: usize,
    d: usize,
    positions: &[usize],
    (cos, sin): (&[f32], &[f32]),
    sign: f32,
) {
    let half = d / 2;
    rows.par_chunks_mut(width)
        .zip(positions)
        .for_each(|(row, &pos)| {
            let cos = &cos[pos * d..(pos + 1) * d];
            let sin = &sin[pos * d..(pos + 1) * d];
            for head in row[..rotated].chunks_mut(d) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sign * sin[i];
                    x2[i] = b * cos[half + i] + a * sign * sin[half + i];
                }
            }
        });
}

/// `silu(gate) · up` from stacked `[gate | up]` rows (`[T, 2·inter]`): `[T, inter]`.
pub fn swiglu(gate_up: &[f32], inter: usize) -> Vec<f32> {
    let mut act = vec![0f32; gate_up.len() / 2];
    act.par_chunks_mut(inter * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * inter * ROWS_PER_TASK))
        .for_each(|(act, gu)| {
            for (a, gu) in act.chunks_mut(inter).zip(gu.chunks(2 * inter)) {
                let (g, u) = gu.split_at(inter);
                swiglu_chunk(a, g, u);
            }
        });
    act
}
