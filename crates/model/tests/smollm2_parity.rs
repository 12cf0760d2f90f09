//! Parity with the reference implementations (transformers, gguf-py, tokenizers) on the real default model.
//! Fixtures and their tolerances: `fixtures/smollm2-135m-instruct/README.md`.
//! Needs `checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf` (`cargo xtask setup`).

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use supportlm_model::generate::{generate, GenerateOptions};
use supportlm_model::llama::{to_vec, StepInput};
use supportlm_model::sampling::argmax;
use supportlm_model::score::{encode_prefix, score_candidates};
use supportlm_model::{default_device, Model};
use supportlm_quant::gguf::GgufFile;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gguf_path() -> PathBuf {
    let p = root().join("checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` first",
        p.display()
    );
    p
}

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2-135m-instruct")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(&gguf_path(), &default_device()).expect("default model loads"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of every position of a prompt, `[n][vocab]`, in one pass from scratch.
fn all_logits(prompt: &[u32]) -> Vec<Vec<f32>> {
    let m = model();
    let mut cache = m.llama.new_cache(1);
    let hidden = m
        .llama
        .forward_hidden(&StepInput::dense(vec![prompt.to_vec()]), &mut cache, None)
        .unwrap();
    let v = to_vec(m.llama.logits(hidden)).unwrap();
    v.chunks(m.llama.config.vocab_size)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn gguf_layout_and_dequantization_match_gguf_py() {
    let f = fixture("gguf_layout_cases.json");
    let g = GgufFile::open(&gguf_path()).unwrap();
    assert_eq!(g.tensors.len(), f["tensors"].as_array().unwrap().len());
    for t in f["tensors"].as_array().unwrap() {
        let info = g.tensor_info(t["name"].as_str().unwrap()).unwrap();
        assert_eq!(info.ty.name(), t["type"].as_str().unwrap());
        assert_eq!(info.offset, t["offset_in_data"].as_u64().unwrap());
        let ne: Vec<usize> = t["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(info.ne, ne);
    }
    for case in f["quant_cases"].as_array().unwrap() {
        let name = case["tensor"].as_str().unwrap();
        let (raw_info, raw) = g.tensor_bytes(name).unwrap();
        let hex: String = raw[..case["first_two_blocks_hex"].as_str().unwrap().len() / 2]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            case["first_two_blocks_hex"].as_str().unwrap(),
            "{name}"
        );
        let (w, _) = g.tensor_f32(name).unwrap();
        let expected: Vec<f32> = case["first_64_dequantized_row0"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&w[..64], &expected[..], "{name}: bit-exact dequantization");
        let row = raw_info.ne[0];
        let row1: Vec<f32> = case["row1_first_8"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&w[row..row + 8], &row1[..], "{name} row 1");
        let sum: f64 = w.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = w.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!(
            (sum - case["sum_all_f64"].as_f64().unwrap()).abs() < 1e-6 * (1.0 + sum.abs()),
            "{name} sum"
        );
        assert!(
            (sum_sq - case["sum_sq_all_f64"].as_f64().unwrap()).abs() < 1e-9 * sum_sq,
            "{name} sum_sq"
        );
    }
}

#[test]
fn tokenizer_matches_upstream_ids_and_round_trips() {
    let f = fixture("tokenizer_cases.json");
    let tok = &model().tokenizer;
    for case in f["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, ids(&case["ids_upstream_pretokenizer"]), "{text:?}");
        assert_eq!(
            tok.decode(&got).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    for label in f["labels"].as_array().unwrap() {
        let l = label["label"].as_str().unwrap();
        assert_eq!(tok.encode(l, true).unwrap(), ids(&label["bare"]), "{l}");
        assert_eq!(
            tok.encode(&format!(" {l}"), true).unwrap(),
            ids(&label["leading_space"]),
            "{l}"
        );
    }
    assert_eq!(tok.eos_ids[0], 2);
}

#[test]
fn chat_template_renders_like_transformers() {
    let f = fixture("chat_template_cases.json");
    let m = model();
    for case in f["cases"].as_array().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = m.template.render(messages, add).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        assert_eq!(
            m.encode_chat(messages, add).unwrap(),
            ids(&case["ids"]),
            "{}",
            case["name"]
        );
    }
}

#[test]
fn logits_greedy_continuations_and_label_scores_match_transformers() {
    let f = fixture("logits_cases.json");
    let m = model();
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["input_ids"]);
        let logits = all_logits(&prompt);
        let last = logits.last().unwrap();
        for top in case["last_top10"].as_array().unwrap() {
            let id = top["id"].as_u64().unwrap() as usize;
            let diff = (last[id] - top["logit"].as_f64().unwrap() as f32).abs();
            assert!(diff <= 1e-3, "{name}: logit {id} differs by {diff}");
        }
        for (id, v) in case["last_sampled_logits"].as_object().unwrap() {
            let id: usize = id.parse().unwrap();
            let diff = (last[id] - v.as_f64().unwrap() as f32).abs();
            assert!(diff <= 1e-3, "{name}: sampled logit {id} differs by {diff}");
        }
        let n = last.len() as f64;
        let mean = last.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (last.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            (mean - case["last_stats"]["mean"].as_f64().unwrap()).abs() < 1e-4,
            "{name} mean"
        );
        assert!(
            (std - case["last_stats"]["std_population"].as_f64().unwrap()).abs() < 1e-4,
            "{name} std"
        );
        for top in case["pos0_top5"].as_array().unwrap() {
            let id = top["id"].as_u64().unwrap() as usize;
            assert!(
                (logits[0][id] - top["logit"].as_f64().unwrap() as f32).abs() <= 1e-3,
                "{name} pos0"
            );
        }

        // Greedy continuation with the KV cache, not stopping at end of turn.
        let expected = ids(&case["greedy"]["ids"]);
        let mut cache = m.llama.new_cache(1);
        let mut step = prompt.clone();
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            let l = to_vec(
                m.llama
                    .forward_last(&StepInput::dense(vec![step]), &mut cache)
                    .unwrap(),
            )
            .unwrap();
            let next = argmax(&l) as u32;
            got.push(next);
            step = vec![next];
        }
        assert_eq!(got, expected, "{name}: greedy continuation");

        // The same through `generate` (quantized decode path), which stops at the end of the turn.
        let opts = GenerateOptions {
            max_new_tokens: expected.len(),
            ..Default::default()
        };
        let out = generate(m, std::slice::from_ref(&prompt), &opts, &mut |_, _, _| {}).unwrap();
        let until_eos: Vec<u32> = expected
            .iter()
            .copied()
            .take_while(|&t| !m.tokenizer.eos_ids.contains(&t))
            .collect();
        assert_eq!(
            out[0].tokens, until_eos,
            "{name}: greedy continuation on the decode path"
        );

        if let Some(scores) = case.get("label_scores").and_then(Value::as_object) {
            let prefix = encode_prefix(m, &prompt).unwrap();
            let labels: Vec<&String> = scores.keys().collect();
            let candidates: Vec<Vec<u32>> = labels
                .iter()
                .map(|l| ids(&scores[*l]["label_ids"]))
                .collect();
            let got = score_candidates(m, &prefix, &[], &candidates).unwrap();
            for (l, g) in labels.iter().zip(&got) {
                let want = scores[*l]["sum_logprob"].as_f64().unwrap() as f32;
                assert!((g - want).abs() <= 2e-3, "{name} {l}: {g} vs {want}");
            }
        }
    }

    // Every case's prompt in one batch: the batched decode kernels (one weight read for all rows) give
    // each row transformers' greedy continuation too.
    let cases = f["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
    let expected: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            ids(&c["greedy"]["ids"])
                .into_iter()
                .take_while(|t| !m.tokenizer.eos_ids.contains(t))
                .collect()
        })
        .collect();
    assert!(prompts.len() > 1, "the batch needs several rows");
    let opts = GenerateOptions {
        max_new_tokens: expected.iter().map(Vec::len).max().unwrap(),
        ..Default::default()
    };
    let out = generate(m, &prompts, &opts, &mut |_, _, _| {}).unwrap();
    for ((case, want), got) in cases.iter().zip(&expected).zip(&out) {
        assert_eq!(
            &got.tokens[..want.len().min(got.tokens.len())],
            &want[..],
            "{}: greedy continuation in a batch of {}",
            case["name"],
            prompts.len()
        );
    }
}

