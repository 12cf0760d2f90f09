//! Training on a GPU backend against the CPU: 20 optimizer steps of QLoRA (NF4 base packed on the
//! device, dropout on) and of full fine-tuning on a tiny random model; per-step losses within 1e-3
//! relative and the adapters within 1e-3. Built with `--features wgpu` (CI: Mesa's lavapipe) or `cuda`;
//! `SUPPORTLM_DEVICE` picks the device (default `wgpu`, else `cuda`).
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;
use common::records;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use supportlm_model::chat::ChatTemplate;
use supportlm_model::config::{Architecture, ModelConfig};
use supportlm_model::device::DeviceSpec;
use supportlm_model::lora::Adapter;
use supportlm_model::model::Checkpoint;
use supportlm_model::{default_device, tiny, Device};
use supportlm_train::qlora::QloraModel;
use supportlm_train::trainer::{train, MetricsLine, TrainJob};
use supportlm_train::TrainConfig;
use supportlm_train::TrainOutcome;

/// Relative tolerance on losses, absolute on adapter values: the one docs/GPU.md states.
const TOLERANCE: f64 = 1e-3;

fn gpu() -> Device {
    let spec = DeviceSpec::gpu_from_env().expect("a GPU backend is built in");
    spec.open().expect("the GPU device opens")
}

/// A temporary folder holding the tiny llama checkpoint in `base/`, and its configuration.
fn tiny_base() -> (tempfile::TempDir, PathBuf, ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let model_config = tiny::config(Architecture::Llama);
    tiny::write_hf_dir(&base, &model_config, 5, 1).unwrap();
    (dir, base, model_config)
}

fn run(base: &Path, out: &Path, config: &TrainConfig, device: &Device) -> Vec<MetricsLine> {
    let mut lines = Vec::new();
    job(base, out, config, device, (false, None), &mut |line| {
        lines.push(line.clone())
    })
    .unwrap();
    lines
}

/// One training job on the tiny records: `(resume, stop)` as [`TrainJob`] takes them.
fn job(
    base: &Path,
    out: &Path,
    config: &TrainConfig,
    device: &Device,
    (resume, stop): (bool, Option<&AtomicBool>),
    on_line: &mut dyn FnMut(&MetricsLine),
) -> supportlm_train::Result<TrainOutcome> {
    let checkpoint = Checkpoint::open(base).unwrap();
    let mut model = checkpoint
        .with_source(|src| QloraModel::load(src, &checkpoint.config, config.base_quant, device))
        .unwrap();
    let template = ChatTemplate::for_tokenizer(&checkpoint.tokenizer).unwrap();
    let (train_set, val_set) = (records(24, 0), records(6, 100));
    let job = TrainJob {
        model: &mut model,
        tokenizer: &checkpoint.tokenizer,
        template: &template,
        train: &train_set,
        validation: &val_set,
        config,
        out_dir: out,
        base_model: "tiny",
        resume,
        stop,
    };
    train(job, &mut |line, _| on_line(line))
}

fn config(extra: &[&str]) -> TrainConfig {
    let mut overrides: Vec<String> = [
        "max_steps=20",
        "epochs=10",
        "batch_size=3",
        "eval_every=10",
        "val_examples=6",
        "lr=5e-3",
        "lora.r=2",
        "lora.dropout=0.1",
        "max_len=1024",
    ]
    .map(String::from)
    .to_vec();
    overrides.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &overrides).unwrap()
}

fn compare(tag: &str, cpu: &[MetricsLine], gpu: &[MetricsLine]) {
    assert_eq!(cpu.len(), gpu.len(), "{tag}: as many metric lines");
    let mut steps = 0;
    for (a, b) in cpu.iter().zip(gpu) {
        for (x, y) in [(a.train_loss, b.train_loss), (a.val_loss, b.val_loss)] {
            if let (Some(x), Some(y)) = (x, y) {
                let rel = (x - y).abs() / x.abs().max(1e-12);
                assert!(rel < TOLERANCE, "{tag} step {}: loss {x} vs {y}", a.step);
            }
        }
        steps += usize::from(a.train_loss.is_some());
    }
    assert_eq!(steps, 20, "{tag}: 20 training steps compared");
}

