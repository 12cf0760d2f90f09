//! LoRA adapters on the real default model: the adapter Hugging Face PEFT wrote
//! (`fixtures/peft-lora-smollm2`) reproduces PEFT's logits, merged and attached agree, and an adapter
//! this project writes carries PEFT's names, shapes and config keys.
//! Needs `checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf` (`cargo xtask setup`).

use std::path::PathBuf;

use serde_json::Value;
use supportlm_model::generate::{generate, GenerateOptions};
use supportlm_model::llama::{to_vec, Llama, StepInput};
use supportlm_model::lora::{attach, Adapter, LoraConfig, Target};
use supportlm_model::names::{self, Factor};
use supportlm_model::{default_device, Model};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-lora-smollm2")
}

fn base() -> Model {
    let p = root().join("checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` first",
        p.display()
    );
    Model::load(&p, &default_device()).unwrap()
}

fn last_logits(llama: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = llama.new_cache(1);
    let out = llama
        .forward_last(&StepInput::dense(vec![ids.to_vec()]), &mut cache)
        .unwrap();
    to_vec(out).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn peft_written_adapter_reproduces_peft_logits_merged_and_attached() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap(),
    )
    .unwrap();
    let model = base();
    let adapter = Adapter::load(&fixture_dir(), &model.llama.config).unwrap();
    assert_eq!(adapter.config.r, 4);
    assert_eq!(adapter.config.scale(), 2.0);
    assert_eq!(adapter.weights.len(), 30 * 7);
    let attached = attach(&model.llama, &adapter).unwrap();
    let base_llama = model.llama.clone();
    let merged = model.merge_adapter(adapter).unwrap();

    for case in expected["cases"].as_array().unwrap() {
        let ids = u32s(&case["input_ids"]);
        let with = last_logits(&merged.llama, &ids);
        let unmerged = last_logits(&attached, &ids);
        let without = last_logits(&base_llama, &ids);
        for pair in case["with_adapter_top10"].as_array().unwrap() {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            assert!(
                (with[id] - want).abs() < 1e-3,
                "token {id}: {} vs PEFT {want}",
                with[id]
            );
        }
        for (i, want) in case["with_adapter_first32"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (with[i] - want).abs() < 1e-3,
                "logit {i}: {} vs PEFT {want}",
                with[i]
            );
        }
        // This field stores `[int(logit), float(id)]` pairs: check the id and the logit's integer part.
        for pair in case["without_adapter_top5"].as_array().unwrap() {
            let (floor, id) = (
                pair[0].as_f64().unwrap() as f32,
                pair[1].as_f64().unwrap() as usize,
            );
            let got = without[id];
            assert!(
                got > floor - 1e-3 && got < floor + 1.0 + 1e-3,
                "base token {id}: {got} vs ~{floor}"
            );
        }
        let change = with
            .iter()
            .zip(&without)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let want_change = case["max_abs_change_from_adapter"].as_f64().unwrap() as f32;
        assert!(
            (change - want_change).abs() < 2e-3,
            "adapter changes logits by {change}, PEFT {want_change}"
        );
        let diff = with
            .iter()
            .zip(&unmerged)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "merged vs attached: {diff}");

        let opts = GenerateOptions {
            max_new_tokens: 16,
            ..Default::default()
        };
        let out = generate(
            &merged,
            std::slice::from_ref(&ids),
            &opts,
            &mut |_, _, _| {},
        )
        .unwrap();
        let want = u32s(&case["greedy16_with_adapter_ids"]);
        assert_eq!(
            out[0].tokens,
            want[..out[0].tokens.len()],
            "greedy continuation"
        );
    }
}

#[test]
fn written_adapter_has_peft_names_shapes_and_config_and_loads_back() {
    let model = base();
    let config = LoraConfig {
        r: 8,
        alpha: 32.0,
        dropout: 0.05,
        targets: vec![Target::QProj, Target::VProj, Target::DownProj],
        layers: Some(vec![0, 29]),
        use_rslora: false,
    };
    let mut adapter = Adapter::init(
        config,
        &model.llama.config,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        3,
    )
    .unwrap();
    for pair in adapter.weights.values_mut() {
        pair.b
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 7) as f32 * 1e-3);
    }
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), &model.llama.config).unwrap();

    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 32.0);
    assert_eq!(cfg["lora_dropout"], 0.05);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([0, 29]));
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(
        cfg["base_model_name_or_path"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );

    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), 2 * 3 * 2);
    let q_a = st
        .tensor(&names::peft(0, Target::QProj, Factor::A))
        .unwrap();
    assert_eq!(q_a.shape(), [8, 576]);
    assert_eq!(
        st.tensor("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight")
            .unwrap()
            .shape(),
        [576, 8]
    );
    let back = Adapter::load(dir.path(), &model.llama.config).unwrap();
    assert_eq!(back, adapter);
}

#[test]
fn adapter_for_another_base_is_refused_with_the_tensor_named() {
    let model = base();
    let tiny = supportlm_model::tiny::config(supportlm_model::config::Architecture::Llama);
    let adapter = Adapter::init(LoraConfig::default(), &tiny, "tiny", 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), &tiny).unwrap();
    let err = Adapter::load(dir.path(), &model.llama.config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another base") || err.contains("missing"),
        "{err}"
    );
    // And the other way round: the 30-layer PEFT adapter on the 2-layer tiny model.
    let err = Adapter::load(&fixture_dir(), &tiny)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another base") || err.contains("unexpected tensor"),
        "{err}"
    );
}

#[test]
fn nf4_and_int8_round_trip_error_is_bounded_on_real_layers() {
    use supportlm_model::model::Checkpoint;
    use supportlm_quant::{Int8Matrix, Nf4Tensor};
    let ck =
        Checkpoint::open(&root().join("checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.15.mlp.down_proj.weight",
        "model.layers.29.mlp.gate_proj.weight",
    ] {
        let (w, shape) = ck.with_source(|s| s.tensor(name)).unwrap().unwrap();
        let rms = (w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt();
        let rel = |back: &[f32]| {
            let err = w
                .iter()
                .zip(back)
                .map(|(a, b)| ((a - b) * (a - b)) as f64)
                .sum::<f64>()
                / w.len() as f64;
            err.sqrt() / rms
        };
        let nf4 = Nf4Tensor::quantize(&w, &shape, true);
        let nf4_err = rel(&nf4.dequantize());
        let mut back = vec![0f32; w.len()];
        Int8Matrix::quantize(&w, shape[0], shape[1]).dequantize_into(&mut back);
        let int8_err = rel(&back);
        // NF4 keeps the relative RMS error near 10%; per-row int8 under 2%.
        assert!(nf4_err < 0.12, "{name}: NF4 relative RMS error {nf4_err}");
        assert!(
            int8_err < 0.02,
            "{name}: int8 relative RMS error {int8_err}"
        );
        assert!(int8_err < nf4_err);
    }
}
