//! The learning curve (SFT macro-F1 against the number of training examples) and the learning-rate
//! comparison. Both are made of *points*: one Task 1 QLoRA training on `n` balanced examples at one
//! learning rate, then a constrained evaluation on the budget's seeded test items. A point lives in
//! `curve/n<N>/{train,eval}` or `hparams/lr<LR>/{train,eval}` (each step owns its folders); an
//! interrupted point continues (training with `--resume`, evaluation from its partial file).

use std::path::PathBuf;

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

/// Trains and evaluates every point of `step` that has not finished.
pub fn run_points(run: &Run, step: Step) -> anyhow::Result<()> {
    let b = &run.budget;
    let s = |x: &str| x.to_string();
    for p in points(run, step)? {
        let folder = p.folder(step);
        let train = run.dir.join(&folder).join("train");
        if !train.join("outcome.json").exists() {
            let mut args = vec![
                s("train"),
                s("--config"),
                s(b.t1_config),
                s("--set"),
                format!("seed={}", b.seed),
                s("--set"),
                format!("train_examples={}", p.examples),
                s("--set"),
                format!("epochs={}", p.epochs),
                s("--set"),
                format!("lr={:e}", p.lr),
                s("--data"),
                run.path("data/category"),
                s("--out"),
                train.display().to_string(),
            ];
            if train.exists() {
                args.push(s("--resume"));
            }
            run.supportlm(step, &args)?;
        }
        let eval = run.dir.join(&folder).join("eval");
        if !eval.join("metrics.json").exists() {
            let args = vec![
                s("eval"),
                s("classify"),
                s("--method"),
                s("sft"),
                s("--decision"),
                s("constrained"),
                s("--data"),
                run.path("data/category"),
                s("--seed"),
                b.seed.to_string(),
                s("--limit"),
                b.sweep_items.to_string(),
                s("--adapter"),
                train.join("best-adapter").display().to_string(),
                s("--out"),
                eval.display().to_string(),
            ];
            run.supportlm(step, &args)?;
        }
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
