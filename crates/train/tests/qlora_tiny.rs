//! LoRA / QLoRA training maths on tiny random models: finite-difference gradient checks through f32,
//! int8 and NF4 bases, the loss against a plain full-logits computation, masking, dropout determinism,
//! and the memory footprint of each base format.

use burn::tensor::activation::log_softmax;
use supportlm_model::config::Architecture;
use supportlm_model::llama::{to_vec, StepInput};
use supportlm_model::lora::{attach, Adapter, LoraConfig, Target};
use supportlm_model::model::Checkpoint;
use supportlm_model::{default_device, tiny, Model};
use supportlm_quant::BaseQuant;
use supportlm_train::qlora::{Dropout, QloraModel, Sequence, StepPath};

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn tiny_model(arch: Architecture) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf");
    tiny::write_hf_dir(&path, &tiny::config(arch), 11, 1).unwrap();
    Fixture { _dir: dir, path }
}

fn qlora(f: &Fixture, quant: BaseQuant) -> QloraModel {
    let ck = Checkpoint::open(&f.path).unwrap();
    ck.with_source(|src| QloraModel::load(src, &ck.config, quant, &default_device()))
        .unwrap()
}

fn adapter(model: &QloraModel, seed: u64) -> Adapter {
    let mut a = Adapter::init(
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            ..Default::default()
        },
        &model.config,
        "tiny",
        seed,
    )
    .unwrap();
    // Non-zero B so that A receives gradient too.
    for (i, pair) in a.weights.values_mut().enumerate() {
        for (j, b) in pair.b.iter_mut().enumerate() {
            *b = (((i * 31 + j * 17) % 13) as f32 - 6.0) * 0.02;
        }
    }
    a
}

fn batch() -> Vec<Sequence> {
    let a: Vec<u32> = vec![1, 40, 41, 42, 43, 44, 45, 46, 2];
    let b: Vec<u32> = vec![1, 50, 60, 70, 2];
    vec![
        Sequence {
            loss_mask: a.iter().enumerate().map(|(i, _)| i >= 5).collect(),
            ids: a,
        },
        Sequence {
            loss_mask: b.iter().enumerate().map(|(i, _)| i >= 3).collect(),
            ids: b,
        },
    ]
}

#[test]
fn lora_gradients_match_finite_differences_through_every_base_format() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let f = tiny_model(arch);
        for quant in BaseQuant::ALL {
            let model = qlora(&f, quant);
            let adapter = adapter(&model, 5);
            let batch = batch();
            let step = model.loss_and_grads(&adapter, &batch, None).unwrap();
            assert_eq!(step.loss.tokens, 4 + 2);
            let loss_at = |a: &Adapter| model.loss(Some(a), &batch).unwrap().sum;
            assert!((loss_at(&adapter) - step.loss.sum).abs() < 1e-4);
            for (site, which, index) in [
                ((0, Target::QProj), 'A', 3),
                ((1, Target::VProj), 'B', 5),
                ((0, Target::DownProj), 'A', 17),
                ((1, Target::GateProj), 'B', 2),
                ((1, Target::OProj), 'A', 30),
            ] {
                let eps = 1e-2f32;
                let mut plus = adapter.clone();
                let mut minus = adapter.clone();
                fn value(
                    a: &mut Adapter,
                    site: (usize, Target),
                    which: char,
                    index: usize,
                ) -> &mut f32 {
                    let p = a.weights.get_mut(&site).unwrap();
                    if which == 'A' {
                        &mut p.a[index]
                    } else {
                        &mut p.b[index]
                    }
                }
                *value(&mut plus, site, which, index) += eps;
                *value(&mut minus, site, which, index) -= eps;
                let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps as f64);
                let g = &step.grads[&site];
                let analytic = if which == 'A' { g.a[index] } else { g.b[index] } as f64;
                let tol = 5e-4 + 5e-3 * numeric.abs();
                assert!(
                    (numeric - analytic).abs() < tol,
                    "{arch:?}/{quant}: d loss / d {site:?}.{which}[{index}] = {analytic}, finite difference {numeric}"
                );
            }
        }
    }
}

