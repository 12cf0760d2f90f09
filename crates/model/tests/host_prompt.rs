//! The host prompt path (`supportlm_model::host`) against the tensor forward it replaces on the CPU:
//! same hidden states after every layer and the same KV cache, for padded batches (short, and longer
//! than one block of queries), a second pass over a filled cache and a tree-masked scoring pass; llama and qwen2 (q/k/v biases), f32, int8 and NF4
//! bases, with and without an attached adapter.

use burn::tensor::Tensor;
use supportlm_model::cache::KvCache;
use supportlm_model::config::Architecture;
use supportlm_model::llama::{to_vec, Llama, PromptPath, StepInput};
use supportlm_model::loader::load_llama;
use supportlm_model::lora::{attach, Adapter, LoraConfig};
use supportlm_model::{default_device, tiny, BaseQuant};

/// The largest difference between `a` and `b` relative to `a`'s largest magnitude (at least 1).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = a.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn values(t: &Tensor<3>) -> Vec<f32> {
    to_vec(t.clone()).unwrap()
}

fn same_caches(a: &KvCache, b: &KvCache, what: &str) {
    assert_eq!(a.valid, b.valid, "{what}: valid");
    assert_eq!(a.next_pos, b.next_pos, "{what}: next positions");
    for (i, (la, lb)) in a.layers.iter().zip(&b.layers).enumerate() {
        for (x, y) in [(&la.k, &lb.k), (&la.v, &lb.v)] {
            let (x, y) = (x.clone().unwrap(), y.clone().unwrap());
            assert_eq!(x.dims(), y.dims(), "{what}: layer {i} cache shape");
            let d = rel_diff(&to_vec(x).unwrap(), &to_vec(y).unwrap());
            assert!(d < 1e-5, "{what}: layer {i} cache differs by {d}");
        }
    }
}

/// Runs `pass` on both paths (each with its own copy of `caches`) and compares the hidden states
/// after every layer, the final ones and the caches.
fn agree(
    llama: &Llama,
    caches: (&mut KvCache, &mut KvCache),
    what: &str,
    pass: impl Fn(&Llama, &mut KvCache, &mut Vec<Tensor<3>>) -> Tensor<3>,
) {
    let mut host = llama.clone();
    host.prompt_path = PromptPath::Host;
    let mut tensors = llama.clone();
    tensors.prompt_path = PromptPath::Tensors;
    let (mut seen_h, mut seen_t) = (Vec::new(), Vec::new());
    let out_h = pass(&host, caches.0, &mut seen_h);
    let out_t = pass(&tensors, caches.1, &mut seen_t);
    assert_eq!(out_h.dims(), out_t.dims(), "{what}: output shape");
    assert_eq!(seen_h.len(), seen_t.len(), "{what}: collected states");
    for (i, (h, t)) in seen_h.iter().zip(&seen_t).enumerate() {
        let d = rel_diff(&values(t), &values(h));
        assert!(
            d < 1e-5,
            "{what}: residual stream after layer {i} differs by {d}"
        );
    }
    let d = rel_diff(&values(&out_t), &values(&out_h));
    assert!(d < 1e-4, "{what}: final hidden states differ by {d}");
    same_caches(caches.0, caches.1, what);
}

fn adapter(llama: &Llama) -> Adapter {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let mut a = Adapter::init(config, &llama.config, "tiny", 5).unwrap();
    for (i, p) in a.weights.values_mut().enumerate() {
        p.b.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = ((i + 3 * j) % 7) as f32 * 0.03 - 0.09);
    }
    a
}

#[test]
fn host_prompt_pass_matches_the_tensor_forward() {
    let device = default_device();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let config = tiny::config(arch);
        let base = load_llama(&tiny::RandomSource::new(&config, 11), &config, &device).unwrap();
        for quant in [BaseQuant::None, BaseQuant::Int8, BaseQuant::Nf4] {
            let mut llama = base.clone();
            llama.quantize_linears(quant).unwrap();
            for adapted in [false, true] {
                let llama = if adapted {
                    attach(&llama, &adapter(&llama)).unwrap()
                } else {
                    llama.clone()
                };
                let what = format!("{arch:?} {quant} adapter {adapted}");

                // A left-padded batch of two, then a second pass over the filled caches.
                let prompt = StepInput {
                    tokens: vec![
                        vec![0, 0, 5, 40, 41, 42, 7],
                        vec![9, 50, 51, 52, 53, 54, 55],
                    ],
                    valid: vec![
                        vec![false, false, true, true, true, true, true],
                        vec![true; 7],
                    ],
                };
                let (mut ch, mut ct) = (llama.new_cache(2), llama.new_cache(2));
                agree(
                    &llama,
                    (&mut ch, &mut ct),
                    &format!("{what}, prompt"),
                    |m, c, seen| m.forward_hidden(&prompt, c, Some(seen)).unwrap(),
                );
                let next = StepInput::dense(vec![vec![60, 61, 62], vec![70, 71, 72]]);
                agree(
                    &llama,
                    (&mut ch, &mut ct),
                    &format!("{what}, second pass"),
                    |m, c, seen| m.forward_hidden(&next, c, Some(seen)).unwrap(),
                );

                // Longer than one block of queries (64), padded: several attention tasks per head.
                let long = StepInput {
                    tokens: (0..2)
                        .map(|r| (0..150u32).map(|i| (i * 7 + r * 3) % 260 + 3).collect())
                        .collect(),
                    valid: vec![(0..150).map(|i| i >= 20).collect(), vec![true; 150]],
                };
                let (mut lh, mut lt) = (llama.new_cache(2), llama.new_cache(2));
                agree(
                    &llama,
                    (&mut lh, &mut lt),
                    &format!("{what}, long"),
                    |m, c, seen| m.forward_hidden(&long, c, Some(seen)).unwrap(),
                );

                // A scoring tree after a prompt: two branches of two tokens over a shared first one.
                let (mut ph, mut pt) = (llama.new_cache(1), llama.new_cache(1));
                let shared = StepInput::dense(vec![vec![3, 30, 31, 32, 33]]);
                agree(
                    &llama,
                    (&mut ph, &mut pt),
                    &format!("{what}, tree prefix"),
                    |m, c, seen| m.forward_hidden(&shared, c, Some(seen)).unwrap(),
                );
                let tokens = [80u32, 81, 82, 90, 91];
                let positions = [5usize, 6, 7, 6, 7];
                let visible: Vec<Vec<bool>> = [
                    [true, false, false, false, false],
                    [true, true, false, false, false],
                    [true, true, true, false, false],
                    [true, false, false, true, false],
                    [true, false, false, true, true],
                ]
                .iter()
                .map(|r| r.to_vec())
                .collect();
                agree(
                    &llama,
                    (&mut ph, &mut pt),
                    &format!("{what}, tree"),
                    |m, c, _| m.forward_tree(&tokens, &positions, &visible, c).unwrap(),
                );
            }
        }
    }
}
