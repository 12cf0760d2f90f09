//! `cargo xtask bench eval`: Task 1 (categories) with the constrained rule on the default model: items/s
//! for 0-shot and balanced 10-shot prompts, with the shared prefix encoded once (reuse) and with every
//! prompt encoded from scratch, measured in one run on the same items; on the CPU also with reuse through
//! Burn's tensor ops instead of the host path. `--device` picks the device.

use std::time::Instant;

use anyhow::Context;
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::{load_csv, shipped, split, SplitConfig, Task};
use supportlm_model::device::{is_cpu, DeviceSpec};
use supportlm_model::llama::PromptPath;
use supportlm_model::score::{encode_prefix, score_candidates, score_items};
use supportlm_model::Model;
use supportlm_prompting::prompt::{encode_prompts, label_candidates};

pub fn run(items: usize, device: Option<&str>) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    crate::commands::setup::run(&root)?;
    let spec = DeviceSpec::choose(device)?;
    let mut model = Model::load(
        &root.join(crate::commands::setup::DEFAULT_MODEL_PATH),
        &spec.open()?,
    )
    .context("loading the default model")?;
    let data = load_csv(&shipped::default_input())?;
    let set = split::split(&data, &SplitConfig::default())?;
    // Every 10th test item, so several labels are covered.
    let records: Vec<_> = set
        .test
        .records
        .iter()
        .step_by(10)
        .take(items)
        .cloned()
        .collect();
    let shots = balanced_kshot(
        &set.validation.records,
        &set.test.records,
        Task::Category,
        1,
        42,
    )?;
    let labels = Task::Category.labels();
    let candidates = label_candidates(&labels, &model.tokenizer)?;
    println!(
        "Task 1 (11 categories), constrained scoring, {} test items, default model, device {spec}:",
        records.len()
    );
    for (name, examples) in [("0-shot", &[][..]), ("10-shot", &shots[..])] {
        let prompts = encode_prompts(
            Task::Category,
            examples,
            &records,
            &model.tokenizer,
            &model.template,
        )?;
        let with_reuse = |model: &Model| -> anyhow::Result<(f64, Vec<Vec<f32>>)> {
            let t = Instant::now();
            let prefix = encode_prefix(model, &prompts.prefix)?;
            let mut scores = Vec::new();
            for chunk in prompts.items.chunks(8) {
                scores.extend(score_items(model, &prefix, chunk, &candidates)?);
            }
            Ok((records.len() as f64 / t.elapsed().as_secs_f64(), scores))
        };
        let (with, reused) = with_reuse(&model)?;
        let t = Instant::now();
        let mut fresh = Vec::new();
        for item in &prompts.items {
            let whole: Vec<u32> = prompts.prefix.iter().chain(item).copied().collect();
            let own = encode_prefix(&model, &whole)?;
            fresh.push(score_candidates(&model, &own, &[], &candidates)?);
        }
        let without = records.len() as f64 / t.elapsed().as_secs_f64();
        let diff = reused
            .iter()
            .flatten()
            .zip(fresh.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "{name:>8}: prefix {} tokens, item ~{} tokens: with reuse {with:.2} items/s, without {without:.2} items/s -> {:.1}x (max log-prob difference {diff:.1e})",
            prompts.prefix.len(),
            prompts.items.iter().map(Vec::len).sum::<usize>() / prompts.items.len().max(1),
            with / without
        );
        if is_cpu(&model.llama.device) {
            // The same passes through Burn's tensor ops, which the host path replaced on the CPU.
            model.llama.prompt_path = PromptPath::Tensors;
            let timed = with_reuse(&model);
            model.llama.prompt_path = PromptPath::Host;
            let (rate, _) = timed?;
            println!(
                "{:>8}  with reuse through Burn tensor ops instead of the host path: {rate:.2} items/s (host path {:.2}x that)",
                "",
                with / rate
            );
        }
    }
    println!("target: 10-shot with reuse at least 5x faster than without");
    Ok(())
}
