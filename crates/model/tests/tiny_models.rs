//! The Hugging Face and GGUF loading paths, batching, caching and scoring, on tiny random llama and qwen2
//! models written by the test itself.

use supportlm_model::config::Architecture;
use supportlm_model::generate::{generate, GenerateOptions};
use supportlm_model::llama::{to_vec, StepInput};
use supportlm_model::score::{encode_prefix, score_candidates, sequence_logprob};
use supportlm_model::{default_device, tiny, Model};

fn models(arch: Architecture) -> (tempfile::TempDir, Model, Model) {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny::config(arch);
    let hf = dir.path().join("hf");
    let gguf = dir.path().join("tiny.gguf");
    tiny::write_hf_dir(
        &hf,
        &config,
        7,
        if arch == Architecture::Qwen2 { 2 } else { 1 },
    )
    .unwrap();
    tiny::write_gguf(&gguf, &config, 7).unwrap();
    assert_eq!(
        hf.join("model.safetensors.index.json").exists(),
        arch == Architecture::Qwen2
    );
    let device = default_device();
    let a = Model::load(&hf, &device).unwrap();
    let b = Model::load(&gguf, &device).unwrap();
    (dir, a, b)
}

fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = m.llama.new_cache(1);
    let h = m
        .llama
        .forward_hidden(&StepInput::dense(vec![tokens.to_vec()]), &mut cache, None)
        .unwrap();
    to_vec(m.llama.logits(h)).unwrap()
}

#[test]
fn safetensors_and_gguf_give_identical_logits_for_llama_and_qwen2() {
    // The qwen2 model is written as two safetensors shards with an index file.
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (_dir, hf, gguf) = models(arch);
        assert_eq!(hf.llama.config.qkv_bias(), arch == Architecture::Qwen2);
        let text = "<|im_start|>user\nthe order 42 is late<|im_end|>";
        let ids = hf.tokenizer.encode(text, false).unwrap();
        assert_eq!(
            ids,
            gguf.tokenizer.encode(text, false).unwrap(),
            "{arch:?} tokenizers agree"
        );
        assert_eq!(ids[0], 1);
        assert_eq!(hf.tokenizer.decode(&ids).unwrap(), text);
        let (a, b) = (logits(&hf, &ids), logits(&gguf, &ids));
        let max = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-6, "{arch:?}: logits differ by {max}");
    }
}

#[test]
fn kv_cache_and_padded_batches_match_a_plain_forward() {
    let (_dir, m, _) = models(Architecture::Qwen2);
    let a: Vec<u32> = vec![5, 9, 40, 77, 3, 12];
    let b: Vec<u32> = vec![8, 100, 31];
    let vocab = m.llama.config.vocab_size;
    let full_a = logits(&m, &a);
    let full_b = logits(&m, &b);
    // Incremental: 4 tokens, then 2 more through the cache.
    let mut cache = m.llama.new_cache(1);
    m.llama
        .forward_last(&StepInput::dense(vec![a[..4].to_vec()]), &mut cache)
        .unwrap();
    let step = to_vec(
        m.llama
            .forward_last(&StepInput::dense(vec![a[4..].to_vec()]), &mut cache)
            .unwrap(),
    )
    .unwrap();
    let last_a = &full_a[(a.len() - 1) * vocab..];
    assert!(
        step.iter().zip(last_a).all(|(x, y)| (x - y).abs() < 1e-4),
        "cache"
    );
    // Left-padded batch of both prompts.
    let input = StepInput {
        tokens: vec![a.clone(), [vec![2, 2, 2], b.clone()].concat()],
        valid: vec![vec![true; 6], [vec![false; 3], vec![true; 3]].concat()],
    };
    let mut cache = m.llama.new_cache(2);
    let both = to_vec(m.llama.forward_last(&input, &mut cache).unwrap()).unwrap();
    let last_b = &full_b[(b.len() - 1) * vocab..];
    assert!(
        both[..vocab]
            .iter()
            .zip(last_a)
            .all(|(x, y)| (x - y).abs() < 1e-4),
        "row a"
    );
    assert!(
        both[vocab..]
            .iter()
            .zip(last_b)
            .all(|(x, y)| (x - y).abs() < 1e-4),
        "row b (padded)"
    );
}

#[test]
fn prefix_reuse_scores_equal_scoring_from_scratch() {
    let (_dir, m, _) = models(Architecture::Llama);
    let prefix: Vec<u32> = vec![1, 20, 21, 22, 23, 2];
    let item: Vec<u32> = vec![1, 50, 51, 52];
    let candidates: Vec<Vec<u32>> = vec![vec![60], vec![61, 62], vec![63, 64, 65, 2]];
    let cache = encode_prefix(&m, &prefix).unwrap();
    let reused = score_candidates(&m, &cache, &item, &candidates).unwrap();
    let context: Vec<u32> = prefix.iter().chain(&item).copied().collect();
    for (c, r) in candidates.iter().zip(&reused) {
        let scratch = sequence_logprob(&m, &context, c).unwrap();
        assert!((scratch - r).abs() < 1e-4, "{c:?}: {scratch} vs {r}");
    }
}