#[test]
fn loss_counts_only_masked_tokens_like_a_full_logits_computation() {
    let f = tiny_model(Architecture::Llama);
    let model = qlora(&f, BaseQuant::None);
    let adapter = adapter(&model, 9);
    let full = Model::load(&f.path, &default_device()).unwrap();
    let attached = attach(&full.llama, &adapter).unwrap();
    let mut expected = 0f64;
    for q in batch() {
        let mut cache = attached.new_cache(1);
        let h = attached
            .forward_hidden(&StepInput::dense(vec![q.ids.clone()]), &mut cache, None)
            .unwrap();
        let logp = to_vec(log_softmax(attached.logits(h), 2)).unwrap();
        let v = attached.config.vocab_size;
        for t in 1..q.ids.len() {
            if q.loss_mask[t] {
                expected -= logp[(t - 1) * v + q.ids[t] as usize] as f64;
            }
        }
    }
    let got = model.loss(Some(&adapter), &batch()).unwrap();
    assert!(
        (got.sum - expected).abs() < 1e-3,
        "{} vs {expected}",
        got.sum
    );

    // Tokens outside the mask do not matter: changing a prompt token's *target role* changes nothing,
    // and a batch whose masks are all off has no loss and zero gradients.
    let mut none = batch();
    for q in &mut none {
        q.loss_mask.iter_mut().for_each(|m| *m = false);
    }
    let step = model.loss_and_grads(&adapter, &none, None).unwrap();
    assert_eq!(step.loss.tokens, 0);
    assert!(step
        .grads
        .values()
        .all(|p| p.a.iter().chain(&p.b).all(|&g| g == 0.0)));
}

#[test]
fn dropout_is_deterministic_per_seed_and_changes_the_loss() {
    let f = tiny_model(Architecture::Llama);
    let model = qlora(&f, BaseQuant::Nf4);
    let adapter = adapter(&model, 2);
    let d = |seed| Some(Dropout { p: 0.3, seed });
    let a = model.loss_and_grads(&adapter, &batch(), d(1)).unwrap();
    let b = model.loss_and_grads(&adapter, &batch(), d(1)).unwrap();
    let c = model.loss_and_grads(&adapter, &batch(), d(2)).unwrap();
    let plain = model.loss_and_grads(&adapter, &batch(), None).unwrap();
    assert_eq!(a.loss.sum.to_bits(), b.loss.sum.to_bits());
    assert_eq!(a.grads, b.grads);
    assert_ne!(a.loss.sum, c.loss.sum);
    assert_ne!(a.loss.sum, plain.loss.sum);
}

#[test]
fn footprint_shrinks_with_quantization() {
    let f = tiny_model(Architecture::Llama);
    let none = qlora(&f, BaseQuant::None).footprint();
    let int8 = qlora(&f, BaseQuant::Int8).footprint();
    let nf4 = qlora(&f, BaseQuant::Nf4).footprint();
    assert_eq!(none.bits_per_linear_param(), 32.0);
    assert!(int8.bits_per_linear_param() > 8.0 && int8.bits_per_linear_param() < 9.5);
    assert!(
        nf4.bits_per_linear_param() > 4.1 && nf4.bits_per_linear_param() < 4.6,
        "{}",
        nf4.bits_per_linear_param()
    );
    assert!(nf4.total_bytes() < int8.total_bytes() && int8.total_bytes() < none.total_bytes());
}