#[test]
fn qlora_and_full_fine_tuning_on_the_device_follow_the_cpu() {
    let (dir, base, model_config) = tiny_base();
    let gpu = gpu();

    let qlora = config(&["base_quant=nf4"]);
    let (a, b) = (dir.path().join("cpu"), dir.path().join("gpu"));
    let cpu_lines = run(&base, &a, &qlora, &default_device());
    let gpu_lines = run(&base, &b, &qlora, &gpu);
    compare("qlora", &cpu_lines, &gpu_lines);
    let (x, y) = (
        Adapter::load(&a.join("adapter"), &model_config).unwrap(),
        Adapter::load(&b.join("adapter"), &model_config).unwrap(),
    );
    for (key, p) in &x.weights {
        let q = &y.weights[key];
        for (u, v) in p.a.iter().chain(&p.b).zip(q.a.iter().chain(&q.b)) {
            assert!(
                f64::from((u - v).abs()) < TOLERANCE,
                "adapter {key:?}: {u} vs {v}"
            );
        }
    }

    let full = config(&["tuning=full", "base_quant=none", "lr=1e-3"]);
    let (a, b) = (dir.path().join("full-cpu"), dir.path().join("full-gpu"));
    compare(
        "full",
        &run(&base, &a, &full, &default_device()),
        &run(&base, &b, &full, &gpu),
    );
}

/// Reads from the device during one QLoRA step: the loss and the adapter gradients, once each, however
/// many layers the model has; with the adapter on the device (as the trainer keeps it), the loss only.
#[test]
fn a_training_step_reads_from_the_device_once_per_step_not_per_layer() {
    use supportlm_model::device::host_reads;
    use supportlm_model::lora::LoraConfig;
    use supportlm_quant::BaseQuant;
    use supportlm_train::qlora::Sequence;

    let gpu = gpu();
    let mut per_depth = Vec::new();
    for layers in [2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let mut model_config = tiny::config(Architecture::Llama);
        model_config.num_hidden_layers = layers;
        tiny::write_hf_dir(dir.path(), &model_config, 5, 1).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let model = checkpoint
            .with_source(|src| QloraModel::load(src, &checkpoint.config, BaseQuant::Nf4, &gpu))
            .unwrap();
        let lora = LoraConfig {
            r: 2,
            ..Default::default()
        };
        let adapter = Adapter::init(lora, &model.config, "tiny", 3).unwrap();
        let ids: Vec<u32> = vec![1, 40, 41, 42, 43, 44, 2];
        let batch = [Sequence {
            loss_mask: (0..ids.len()).map(|i| i >= 3).collect(),
            ids,
        }];
        let before = host_reads();
        let step = model.loss_and_grads(&adapter, &batch, None).unwrap();
        let reads = host_reads().reads - before.reads;
        assert_eq!(step.grads.len(), adapter.weights.len());
        let factors = supportlm_train::qlora::DeviceFactors::upload(&adapter, &gpu);
        let before = host_reads();
        let dropout = Some(supportlm_train::qlora::Dropout { p: 0.1, seed: 1 });
        let (_, grads) = model
            .device_loss_and_grads(&factors, &batch, dropout)
            .unwrap();
        let resident = host_reads().reads - before.reads;
        assert_eq!(grads.dims(), [factors.len()]);
        per_depth.push((reads, resident));

        // The device draws the CPU's dropout masks: with B non-zero the gradients depend on them.
        let mut adapter = adapter;
        for (i, p) in adapter.weights.values_mut().enumerate() {
            p.b.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = ((i * 31 + j * 7) % 13) as f32 * 0.01 - 0.06);
        }
        let cpu = checkpoint
            .with_source(|src| {
                QloraModel::load(src, &checkpoint.config, BaseQuant::Nf4, &default_device())
            })
            .unwrap();
        let on_cpu = cpu.loss_and_grads(&adapter, &batch, dropout).unwrap();
        let factors = supportlm_train::qlora::DeviceFactors::upload(&adapter, &gpu);
        let (_, grads) = model
            .device_loss_and_grads(&factors, &batch, dropout)
            .unwrap();
        let on_gpu = factors
            .split(&supportlm_model::llama::to_vec(grads).unwrap())
            .unwrap();
        // Relative to the largest gradient: a different mask would move most values by about it.
        let scale = on_cpu
            .grads
            .values()
            .flat_map(|p| p.a.iter().chain(&p.b))
            .fold(0f32, |m, x| m.max(x.abs()));
        for (key, p) in &on_cpu.grads {
            let q = &on_gpu[key];
            for (u, v) in p.a.iter().chain(&p.b).zip(q.a.iter().chain(&q.b)) {
                assert!((u - v).abs() < 1e-5 * scale, "{key:?}: gradient {u} vs {v}");
            }
        }
    }
    assert_eq!(per_depth[0], per_depth[1], "reads grow with depth");
    assert!(per_depth[0].0 <= 2, "{} reads in one step", per_depth[0].0);
    assert_eq!(
        per_depth[0].1, 1,
        "the loss is the one read of a resident step"
    );
}