#[test]
fn hidden_states_match_per_layer() {
    let f = fixture("per_layer_case.json");
    let m = model();
    let prompt = ids(&f["input_ids"]);
    let mut cache = m.llama.new_cache(1);
    let mut states = Vec::new();
    let final_norm = m
        .llama
        .forward_hidden(
            &StepInput::dense(vec![prompt.clone()]),
            &mut cache,
            Some(&mut states),
        )
        .unwrap();
    let hidden = m.llama.config.hidden_size;
    let stages = [
        ("after_embedding", states[0].clone()),
        ("after_layer_0", states[1].clone()),
        ("after_layer_15", states[16].clone()),
        ("after_layer_29_before_final_norm", states[30].clone()),
        ("after_final_norm", final_norm),
    ];
    for (stage, t) in stages {
        let v = to_vec(t).unwrap();
        for (pos, row) in v.chunks(hidden).enumerate() {
            let norm = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let want_norm = f[stage]["l2_norm"][pos].as_f64().unwrap();
            assert!(
                (norm - want_norm).abs() <= 1e-4 * want_norm,
                "{stage} pos {pos}: norm {norm} vs {want_norm}"
            );
            for (i, w) in f[stage]["first8"][pos]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                let diff = (row[i] as f64 - w.as_f64().unwrap()).abs();
                assert!(
                    diff <= 1e-4 * want_norm,
                    "{stage} pos {pos} dim {i}: diff {diff}"
                );
            }
        }
    }
}