#[test]
fn full_fine_tuning_gradients_match_finite_differences() {
    // llama: tied embeddings (head gradient added to the embedding rows); qwen2: untied head, q/k/v biases.
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let f = tiny_model(arch);
        let mut model = qlora(&f, BaseQuant::None);
        let batch = batch();
        let step = model.full_loss_and_grads(&batch).unwrap();
        assert!((model.loss(None, &batch).unwrap().sum - step.loss.sum).abs() < 1e-4);
        let params = model.full_parameters();
        assert_eq!(step.grads.len(), params.len());
        let hidden = model.config.hidden_size;
        let mut probes: Vec<(&str, usize)> = vec![
            ("model.embed_tokens.weight", 42 * hidden + 3), // a token of the batch
            ("model.embed_tokens.weight", 7 * hidden + 1),  // only reached through the tied head
            ("model.norm.weight", 5),
            ("model.layers.0.input_layernorm.weight", 2),
            ("model.layers.1.post_attention_layernorm.weight", 9),
            ("model.layers.0.self_attn.q_proj.weight", 37),
            ("model.layers.1.mlp.down_proj.weight", 101),
            ("model.layers.1.self_attn.o_proj.weight", 12),
        ];
        if arch == Architecture::Qwen2 {
            probes.push(("model.layers.0.self_attn.k_proj.bias", 1));
            probes.push(("lm_head.weight", 45 * hidden + 4));
        }
        for (name, index) in probes {
            let i = params.iter().position(|p| p.name == name).unwrap();
            let original = model.full_parameter(i).unwrap();
            let eps = 1e-2f32;
            let mut at = |delta: f32| {
                let mut v = original.clone();
                v[index] += delta;
                model.set_full_parameter(i, v).unwrap();
                model.loss(None, &batch).unwrap().sum
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            model.set_full_parameter(i, original).unwrap();
            let analytic = step.grads[i][index] as f64;
            let tol = 5e-4 + 5e-3 * numeric.abs();
            assert!(
                (numeric - analytic).abs() < tol,
                "{arch:?}: d loss / d {name}[{index}] = {analytic}, finite difference {numeric}"
            );
        }
    }
}

#[test]
fn full_fine_tuning_needs_an_f32_base_and_checks_sizes() {
    let f = tiny_model(Architecture::Llama);
    let nf4 = qlora(&f, BaseQuant::Nf4);
    let err = nf4.full_loss_and_grads(&batch()).unwrap_err().to_string();
    assert!(err.contains("base_quant none"), "{err}");
    let mut model = qlora(&f, BaseQuant::None);
    let err = model
        .set_full_parameter(0, vec![0.0; 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.embed_tokens.weight"), "{err}");
    let n = model.full_parameters().len();
    assert!(model.full_parameter(n).is_err());
}

/// Three sequences sharing a 30-token prompt prefix; one is predicted from the prefix's last token.
fn shared_prefix_batch() -> Vec<Sequence> {
    let prefix: Vec<u32> = (100..130).collect();
    [
        vec![7u32, 8, 9, 10],
        vec![11, 12, 13, 14, 15, 16],
        vec![17, 18, 19],
    ]
    .into_iter()
    .enumerate()
    .map(|(k, tail)| {
        let ids: Vec<u32> = prefix.iter().chain(&tail).copied().collect();
        let n = ids.len();
        let first_target = if k == 2 { prefix.len() } else { n - 2 };
        Sequence {
            loss_mask: (0..n).map(|i| i >= first_target).collect(),
            ids,
        }
    })
    .collect()
}

#[test]
fn packing_around_a_shared_prefix_gives_the_padded_losses_and_gradients() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let f = tiny_model(arch);
        let mut model = qlora(&f, BaseQuant::None);
        let adapter = adapter(&model, 3);
        let batch = shared_prefix_batch();
        let dropout = Some(Dropout { p: 0.0, seed: 1 });
        model.pack = true;
        let packed = model.loss_and_grads(&adapter, &batch, dropout).unwrap();
        let packed_full = model.full_loss_and_grads(&batch).unwrap();
        let packed_val = model.loss(Some(&adapter), &batch).unwrap();
        model.pack = false;
        let padded = model.loss_and_grads(&adapter, &batch, dropout).unwrap();
        let padded_full = model.full_loss_and_grads(&batch).unwrap();
        let padded_val = model.loss(Some(&adapter), &batch).unwrap();
        assert_eq!(packed.loss.tokens, 2 + 2 + 3);
        assert_eq!(packed.loss.tokens, padded.loss.tokens);
        assert!((packed.loss.sum - padded.loss.sum).abs() < 1e-4);
        assert!((packed_val.sum - padded_val.sum).abs() < 1e-4);
        assert!((packed_full.loss.sum - padded_full.loss.sum).abs() < 1e-4);
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff < 1e-4 * scale.max(1.0),
                "{arch:?} {what}: max diff {diff} (scale {scale})"
            );
        };
        for (site, g) in &packed.grads {
            close(&g.a, &padded.grads[site].a, &format!("{site:?} A"));
            close(&g.b, &padded.grads[site].b, &format!("{site:?} B"));
        }
        for (i, (a, b)) in packed_full.grads.iter().zip(&padded_full.grads).enumerate() {
            close(a, b, &format!("full parameter {i}"));
        }
    }
}

