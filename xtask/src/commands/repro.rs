//! `cargo xtask repro`: runs the deterministic parts of the study twice (split, a short QLoRA training,
//! a Task 1 evaluation of the trained adapter) in separate folders and compares the sha256 of every file
//! they write: the split files, the adapter, the predictions and the metrics (with the wall-clock fields
//! taken out). `--tiny` does it on a tiny random model in seconds (CI runs it); the default uses the
//! shipped default model.
//!
//! `--device D` runs both passes on D. On the CPU they must be byte-identical; on a GPU too (same device,
//! same kernels: what wgpu and cuda give run to run), and a third pass on the CPU is compared with the
//! device's within docs/GPU.md's tolerances (losses 1e-3 relative, the same predicted labels,
//! confidences within 1e-3), not by hash: the two backends round differently.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use supportlm_data::fsio::{sha256_file, sha256_hex};
use supportlm_data::{load_csv, shipped, split, SplitConfig, SplitSet, Task};
use supportlm_model::chat::ChatTemplate;
use supportlm_model::config::Architecture;
use supportlm_model::device::DeviceSpec;
use supportlm_model::model::Checkpoint;
use supportlm_model::{default_device, tiny, Device, Model};
use supportlm_prompting::report::{metrics, write_run, RunInfo};
use supportlm_prompting::{classify, ClassifyOptions, Decision, Method};
use supportlm_train::qlora::{QloraModel, StepPath};
use supportlm_train::trainer::{train, TrainJob};
use supportlm_train::TrainConfig;

/// One pass: every file it wrote and its hash.
fn pass(
    dir: &Path,
    model_path: &Path,
    tiny: bool,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Vec<(String, String)>> {
    let dataset = load_csv(&shipped::default_input())?;
    let split_dir = dir.join("split");
    split::split(
        &dataset,
        &SplitConfig {
            task: Task::Category,
            seed,
            ..Default::default()
        },
    )?
    .write(&split_dir, &dataset)?;
    let splits = SplitSet::read(&split_dir)?;

    let ck = Checkpoint::open(model_path)?;
    let template = ChatTemplate::for_tokenizer(&ck.tokenizer)?;
    let config = TrainConfig::load(
        None,
        &[
            format!("seed={seed}"),
            format!("max_steps={}", if tiny { 4 } else { 3 }),
            "batch_size=4".into(),
            "train_examples=44".into(),
            "val_examples=11".into(),
            "eval_every=2".into(),
            "save_every=2".into(),
            "lr=2e-4".into(),
            format!("max_len={}", if tiny { 1024 } else { 256 }),
        ],
    )?;
    let mut qlora =
        ck.with_source(|src| QloraModel::load(src, &ck.config, config.base_quant, device))?;
    qlora.step_path = StepPath::choose(config.store_activations, qlora.device());
    let train_dir = dir.join("train");
    train(
        TrainJob {
            model: &mut qlora,
            tokenizer: &ck.tokenizer,
            template: &template,
            train: &splits.train.records,
            validation: &splits.validation.records,
            config: &config,
            out_dir: &train_dir,
            base_model: "repro",
            resume: false,
            stop: None,
        },
        &mut |_, _| {},
    )?;
    drop(qlora);

    let model = Model::load(model_path, device)?.load_adapter(&train_dir.join("adapter"))?;
    let records: Vec<_> = splits
        .test
        .records
        .iter()
        .step_by(97)
        .take(16)
        .cloned()
        .collect();
    let options = ClassifyOptions {
        task: Task::Category,
        method: Method::Sft,
        decision: Decision::Constrained,
        examples: Vec::new(),
        length_normalize: false,
        max_new_tokens: 8,
        batch: 8,
    };
    let predictions = classify(&model, &records, &options, &mut |_, _| {})?;
    let info = RunInfo {
        task: "category".into(),
        method: "sft".into(),
        decision: "constrained".into(),
        model: "repro".into(),
        adapter: None,
        split: "test".into(),
        few_shot_k: 0,
        seed,
        seconds: 0.0,
        items_timed: records.len(),
        shared_pass: false,
        prompts: supportlm_data::prompts::sha256().to_string(),
    };
    let m = metrics(&Task::Category.labels(), &predictions, info, 200, seed);
    let eval_dir = dir.join("eval");
    write_run(&eval_dir, &predictions, &m)?;

    let mut files: Vec<(String, String)> = Vec::new();
    for (rel, path) in [
        ("split/train.jsonl", split_dir.join("train.jsonl")),
        ("split/validation.jsonl", split_dir.join("validation.jsonl")),
        ("split/test.jsonl", split_dir.join("test.jsonl")),
        ("split/manifest.json", split_dir.join("manifest.json")),
        (
            "train/adapter/adapter_model.safetensors",
            train_dir.join("adapter/adapter_model.safetensors"),
        ),
        (
            "train/adapter/adapter_config.json",
            train_dir.join("adapter/adapter_config.json"),
        ),
        (
            "train/best-adapter/adapter_model.safetensors",
            train_dir.join("best-adapter/adapter_model.safetensors"),
        ),
        ("eval/predictions.jsonl", eval_dir.join("predictions.jsonl")),
        (
            "eval/classification_report.csv",
            eval_dir.join("classification_report.csv"),
        ),
        ("eval/confusion.csv", eval_dir.join("confusion.csv")),
    ] {
        files.push((
            rel.into(),
            sha256_file(&path).with_context(|| path.display().to_string())?,
        ));
    }
    // metrics.json without the wall-clock fields; the training losses without timings.
    let mut mj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_dir.join("metrics.json"))?)?;
    mj["info"]["seconds"] = serde_json::Value::Null;
    mj["items_per_s"] = serde_json::Value::Null;
    files.push((
        "eval/metrics.json (timing removed)".into(),
        sha256_hex(mj.to_string().as_bytes()),
    ));
    let losses: String = std::fs::read_to_string(train_dir.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| format!("{} {} {}\n", v["step"], v["train_loss"], v["val_loss"]))
        .collect();
    files.push((
        "train/metrics.jsonl losses".into(),
        sha256_hex(losses.as_bytes()),
    ));
    Ok(files)
}