#[test]
fn batched_generation_matches_single_and_is_seeded() {
    let (_dir, m, _) = models(Architecture::Llama);
    let prompts = vec![vec![1u32, 30, 31, 32, 33], vec![1, 40]];
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let mut streamed = vec![String::new(); 2];
    let batch = generate(&m, &prompts, &opts, &mut |row, _, piece| {
        streamed[row].push_str(piece)
    })
    .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&m, std::slice::from_ref(p), &opts, &mut |_, _, _| {}).unwrap();
        assert_eq!(single[0].tokens, batch[i].tokens, "row {i}");
    }
    assert_eq!(streamed[0], batch[0].text);
    let mut sampled = opts.clone();
    sampled.sampling.temperature = 1.0;
    let x = generate(&m, &prompts, &sampled, &mut |_, _, _| {}).unwrap();
    let y = generate(&m, &prompts, &sampled, &mut |_, _, _| {}).unwrap();
    assert_eq!(x, y);
}

#[test]
fn wrong_shapes_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let mut config = tiny::config(Architecture::Llama);
    tiny::write_hf_dir(&hf, &config, 1, 1).unwrap();
    // Claim a wider FFN than the weights have.
    config.intermediate_size = 64;
    std::fs::write(
        hf.join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let e = Model::load(&hf, &default_device()).unwrap_err().to_string();
    assert!(
        e.contains("mlp.gate_proj.weight`: expected shape [64, 32], found [48, 32]"),
        "{e}"
    );
    let e = Model::load(&dir.path().join("nope.gguf"), &default_device())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nope.gguf") && e.contains("cargo xtask setup"),
        "{e}"
    );
    std::fs::write(dir.path().join("bad.gguf"), b"not a model at all").unwrap();
    let e = Model::load(&dir.path().join("bad.gguf"), &default_device())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn quantized_decode_path_matches_the_burn_forward() {
    use supportlm_model::decode::DecodeState;
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (_dir, hf, gguf) = models(arch);
        for m in [&hf, &gguf] {
            let vocab = m.llama.config.vocab_size;
            let prompts = [vec![1u32, 30, 31, 32, 33], vec![2, 2, 1, 40, 41]];
            let valid = vec![vec![true; 5], vec![false, false, true, true, true]];
            let mut cache = m.llama.new_cache(2);
            m.llama
                .forward_last(
                    &StepInput {
                        tokens: prompts.to_vec(),
                        valid: valid.clone(),
                    },
                    &mut cache,
                )
                .unwrap();
            let mut state = DecodeState::from_cache(&cache, &m.llama.config).unwrap();
            let next = [50u32, 60];
            let fast = m
                .decode_weights()
                .unwrap()
                .step(&next, &[true, true], &mut state)
                .unwrap();
            let slow = to_vec(
                m.llama
                    .forward_last(
                        &StepInput::dense(next.iter().map(|&t| vec![t]).collect()),
                        &mut cache,
                    )
                    .unwrap(),
            )
            .unwrap();
            for row in 0..2 {
                let max = fast[row]
                    .iter()
                    .zip(&slow[row * vocab..(row + 1) * vocab])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    max < 1e-4,
                    "{arch:?} row {row}: decode path differs by {max}"
                );
            }
        }
    }
}

#[test]
fn a_shared_prefix_kept_once_decodes_bit_for_bit_as_copies_per_row() {
    use supportlm_model::decode::DecodeState;
    let (_dir, m, _) = models(Architecture::Llama);
    let weights = m.decode_weights().unwrap();
    // A 6-token prefix repeated for 3 rows, then each row's own tokens (left-padded to one length).
    let prefix: Vec<u32> = vec![1, 30, 31, 32, 33, 34];
    let mut cache = m.llama.new_cache(1);
    m.llama
        .forward_last(&StepInput::dense(vec![prefix.clone()]), &mut cache)
        .unwrap();
    let mut cache = cache.repeat(3);
    m.llama
        .forward_last(
            &StepInput {
                tokens: vec![vec![2, 40, 41], vec![2, 2, 42], vec![43, 44, 45]],
                valid: vec![vec![true; 3], vec![false, false, true], vec![true; 3]],
            },
            &mut cache,
        )
        .unwrap();
    let mut copies = DecodeState::from_cache(&cache, &m.llama.config).unwrap();
    let mut shared = DecodeState::from_cache_shared(&cache, &m.llama.config, prefix.len()).unwrap();
    for (step, next) in [[50u32, 51, 52], [53, 54, 55], [56, 57, 58]]
        .iter()
        .enumerate()
    {
        // The middle row sits out the second step (padding fed, masked out).
        let active = [true, step != 1, true];
        let a = weights.step(next, &active, &mut copies).unwrap();
        let b = weights.step(next, &active, &mut shared).unwrap();
        assert_eq!(a, b, "step {step}: the logits differ");
    }
    // Positions past the prefix are not the same in every row: refused if said to be shared.
    let err =
        DecodeState::from_cache_shared(&cache, &m.llama.config, prefix.len() + 2).unwrap_err();
    assert!(err.to_string().contains("must be valid"), "{err}");
}