#[test]
fn the_hand_written_backwards_give_the_recomputed_autodiff_gradients() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let f = tiny_model(arch);
        for quant in BaseQuant::ALL {
            let mut model = qlora(&f, quant);
            assert_eq!(
                model.effective_step_path(),
                StepPath::Host,
                "the CPU backend runs the step on the host"
            );
            let adapter = adapter(&model, 9);
            let dropout = Some(Dropout { p: 0.1, seed: 4 });
            for (pack, batch) in [(false, batch()), (true, shared_prefix_batch())] {
                model.pack = pack;
                model.step_path = StepPath::Recompute;
                let recomputed = model.loss_and_grads(&adapter, &batch, dropout).unwrap();
                for path in [StepPath::Host, StepPath::Saved] {
                    model.step_path = path;
                    let stored = model.loss_and_grads(&adapter, &batch, dropout).unwrap();
                    let what = format!("{arch:?}/{quant}/pack {pack}/{path:?}");
                    assert_eq!(stored.loss.tokens, recomputed.loss.tokens, "{what}");
                    assert!(
                        (stored.loss.sum - recomputed.loss.sum).abs() < 1e-4,
                        "{what}: loss {} vs {}",
                        stored.loss.sum,
                        recomputed.loss.sum
                    );
                    assert_eq!(
                        stored.grads.keys().collect::<Vec<_>>(),
                        recomputed.grads.keys().collect::<Vec<_>>()
                    );
                    for (site, g) in &stored.grads {
                        let r = &recomputed.grads[site];
                        for (x, y, which) in [(&g.a, &r.a, 'A'), (&g.b, &r.b, 'B')] {
                            assert_eq!(x.len(), y.len(), "{what} {site:?}.{which}");
                            let scale = y.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                            let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                            assert!(
                                diff < 1e-4 * scale.max(1.0),
                                "{what} {site:?}.{which}: max diff {diff} (scale {scale})"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn factors_on_the_device_give_the_host_step_and_round_trip() {
    use supportlm_train::qlora::DeviceFactors;
    let f = tiny_model(Architecture::Llama);
    let mut model = qlora(&f, BaseQuant::Nf4);
    let adapter = adapter(&model, 5);
    let factors = DeviceFactors::upload(&adapter, model.device());
    let mut back = adapter.clone();
    back.weights.values_mut().for_each(|p| p.a.fill(0.0));
    factors.download_into(&mut back).unwrap();
    assert_eq!(
        back.weights, adapter.weights,
        "upload and download are exact"
    );

    let dropout = Some(Dropout { p: 0.1, seed: 4 });
    model.step_path = StepPath::Saved;
    let host = model.loss_and_grads(&adapter, &batch(), dropout).unwrap();
    let (loss, flat) = model
        .device_loss_and_grads(&factors, &batch(), dropout)
        .unwrap();
    assert_eq!(loss, host.loss);
    let flat = supportlm_model::llama::to_vec(flat).unwrap();
    assert_eq!(factors.split(&flat).unwrap(), host.grads, "same layout");
    let want: usize = adapter
        .weights
        .values()
        .map(|p| p.a.len() + p.b.len())
        .sum();
    assert_eq!(flat.len(), want);
}