/// A whole run on the device: each optimizer step reads back its loss and its gradient norm (the
/// metrics line) and nothing else, LoRA and full fine-tuning alike: the factors, parameters, gradients
/// and AdamW's moments stay there.
#[test]
fn an_optimizer_step_reads_only_its_loss_and_gradient_norm() {
    use supportlm_model::device::host_reads;

    let (dir, base, _) = tiny_base();
    let gpu = gpu();
    for tuning in [&["base_quant=nf4"][..], &["tuning=full", "base_quant=none"]] {
        let mut reads = Vec::new();
        for steps in [4, 8] {
            let mut extra = vec![format!("max_steps={steps}"), "eval_every=1000".into()];
            extra.extend(tuning.iter().map(|s| s.to_string()));
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let out = dir.path().join(format!("{}-{steps}", tuning.len()));
            let before = host_reads();
            run(&base, &out, &config(&extra), &gpu);
            reads.push(host_reads().reads - before.reads);
        }
        // Validation and the checkpoint at the end are the same in both runs.
        assert_eq!(reads[1] - reads[0], 4 * 2, "{tuning:?}: reads {reads:?}");
    }
}

/// A run on the device interrupted after step 10 and resumed from its checkpoint (factors and moments
/// read back, then uploaded again) ends with the adapter of the uninterrupted run.
#[test]
fn a_run_on_the_device_resumes_to_the_same_adapter() {
    let (dir, base, model_config) = tiny_base();
    let gpu = gpu();
    let config = config(&["base_quant=nf4", "save_every=5"]);
    let whole = dir.path().join("whole");
    run(&base, &whole, &config, &gpu);

    let split = dir.path().join("split");
    let stop = AtomicBool::new(false);
    for resume in [false, true] {
        let result = job(
            &base,
            &split,
            &config,
            &gpu,
            (resume, Some(&stop)),
            &mut |line| {
                if line.step == 10 {
                    stop.store(true, Ordering::SeqCst);
                }
            },
        );
        assert_eq!(result.is_ok(), resume, "{result:?}");
        stop.store(false, Ordering::SeqCst);
    }
    let (x, y) = (
        Adapter::load(&whole.join("adapter"), &model_config).unwrap(),
        Adapter::load(&split.join("adapter"), &model_config).unwrap(),
    );
    assert_eq!(x.weights, y.weights, "resumed on the device, same adapter");
}
