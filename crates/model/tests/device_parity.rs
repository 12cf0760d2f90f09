//! The model on a GPU backend against the CPU: logits, scoring with the shared-prefix cache, greedy
//! generation (the device's own decode loop, reading back token ids only), int8 / NF4 bases packed on
//! the device, on tiny random llama and qwen2 models; and the MiniLM sentence encoder (after
//! `cargo xtask setup`). Built with `--features wgpu` (CI runs it on Mesa's lavapipe) or `cuda`;
//! `SUPPORTLM_DEVICE` picks the device (default `wgpu`, else `cuda`).
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use supportlm_model::config::Architecture;
use supportlm_model::device::{host_reads, DeviceSpec};
use supportlm_model::generate::{generate, score_and_generate, GenerateOptions};
use supportlm_model::llama::{to_vec, StepInput};
use supportlm_model::score::{encode_prefix, score_items};
use supportlm_model::{default_device, tiny, BaseQuant, Device, Model};

/// Logits and log-probabilities: the tolerance docs/GPU.md states.
const TOLERANCE: f32 = 1e-3;

fn gpu() -> Device {
    let spec = DeviceSpec::gpu_from_env().expect("a GPU backend is built in");
    spec.open().expect("the GPU device opens")
}

struct Pair {
    _dir: tempfile::TempDir,
    cpu: Model,
    gpu: Model,
}

fn pair(arch: Architecture, quant: BaseQuant) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf");
    tiny::write_hf_dir(&path, &tiny::config(arch), 7, 1).unwrap();
    let cpu = Model::load_as(&path, quant, &default_device()).unwrap();
    let gpu = Model::load_as(&path, quant, &gpu()).unwrap();
    Pair {
        _dir: dir,
        cpu,
        gpu,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits(m: &Model, rows: Vec<Vec<u32>>) -> Vec<f32> {
    let mut cache = m.llama.new_cache(rows.len());
    let h = m
        .llama
        .forward_hidden(&StepInput::dense(rows), &mut cache, None)
        .unwrap();
    to_vec(m.llama.logits(h)).unwrap()
}

#[test]
fn logits_match_the_cpu_for_every_architecture_and_base_format() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for quant in BaseQuant::ALL {
            let p = pair(arch, quant);
            let rows = vec![vec![1, 40, 41, 42, 43, 44], vec![1, 50, 51, 52, 53, 54]];
            let (a, b) = (logits(&p.cpu, rows.clone()), logits(&p.gpu, rows));
            let d = max_diff(&a, &b);
            assert!(d < TOLERANCE, "{arch:?} {quant}: max |Δlogit| {d}");
        }
    }
}

#[test]
fn scoring_with_the_prefix_cache_matches_the_cpu() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let p = pair(arch, BaseQuant::Nf4);
        let items: Vec<Vec<u32>> = vec![vec![70, 71, 72], vec![80], vec![85, 86, 87, 88]];
        let candidates: Vec<Vec<u32>> = vec![vec![90], vec![91, 92, 2], vec![93, 94]];
        let score = |m: &Model| {
            let prefix = encode_prefix(m, &[1, 60, 61, 62, 63]).unwrap();
            score_items(m, &prefix, &items, &candidates).unwrap()
        };
        let (a, b) = (score(&p.cpu), score(&p.gpu));
        let d = max_diff(&a.concat(), &b.concat());
        assert!(d < TOLERANCE, "{arch:?}: max |Δ log-prob| {d}");
    }
}

#[test]
fn greedy_generation_matches_the_cpu() {
    let opts = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let p = pair(arch, BaseQuant::None);
        // Rows of different lengths: left padding masked on both paths.
        let prompts = vec![vec![1, 40, 41, 42, 43], vec![1, 50, 51]];
        let run = |m: &Model| generate(m, &prompts, &opts, &mut |_, _, _| {}).unwrap();
        let a = run(&p.cpu);
        let before = host_reads();
        let b = run(&p.gpu);
        let after = host_reads();
        // One read per token, of the two rows' chosen ids only: no logits, no cache.
        let steps = b.iter().map(|g| g.tokens.len()).max().unwrap();
        let reads = after.reads - before.reads;
        assert!(reads > 0 && reads <= steps + 1, "{arch:?}: {reads} reads");
        assert_eq!(after.values - before.values, 2 * reads, "{arch:?}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.tokens, y.tokens, "{arch:?}");
            assert_eq!(x.stop, y.stop, "{arch:?}");
        }
        // Scoring and generating from one pass: the device gathers each item's cache rows itself.
        let together = |m: &Model| {
            let prefix = encode_prefix(m, &[1, 60, 61, 62, 63]).unwrap();
            let items = vec![vec![70, 71, 72], vec![80]];
            score_and_generate(m, &prefix, &items, &[vec![90]], &opts, &mut |_, _, _| {}).unwrap()
        };
        for ((sa, ga), (sb, gb)) in together(&p.cpu).iter().zip(&together(&p.gpu)) {
            assert!(max_diff(sa, sb) < TOLERANCE, "{arch:?}");
            assert_eq!(ga.tokens, gb.tokens, "{arch:?}");
        }
    }
}

/// all-MiniLM-L6-v2 (the response-similarity encoder; `cargo xtask setup` fetches it) on the device.
#[test]
fn minilm_embeddings_match_the_cpu() {
    use supportlm_model::bert::SentenceEncoder;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../checkpoints/embed/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `cargo xtask setup`",
        dir.display()
    );
    let texts = [
        "I want a refund for my last order",
        "How do I change the shipping address?",
        "thanks",
    ];
    let embed = |device: &Device| {
        SentenceEncoder::load(&dir, device)
            .unwrap()
            .embed(&texts)
            .unwrap()
            .concat()
    };
    let d = max_diff(&embed(&default_device()), &embed(&gpu()));
    assert!(d < TOLERANCE, "max |Δ embedding| {d}");
}

/// Temperature, top-k and top-p sampling drawn on the device from the rows' seeded streams: the CPU's
/// tokens (the draws are the same; only f32 vs f64 sums differ), and only ids read back.
#[test]
fn seeded_sampling_on_the_device_draws_the_cpus_tokens() {
    use supportlm_model::sampling::SamplingConfig;
    for (top_k, top_p) in [(None, None), (Some(20), None), (Some(50), Some(0.9))] {
        let opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: SamplingConfig {
                temperature: 0.8,
                top_k,
                top_p,
                seed: 5,
            },
            ..Default::default()
        };
        let p = pair(Architecture::Llama, BaseQuant::None);
        let prompts = vec![vec![1, 40, 41, 42, 43], vec![1, 50, 51]];
        let run = |m: &Model| generate(m, &prompts, &opts, &mut |_, _, _| {}).unwrap();
        let a = run(&p.cpu);
        let before = host_reads();
        let b = run(&p.gpu);
        let after = host_reads();
        assert_eq!(
            after.values - before.values,
            2 * (after.reads - before.reads)
        );
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.tokens, y.tokens, "top_k {top_k:?} top_p {top_p:?}");
        }
        // It did sample: greedy decoding takes another path.
        let greedy = GenerateOptions {
            max_new_tokens: 12,
            ..Default::default()
        };
        let g = generate(&p.gpu, &prompts, &greedy, &mut |_, _, _| {}).unwrap();
        assert!(g.iter().zip(&b).any(|(g, s)| g.tokens != s.tokens));
    }
}