pub fn run(tiny_model: bool, seed: u64, device: Option<&str>) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    let spec = DeviceSpec::choose(device)?;
    let device = spec.open()?;
    let work = tempfile::tempdir()?;
    let model_path: PathBuf = if tiny_model {
        let p = work.path().join("tiny-model");
        tiny::write_hf_dir(&p, &tiny::config(Architecture::Llama), 7, 1)?;
        p
    } else {
        crate::commands::setup::run(&root)?;
        root.join(crate::commands::setup::DEFAULT_MODEL_PATH)
    };
    let a = pass(
        &work.path().join("a"),
        &model_path,
        tiny_model,
        seed,
        &device,
    )?;
    let b = pass(
        &work.path().join("b"),
        &model_path,
        tiny_model,
        seed,
        &device,
    )?;
    println!(
        "reproducibility ({}, seed {seed}, device {spec}): two runs in separate folders",
        if tiny_model {
            "tiny random model"
        } else {
            "default model"
        }
    );
    let mut differ = 0;
    for ((name, ha), (_, hb)) in a.iter().zip(&b) {
        let same = ha == hb;
        differ += usize::from(!same);
        println!(
            "{} {name:<48} {}",
            if same { "same" } else { "DIFF" },
            &ha[..16]
        );
    }
    if differ > 0 {
        bail!("{differ} of {} files differ between the two runs", a.len());
    }
    println!("all {} hashes identical", a.len());
    if !spec.is_cpu() {
        let cpu = work.path().join("cpu");
        pass(&cpu, &model_path, tiny_model, seed, &default_device())?;
        across_devices(&cpu, &work.path().join("a"), spec)?;
    }
    Ok(())
}

/// Docs/GPU.md's tolerances between a CPU pass and a device pass.
const LOSS_RELATIVE: f64 = 1e-3;
const CONFIDENCE_ABSOLUTE: f64 = 1e-3;

/// Compares a CPU pass with a device pass: per-step losses, predicted labels and confidences.
fn across_devices(cpu: &Path, gpu: &Path, spec: DeviceSpec) -> anyhow::Result<()> {
    let lines = |dir: &Path, file: &str| -> anyhow::Result<Vec<serde_json::Value>> {
        let path = dir.join(file);
        std::fs::read_to_string(&path)
            .with_context(|| path.display().to_string())?
            .lines()
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    };
    let mut worst_loss = 0f64;
    let (a, b) = (
        lines(cpu, "train/metrics.jsonl")?,
        lines(gpu, "train/metrics.jsonl")?,
    );
    anyhow::ensure!(a.len() == b.len(), "the training logs differ in length");
    for (x, y) in a.iter().zip(&b) {
        for key in ["train_loss", "val_loss"] {
            if let (Some(x), Some(y)) = (x[key].as_f64(), y[key].as_f64()) {
                worst_loss = worst_loss.max((x - y).abs() / x.abs().max(1e-12));
            }
        }
    }
    let (a, b) = (
        lines(cpu, "eval/predictions.jsonl")?,
        lines(gpu, "eval/predictions.jsonl")?,
    );
    let same_labels = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x["prediction"] == y["prediction"])
        .count();
    let worst_confidence = a
        .iter()
        .zip(&b)
        .filter_map(|(x, y)| Some((x["confidence"].as_f64()? - y["confidence"].as_f64()?).abs()))
        .fold(0f64, f64::max);
    println!(
        "cpu vs {spec}: losses within {worst_loss:.2e} relative (tolerance {LOSS_RELATIVE:.0e}), \
         {same_labels}/{} predictions identical, confidences within {worst_confidence:.2e} \
         (tolerance {CONFIDENCE_ABSOLUTE:.0e})",
        a.len()
    );
    if worst_loss >= LOSS_RELATIVE
        || same_labels != a.len()
        || worst_confidence >= CONFIDENCE_ABSOLUTE
    {
        bail!("the {spec} pass is outside the CPU pass's tolerances");
    }
    Ok(())
}
