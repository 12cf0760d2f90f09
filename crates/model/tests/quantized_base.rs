//! A base held in int8 or NF4 (`Model::quantize_base`, `supportlm serve --base-quant`): the Burn layers
//! and the decode kernels see the same weights (the trainer's codes), greedy decoding agrees with the
//! Burn forward, adapters attach to it and merging into it is refused.

use supportlm_model::config::{Architecture, ModelConfig};
use supportlm_model::decode::DecodeState;
use supportlm_model::generate::{generate, GenerateOptions};
use supportlm_model::llama::{to_vec, StepInput};
use supportlm_model::lora::{Adapter, LoraConfig, Target};
use supportlm_model::weight::BaseWeight;
use supportlm_model::{default_device, tiny, Model};
use supportlm_quant::{BaseQuant, Int8Matrix, Nf4Tensor};

/// The tiny config widened so that rows are whole NF4 blocks (64 values): the NF4 decode kernel runs.
fn wide(arch: Architecture) -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        intermediate_size: 128,
        ..tiny::config(arch)
    }
}

fn logits_last(m: &Model, prompts: &[Vec<u32>]) -> (Vec<f32>, DecodeState) {
    let mut cache = m.llama.new_cache(prompts.len());
    let out = m
        .llama
        .forward_last(&StepInput::dense(prompts.to_vec()), &mut cache)
        .unwrap();
    let state = DecodeState::from_cache(&cache, &m.llama.config).unwrap();
    (to_vec(out).unwrap(), state)
}

#[test]
fn a_quantized_base_decodes_as_its_burn_forward_computes() {
    let device = default_device();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for config in [tiny::config(arch), wide(arch)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            tiny::write_gguf(&path, &config, 5).unwrap();
            let plain = Model::load(&path, &device).unwrap();
            for quant in [BaseQuant::Int8, BaseQuant::Nf4] {
                let what = format!("{arch:?} hidden {} {quant}", config.hidden_size);
                let m = Model::load(&path, &device)
                    .unwrap()
                    .quantize_base(quant)
                    .unwrap();
                assert_eq!(m.base_quant, quant);
                // The Burn layer holds the trainer's codes of the f32 weight.
                let f32_weight = plain.llama.layers[1].linear(Target::UpProj).weight.clone();
                let [rows, cols] = f32_weight.dims();
                let values = to_vec(f32_weight.tensor(&device)).unwrap();
                let want = match quant {
                    BaseQuant::Int8 => Int8Matrix::quantize(&values, rows, cols).dequantize(),
                    _ => Nf4Tensor::quantize(&values, &[rows, cols], true).dequantize(),
                };
                let held = &m.llama.layers[1].linear(Target::UpProj).weight;
                assert!(matches!(held, BaseWeight::Int8(_) | BaseWeight::Nf4(_)));
                assert!(held.resident_bytes() < 4 * rows * cols / 3, "{what}");
                assert_eq!(to_vec(held.tensor(&device)).unwrap(), want, "{what}");
                // Quantizing while loading gives the same base.
                let loaded = Model::load_as(&path, quant, &device).unwrap();
                let held_too = &loaded.llama.layers[1].linear(Target::UpProj).weight;
                assert_eq!(to_vec(held_too.tensor(&device)).unwrap(), want, "{what}");

                // One decode step over the quantized kernels equals the Burn forward of the same base,
                // and both differ from the f32 base by the quantization error.
                let prompts = vec![vec![1u32, 30, 31, 32], vec![1, 44, 45, 46]];
                let (_, mut state) = logits_last(&m, &prompts);
                let next = [50u32, 60];
                let fast = m
                    .decode_weights()
                    .unwrap()
                    .step(&next, &[true, true], &mut state)
                    .unwrap();
                let extended: Vec<Vec<u32>> = prompts
                    .iter()
                    .zip(next)
                    .map(|(p, t)| [p.as_slice(), &[t]].concat())
                    .collect();
                let (slow, _) = logits_last(&m, &extended);
                let (f32_logits, _) = logits_last(&plain, &extended);
                let vocab = config.vocab_size;
                let diff = |a: &[f32], b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max)
                };
                for row in 0..2 {
                    let burn = &slow[row * vocab..(row + 1) * vocab];
                    let d = diff(&fast[row], burn);
                    assert!(d < 1e-4, "{what} row {row}: decode differs by {d}");
                    let q = diff(&f32_logits[row * vocab..(row + 1) * vocab], burn);
                    assert!(q > 1e-6, "{what}: quantizing changed nothing");
                }
            }
        }
    }
}

#[test]
fn adapters_attach_to_a_quantized_base_but_do_not_merge_into_it() {
    let device = default_device();
    let config = wide(Architecture::Llama);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny::write_gguf(&path, &config, 9).unwrap();
    let base = Model::load(&path, &device)
        .unwrap()
        .quantize_base(BaseQuant::Nf4)
        .unwrap();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let mut adapter = Adapter::init(lora, &base.llama.config, "tiny", 3).unwrap();
    for p in adapter.weights.values_mut() {
        p.b.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (j % 7) as f32 * 0.03 - 0.09);
    }
    let attached = base.attach_adapter(adapter.clone()).unwrap();
    assert_eq!(attached.base_quant, BaseQuant::Nf4);
    let options = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let prompts = vec![vec![1u32, 40, 41, 42]];
    let run = |m: &Model| generate(m, &prompts, &options, &mut |_, _, _| {}).unwrap();
    assert_ne!(run(&attached), run(&base), "the adapter changed nothing");

    let merge = Model::load(&path, &device)
        .unwrap()
        .quantize_base(BaseQuant::Nf4)
        .unwrap()
        .merge_adapter(adapter.clone())
        .unwrap_err()
        .to_string();
    assert!(
        merge.contains("nf4 base") && merge.contains("attach"),
        "{merge}"
    );
    let late = attached
        .quantize_base(BaseQuant::Int8)
        .unwrap_err()
        .to_string();
    assert!(late.contains("before attaching"), "{late}");
}
