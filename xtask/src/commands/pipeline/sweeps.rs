//! The learning curve (SFT macro-F1 against the number of training examples) and the learning-rate
//! comparison. Both are made of *points*: one Task 1 QLoRA training on `n` balanced examples at one
//! learning rate, then a constrained evaluation on the budget's seeded test items. A point lives in
//! `curve/n<N>/{train,eval}` or `hparams/lr<LR>/{train,eval}` (each step owns its folders); an
//! interrupted point continues (training with `--resume`, evaluation from its partial file).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use supportlm_train::TrainConfig;

use super::{Run, Step};

/// One training-and-evaluation point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub examples: usize,
    pub lr: f64,
    /// Passes over the examples: small sets are repeated until they have been seen `min_seen` times in
    /// all, so that every point gets a comparable number of optimizer steps.
    pub epochs: usize,
}

impl Point {
    pub fn new(examples: usize, lr: f64, min_seen: usize) -> Self {
        Point {
            examples,
            lr,
            epochs: min_seen.div_ceil(examples.max(1)).max(1),
        }
    }

    /// The folder of the point, relative to the run, for the step that asks for it.
    pub fn folder(&self, step: Step) -> String {
        match step {
            Step::Hparams => format!("hparams/lr{:e}", self.lr),
            _ => format!("curve/n{}", self.examples),
        }
    }
}

/// The points of a step under the run's budget; the learning curve uses the Task 1 config's
/// learning rate.
pub fn points(run: &Run, step: Step) -> anyhow::Result<Vec<Point>> {
    let b = &run.budget;
    Ok(match step {
        Step::LearningCurve => {
            let path = run.root.join(b.t1_config);
            let lr = TrainConfig::load(Some(&path), &[])
                .with_context(|| format!("reading {}", path.display()))?
                .lr;
            b.curve_sizes
                .iter()
                .map(|&n| Point::new(n, lr, b.curve_min_seen))
                .collect()
        }
        Step::Hparams => b
            .hp_lrs
            .iter()
            .map(|&lr| Point::new(b.hp_examples, lr, b.hp_examples))
            .collect(),
        _ => Vec::new(),
    })
}

/// The folders a step writes (see `step_outputs`).
pub fn outputs(run: &Run, step: Step) -> anyhow::Result<Vec<PathBuf>> {
    Ok(points(run, step)?
        .iter()
        .map(|p| run.dir.join(p.folder(step)))
        .collect())
}

/// Trains the Task 1 config with `overrides` (`supportlm train --set`, in order) on the run's Task 1
/// data into `train`, unless that run finished; an interrupted one continues with `--resume`.
pub fn train_task1(
    run: &Run,
    step: Step,
    overrides: &[String],
    train: &Path,
) -> anyhow::Result<()> {
    if train.join("outcome.json").exists() {
        return Ok(());
    }
    let s = |x: &str| x.to_string();
    let mut args = vec![s("train"), s("--config"), s(run.budget.t1_config)];
    for o in overrides {
        args.extend([s("--set"), o.clone()]);
    }
    args.extend([
        s("--data"),
        run.path("data/category"),
        s("--out"),
        train.display().to_string(),
    ]);
    if train.exists() {
        args.push(s("--resume"));
    }
    run.supportlm(step, &args)
}

/// Scores an SFT adapter with the constrained rule on the run's Task 1 data (`extra`: which items,
/// e.g. `--limit N` or `--items-file F`) into `out`, unless that evaluation finished.
pub fn score_sft(
    run: &Run,
    step: Step,
    adapter: &Path,
    extra: Vec<String>,
    out: &Path,
) -> anyhow::Result<()> {
    let s = |x: &str| x.to_string();
    let mut args = vec![
        s("eval"),
        s("classify"),
        s("--method"),
        s("sft"),
        s("--decision"),
        s("constrained"),
        s("--data"),
        run.path("data/category"),
        s("--seed"),
        run.budget.seed.to_string(),
        s("--adapter"),
        adapter.display().to_string(),
    ];
    args.extend(extra);
    args.extend([s("--out"), out.display().to_string()]);
    run.evaluation(step, &args)
}

/// Trains and evaluates every point of `step` that has not finished.
pub fn run_points(run: &Run, step: Step) -> anyhow::Result<()> {
    let b = &run.budget;
    for p in points(run, step)? {
        let dir = run.dir.join(p.folder(step));
        let train = dir.join("train");
        let overrides = [
            format!("seed={}", b.seed),
            format!("train_examples={}", p.examples),
            format!("epochs={}", p.epochs),
            format!("lr={:e}", p.lr),
        ];
        train_task1(run, step, &overrides, &train)?;
        let items = vec!["--limit".to_string(), b.sweep_items.to_string()];
        score_sft(
            run,
            step,
            &train.join("best-adapter"),
            items,
            &dir.join("eval"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_sets_are_repeated_to_the_minimum() {
        assert_eq!(Point::new(11, 1e-3, 220).epochs, 20);
        assert_eq!(Point::new(110, 1e-3, 220).epochs, 2);
        assert_eq!(Point::new(1100, 1e-3, 220).epochs, 1);
        assert_eq!(Point::new(0, 1e-3, 220).epochs, 220);
        let p = Point::new(110, 2e-4, 110);
        assert_eq!(p.folder(Step::Hparams), "hparams/lr2e-4");
        assert_eq!(p.folder(Step::LearningCurve), "curve/n110");
    }
}