#[test]
fn generation_after_a_shared_prefix_equals_generation_from_scratch() {
    use supportlm_model::generate::generate_after;
    let (_dir, m, _) = models(Architecture::Llama);
    let prefix: Vec<u32> = vec![1, 60, 61, 62, 63, 64];
    let items: Vec<Vec<u32>> = vec![vec![70, 71], vec![80, 81, 82, 83], vec![90]];
    let opts = GenerateOptions {
        max_new_tokens: 5,
        ..Default::default()
    };
    let cache = encode_prefix(&m, &prefix).unwrap();
    let after = generate_after(&m, &cache, &items, &opts, &mut |_, _, _| {}).unwrap();
    for (item, got) in items.iter().zip(&after) {
        let full: Vec<u32> = prefix.iter().chain(item).copied().collect();
        let want = generate(&m, &[full], &opts, &mut |_, _, _| {}).unwrap();
        assert_eq!(got.tokens, want[0].tokens);
    }
}

#[test]
fn scoring_several_items_in_one_pass_equals_one_at_a_time() {
    use supportlm_model::score::score_items;
    let (_dir, m, _) = models(Architecture::Qwen2);
    let prefix = encode_prefix(&m, &[1, 60, 61, 62]).unwrap();
    let items: Vec<Vec<u32>> = vec![vec![70, 71, 72], vec![], vec![80]];
    let candidates: Vec<Vec<u32>> = vec![vec![90], vec![91, 92, 2], vec![93, 94]];
    let together = score_items(&m, &prefix, &items, &candidates).unwrap();
    for (item, got) in items.iter().zip(&together) {
        let alone = score_candidates(&m, &prefix, item, &candidates).unwrap();
        for (a, b) in got.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        for (c, got) in candidates.iter().zip(got) {
            let context: Vec<u32> = [1, 60, 61, 62].iter().chain(item).copied().collect();
            let want = sequence_logprob(&m, &context, c).unwrap();
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }
}

#[test]
fn scoring_and_generating_in_one_pass_equals_doing_each_alone() {
    use supportlm_model::generate::{generate_after, score_and_generate};
    use supportlm_model::score::score_items;
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (_dir, m, _) = models(arch);
        let prefix = encode_prefix(&m, &[1, 60, 61, 62, 63]).unwrap();
        let items: Vec<Vec<u32>> = vec![vec![70, 71, 72], vec![80], vec![85, 86, 87, 88, 89]];
        let candidates: Vec<Vec<u32>> = vec![vec![90], vec![91, 92, 2], vec![93, 94]];
        let opts = GenerateOptions {
            max_new_tokens: 6,
            ..Default::default()
        };
        let both =
            score_and_generate(&m, &prefix, &items, &candidates, &opts, &mut |_, _, _| {}).unwrap();
        let scores = score_items(&m, &prefix, &items, &candidates).unwrap();
        let generated = generate_after(&m, &prefix, &items, &opts, &mut |_, _, _| {}).unwrap();
        assert_eq!(both.len(), items.len());
        for ((got, want_scores), want) in both.iter().zip(&scores).zip(&generated) {
            assert_eq!(
                &got.0, want_scores,
                "{arch:?}: the same pass gives the same scores"
            );
            assert_eq!(got.1.tokens, want.tokens, "{arch:?}");
            assert_eq!(got.1.stop, want.stop, "{arch:?}");
            assert!(!got.1.tokens.is_empty());
        }
    }
}

#[test]
fn random_sources_build_any_shape_deterministically() {
    use supportlm_model::loader::{load_llama, TensorSource};
    let config = tiny::config(Architecture::Qwen2);
    let run = |seed: u64| {
        let llama = load_llama(
            &tiny::RandomSource::new(&config, seed),
            &config,
            &default_device(),
        )
        .unwrap();
        let mut cache = llama.new_cache(1);
        to_vec(
            llama
                .forward_last(&StepInput::dense(vec![vec![1, 5, 9, 30]]), &mut cache)
                .unwrap(),
        )
        .unwrap()
    };
    let (a, b, c) = (run(3), run(3), run(4));
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Qwen2.5-1.5B-Instruct's published size, and no tensor is drawn before it is asked for.
    let qwen = tiny::qwen2_5_1_5b();
    let params = qwen.num_params();
    assert!((1_500_000_000..1_600_000_000).contains(&params), "{params}");
    let src = tiny::RandomSource::new(&qwen, 1);
    let (norm, shape) = src.tensor("model.norm.weight").unwrap().unwrap();
    assert_eq!((norm.len(), shape), (1536, vec![1536]));
    assert!(src.tensor("no.such.tensor").unwrap().is_none());
}
