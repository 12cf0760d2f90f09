//! Adapters on tiny random models: merge/unmerge round trip, attached vs merged, export to a Hugging
//! Face folder that loads back with the same logits, several adapters over one base, bad folders.

use supportlm_model::config::Architecture;
use supportlm_model::export::export_hf_dir;
use supportlm_model::llama::{to_vec, Llama, StepInput};
use supportlm_model::lora::{attach, merge, unmerge, Adapter, LoraConfig};
use supportlm_model::{default_device, tiny, Model};

fn logits(llama: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = llama.new_cache(1);
    to_vec(
        llama
            .forward_last(&StepInput::dense(vec![ids.to_vec()]), &mut cache)
            .unwrap(),
    )
    .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn random_adapter(model: &Model, seed: u64, rslora: bool) -> Adapter {
    let config = LoraConfig {
        r: 4,
        alpha: 16.0,
        use_rslora: rslora,
        ..Default::default()
    };
    let mut a = Adapter::init(config, &model.llama.config, "tiny", seed).unwrap();
    for (i, p) in a.weights.values_mut().enumerate() {
        p.b.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = ((i + j + seed as usize) % 5) as f32 * 0.05 - 0.1);
    }
    a
}

#[test]
fn merge_attach_unmerge_and_export_agree() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        tiny::write_hf_dir(&path, &tiny::config(arch), 3, 1).unwrap();
        let device = default_device();
        let model = Model::load(&path, &device).unwrap();
        let ids = [1u32, 40, 41, 42, 43, 2];
        let base = logits(&model.llama, &ids);

        let a1 = random_adapter(&model, 1, false);
        let a2 = random_adapter(&model, 2, true);
        // Two adapters attached over one base, each giving its own output.
        let with1 = logits(&attach(&model.llama, &a1).unwrap(), &ids);
        let with2 = logits(&attach(&model.llama, &a2).unwrap(), &ids);
        assert!(max_diff(&with1, &base) > 1e-3 && max_diff(&with1, &with2) > 1e-3);
        assert_eq!(
            logits(&model.llama, &ids),
            base,
            "attaching must not touch the base"
        );

        let mut merged = model.llama.clone();
        merge(&mut merged, &a1).unwrap();
        assert!(max_diff(&logits(&merged, &ids), &with1) < 1e-4);
        unmerge(&mut merged, &a1).unwrap();
        assert!(max_diff(&logits(&merged, &ids), &base) < 1e-4);

        // Export the merged model and load it back as a plain Hugging Face folder.
        let merged_model = Model::load(&path, &device)
            .unwrap()
            .merge_adapter(a1.clone())
            .unwrap();
        let out = dir.path().join("merged");
        export_hf_dir(&merged_model, &out).unwrap();
        let reloaded = Model::load(&out, &device).unwrap();
        assert_eq!(reloaded.llama.config, merged_model.llama.config);
        assert!(max_diff(&logits(&reloaded.llama, &ids), &with1) < 1e-4);
        // The decode path with the merged adapter agrees with the Burn path.
        let gen = |m: &Model| {
            let opts = supportlm_model::generate::GenerateOptions {
                max_new_tokens: 6,
                ..Default::default()
            };
            supportlm_model::generate::generate(m, &[ids.to_vec()], &opts, &mut |_, _, _| {})
                .unwrap()[0]
                .tokens
                .clone()
        };
        assert_eq!(gen(&merged_model), gen(&reloaded));
        assert!(
            merged_model.merge_adapter(a2).is_err(),
            "a second merge is refused"
        );
    }
}

#[test]
fn broken_adapter_folders_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny::config(Architecture::Llama);
    let adapter = Adapter::init(LoraConfig::default(), &config, "tiny", 1).unwrap();
    let a = dir.path().join("a");
    adapter.save(&a, &config).unwrap();

    let err = |d: &std::path::Path| Adapter::load(d, &config).unwrap_err().to_string();
    assert!(err(&dir.path().join("nope")).contains("adapter_config.json"));

    let truncated = dir.path().join("truncated");
    std::fs::create_dir_all(&truncated).unwrap();
    std::fs::copy(
        a.join("adapter_config.json"),
        truncated.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        truncated.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    assert!(
        err(&truncated).contains("adapter_model.safetensors"),
        "{}",
        err(&truncated)
    );

    let dora = dir.path().join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    std::fs::copy(
        a.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(a.join("adapter_config.json")).unwrap();
    std::fs::write(
        dora.join("adapter_config.json"),
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    assert!(err(&dora).contains("DoRA"), "{}", err(&dora));

    let unknown = dir.path().join("unknown");
    std::fs::create_dir_all(&unknown).unwrap();
    std::fs::copy(
        a.join("adapter_model.safetensors"),
        unknown.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        unknown.join("adapter_config.json"),
        text.replace("\"q_proj\"", "\"qkv\""),
    )
    .unwrap();
    assert!(
        err(&unknown).contains("unknown LoRA target"),
        "{}",
        err(&unknown)
    );
}

#[test]
fn attached_adapters_generate_as_merged_ones_and_share_the_base() {
    use supportlm_model::generate::{generate, GenerateOptions};
    for (arch, gguf) in [(Architecture::Llama, true), (Architecture::Qwen2, false)] {
        let dir = tempfile::tempdir().unwrap();
        let path = if gguf {
            let p = dir.path().join("base.gguf");
            tiny::write_gguf(&p, &tiny::config(arch), 3).unwrap();
            p
        } else {
            let p = dir.path().join("base");
            tiny::write_hf_dir(&p, &tiny::config(arch), 3, 1).unwrap();
            p
        };
        let device = default_device();
        let base = Model::load(&path, &device).unwrap();
        let prompts = vec![vec![1u32, 40, 41, 42], vec![1, 50, 51]];
        let options = GenerateOptions {
            max_new_tokens: 12,
            ..Default::default()
        };
        let run = |m: &Model| {
            let mut streamed = vec![String::new(); prompts.len()];
            let out = generate(m, &prompts, &options, &mut |row, _, text| {
                streamed[row] += text;
            })
            .unwrap();
            (out, streamed)
        };
        let (plain, _) = run(&base);
        for seed in [1, 2] {
            let adapter = random_adapter(&base, seed, seed == 2);
            let attached = base.attach_adapter(adapter.clone()).unwrap();
            let merged = Model::load(&path, &device)
                .unwrap()
                .merge_adapter(adapter)
                .unwrap();
            let (a, streamed) = run(&attached);
            let (m, _) = run(&merged);
            assert_eq!(
                a.iter().map(|g| &g.tokens).collect::<Vec<_>>(),
                m.iter().map(|g| &g.tokens).collect::<Vec<_>>(),
                "{arch:?}: attached and merged greedy tokens differ"
            );
            assert_ne!(a, plain, "{arch:?}: the adapter changed nothing");
            // Streamed text is the final text (random byte tokens may end in a held-back partial
            // character, decoded as U+FFFD only at the end).
            for (s, g) in streamed.iter().zip(&a) {
                assert!(g.text.starts_with(s.as_str()), "{s:?} vs {:?}", g.text);
            }
            assert!(attached.attached.as_ref().unwrap().num_params() > 0);
        }
        // The base is unchanged by attaching: its own generation is as before.
        assert_eq!(run(&base).0, plain);
    }
}
