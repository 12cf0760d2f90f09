//! `cargo xtask sweep`: Task 1 settings varied one axis at a time around a config (the plan:
//! `configs/sweep-task1.toml`), with seeds. Each point is trained by `supportlm train` and scored by
//! `supportlm eval classify` (SFT, constrained rule) on the plan's seeded test items. A point's folder
//! is named by the hash of its effective training config, so points that are the same run (the
//! config's own setting on several axes) are trained once; finished trainings and evaluations are
//! kept, interrupted ones continue. Writes `runs/<name>/sweep/summary.md` and `summary.json`, which
//! the pipeline's report of the same run includes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use supportlm_data::fsio::{sha256_hex, write_atomic};
use supportlm_prompting::report::ClassifyMetrics;
use supportlm_train::{TrainConfig, TrainOutcome};

#[derive(Args)]
pub struct SweepArgs {
    /// The plan.
    #[arg(long, default_value = "configs/sweep-task1.toml")]
    plan: PathBuf,
    /// Outputs go to runs/<name>/sweep/ (the full pipeline's run by default, whose report shows them).
    #[arg(long, default_value = "full")]
    name: String,
    /// Only these axes (repeatable).
    #[arg(long)]
    axis: Vec<String>,
    /// Only the cells with these seeds (repeatable; e.g. one seed of a three-seed axis at a time).
    #[arg(long)]
    seed: Vec<u64>,
    /// Only the cells with these settings' labels (repeatable; e.g. `--setting 3300`).
    #[arg(long)]
    setting: Vec<String>,
    /// Train each point on this many examples instead of the plan's (a smaller, separate run: use
    /// another --name).
    #[arg(long)]
    examples: Option<usize>,
    /// Score each point on this many test items instead of the plan's.
    #[arg(long)]
    items: Option<usize>,
    /// List the points and which are done, run nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `configs/sweep-task1.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The training config every point starts from.
    pub config: String,
    /// Balanced training examples of every point (a point's `set` may override it).
    pub train_examples: usize,
    /// Seeded test items every point is scored on.
    pub test_items: usize,
    /// Seeds of every axis that names none.
    pub seeds: Vec<u64>,
    #[serde(rename = "axis")]
    pub axes: Vec<Axis>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Axis {
    pub name: String,
    pub what: String,
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    pub points: Vec<PointSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSpec {
    pub label: String,
    pub set: Vec<String>,
}

/// One training run of the sweep.
#[derive(Debug, Clone, Serialize)]
struct Point {
    /// `points/<hash>` under the sweep folder.
    folder: String,
    /// `supportlm train --set` overrides, in order.
    overrides: Vec<String>,
    task: String,
}

/// A cell of an axis: its label and seed, and the point that runs it.
#[derive(Debug, Clone)]
struct Cell {
    axis: usize,
    label: String,
    seed: u64,
    point: Point,
}

/// A point's measured figures (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    pub axis: String,
    pub label: String,
    pub seed: u64,
    pub folder: String,
    pub macro_f1: supportlm_metrics::Interval,
    pub accuracy: supportlm_metrics::Interval,
    pub best_val_loss: f64,
    /// Wall time of the training; not compared in the summary (points trained while other work
    /// shared the cores took several times longer).
    pub train_seconds: f64,
    pub train_examples: usize,
    /// Optimizer steps taken.
    #[serde(default)]
    pub steps: usize,
}

impl Plan {
    pub fn load(path: &Path) -> anyhow::Result<Plan> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let plan: Plan =
            toml::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
        let mut names = std::collections::HashSet::new();
        for a in &plan.axes {
            anyhow::ensure!(
                names.insert(&a.name),
                "{}: axis {:?} is named twice",
                path.display(),
                a.name
            );
            anyhow::ensure!(
                !a.points.is_empty() && !a.seeds.as_ref().unwrap_or(&plan.seeds).is_empty(),
                "{}: axis {:?} needs points and seeds",
                path.display(),
                a.name
            );
        }
        Ok(plan)
    }

    /// Every cell of the chosen axes (all when `only` is empty), each with the point that runs it.
    fn cells(&self, root: &Path, only: &[String], examples: usize) -> anyhow::Result<Vec<Cell>> {
        for o in only {
            if !self.axes.iter().any(|a| &a.name == o) {
                bail!(
                    "no axis {o:?} in the plan (it has {})",
                    self.axes
                        .iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let config = root.join(&self.config);
        let mut out = Vec::new();
        for (i, axis) in self.axes.iter().enumerate() {
            if !only.is_empty() && !only.contains(&axis.name) {
                continue;
            }
            for seed in axis.seeds.as_ref().unwrap_or(&self.seeds) {
                for p in &axis.points {
                    let mut overrides =
                        vec![format!("seed={seed}"), format!("train_examples={examples}")];
                    overrides.extend(p.set.iter().cloned());
                    let effective = TrainConfig::load(Some(&config), &overrides)
                        .with_context(|| format!("axis {}, point {}", axis.name, p.label))?;
                    let hash = sha256_hex(effective.to_toml().as_bytes());
                    out.push(Cell {
                        axis: i,
                        label: p.label.clone(),
                        seed: *seed,
                        point: Point {
                            folder: format!("points/{}", &hash[..12]),
                            overrides,
                            task: effective.task.to_string(),
                        },
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The cells with one of `seeds` and one of `settings` (either empty: any); a seed or setting that no
/// cell of the chosen axes has is an error, not an empty sweep.
fn select(cells: Vec<Cell>, seeds: &[u64], settings: &[String]) -> anyhow::Result<Vec<Cell>> {
    for s in seeds {
        if !cells.iter().any(|c| c.seed == *s) {
            bail!("no cell of the chosen axes has seed {s}");
        }
    }
    for s in settings {
        if !cells.iter().any(|c| &c.label == s) {
            bail!("no cell of the chosen axes has the setting {s:?}");
        }
    }
    Ok(cells
        .into_iter()
        .filter(|c| seeds.is_empty() || seeds.contains(&c.seed))
        .filter(|c| settings.is_empty() || settings.contains(&c.label))
        .collect())
}

/// Runs `supportlm` with `args`, appending its output to `log`.
fn supportlm(exe: &Path, root: &Path, log: &Path, args: &[String]) -> anyhow::Result<()> {
    let status = crate::utils::run_logged(exe, root, log, "sweep", args)?;
    if !status.success() {
        bail!(
            "supportlm failed ({status}); its log is {}. Fix the cause and run the sweep again \
             (finished points are kept)",
            log.display()
        );
    }
    Ok(())
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    let plan = Plan::load(&root.join(&args.plan))?;
    let examples = args.examples.unwrap_or(plan.train_examples);
    let items = args.items.unwrap_or(plan.test_items);
    let cells = select(
        plan.cells(&root, &args.axis, examples)?,
        &args.seed,
        &args.setting,
    )?;
    // The summary covers the whole plan, whatever `--axis` runs now: a one-axis run neither hides the
    // other axes' finished points nor calls the sweep complete.
    let every_cell = plan.cells(&root, &[], examples)?;
    let dir = root.join("runs").join(&args.name).join("sweep");
    let mut points: Vec<&Point> = Vec::new();
    for c in &cells {
        // Same folder, same effective config: trained once, with the first cell's overrides.
        if !points.iter().any(|p| p.folder == c.point.folder) {
            points.push(&c.point);
        }
    }
    let done = |p: &Point| dir.join(&p.folder).join("eval/metrics.json").exists();
    eprintln!(
        "[sweep] {} cells, {} distinct trainings ({} done) on {examples} examples, scored on {items} \
         test items, in {}",
        cells.len(),
        points.len(),
        points.iter().filter(|p| done(p)).count(),
        dir.display()
    );
    if args.dry_run {
        for c in &cells {
            eprintln!(
                "  {:<14} {:<8} seed {:<5} {} {}",
                plan.axes[c.axis].name,
                c.label,
                c.seed,
                c.point.folder,
                if done(&c.point) { "done" } else { "to do" }
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let _lock = crate::utils::lock_folder(&dir, "sweep")?;
    let exe = crate::utils::build_cli(&root)?;
    let s = |x: &str| x.to_string();
    for (n, p) in points.iter().enumerate() {
        let pdir = dir.join(&p.folder);
        std::fs::create_dir_all(&pdir)?;
        write_atomic(
            &pdir.join("point.json"),
            serde_json::to_string_pretty(p)?.as_bytes(),
        )?;
        let log = pdir.join("log.txt");
        eprintln!("[sweep] point {}/{}: {}", n + 1, points.len(), p.folder);
        let train = pdir.join("train");
        if !train.join("outcome.json").exists() {
            let mut a = vec![s("train"), s("--config"), plan.config.clone()];
            for o in &p.overrides {
                a.extend([s("--set"), o.clone()]);
            }
            a.extend([s("--out"), train.display().to_string()]);
            if train.exists() {
                a.push(s("--resume"));
            }
            supportlm(&exe, &root, &log, &a)?;
        }
        if !done(p) {
            let a = vec![
                s("eval"),
                s("classify"),
                s("--task"),
                p.task.clone(),
                s("--method"),
                s("sft"),
                s("--decision"),
                s("constrained"),
                // The same test items for every point, whatever its training seed.
                s("--seed"),
                s("42"),
                s("--limit"),
                items.to_string(),
                s("--adapter"),
                train.join("best-adapter").display().to_string(),
                s("--out"),
                pdir.join("eval").display().to_string(),
            ];
            supportlm(&exe, &root, &log, &a)?;
        }
        // After every point, so an interrupted sweep leaves a summary of what it has finished.
        summarise(&plan, &every_cell, &dir)?;
    }
    summarise(&plan, &every_cell, &dir)
}

/// Writes `summary.json` (one result per cell) and `summary.md` (a table per axis: each label's
/// macro-F1 per seed and, with several seeds, their mean and standard deviation).
fn summarise(plan: &Plan, cells: &[Cell], dir: &Path) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for c in cells {
        let p = dir.join(&c.point.folder);
        let (Some(m), Some(o)) = (
            read::<ClassifyMetrics>(&p.join("eval/metrics.json")),
            read::<TrainOutcome>(&p.join("train/outcome.json")),
        ) else {
            continue;
        };
        results.push(CellResult {
            axis: plan.axes[c.axis].name.clone(),
            label: c.label.clone(),
            seed: c.seed,
            folder: c.point.folder.clone(),
            macro_f1: m.macro_f1,
            accuracy: m.accuracy,
            best_val_loss: o.best_val_loss,
            train_seconds: o.seconds,
            train_examples: o.train_examples,
            steps: o.steps,
        });
    }
    write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    let pending = cells.len() - results.len();
    write_atomic(
        &dir.join("summary.md"),
        markdown(plan, &results, pending).as_bytes(),
    )?;
    eprintln!("[sweep] {}", dir.join("summary.md").display());
    Ok(())
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Mean and sample standard deviation (`None` for one value).
fn mean_sd(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let sd = (v.len() > 1)
        .then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, sd)
}

/// The summary's Markdown: per axis, per label, macro-F1 of each seed (with its bootstrap interval
/// when there is one seed), mean ± sd over seeds, accuracy, best validation loss and optimizer steps
/// (not wall time: a point trained beside other work takes longer); first, while `pending` cells of
/// the plan have no result yet, a line saying the sweep is unfinished.
pub fn markdown(plan: &Plan, results: &[CellResult], pending: usize) -> String {
    let mut md = String::new();
    if pending > 0 {
        let _ = writeln!(
            md,
            "*Unfinished: {} of {} settings × seeds scored; `cargo xtask sweep` continues it.*\n",
            results.len(),
            results.len() + pending
        );
    }
    for axis in &plan.axes {
        let rows: Vec<&CellResult> = results.iter().filter(|r| r.axis == axis.name).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(md, "**{}**: {}\n", axis.name, axis.what);
        let mut by: BTreeMap<usize, (String, Vec<&CellResult>)> = BTreeMap::new();
        for r in rows {
            let i = axis
                .points
                .iter()
                .position(|p| p.label == r.label)
                .unwrap_or(usize::MAX);
            by.entry(i)
                .or_insert_with(|| (r.label.clone(), Vec::new()))
                .1
                .push(r);
        }
        let _ = writeln!(
            md,
            "| setting | examples | steps | seeds | macro-F1 per seed | macro-F1 mean ± sd | accuracy mean | best val loss mean |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for (_, (label, rs)) in by {
            let f1: Vec<f64> = rs.iter().map(|r| r.macro_f1.estimate).collect();
            let per_seed = if rs.len() == 1 {
                let i = &rs[0].macro_f1;
                format!("{:.4} [{:.4}, {:.4}]", i.estimate, i.low, i.high)
            } else {
                rs.iter()
                    .map(|r| format!("{:.4} (s{})", r.macro_f1.estimate, r.seed))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let (m, sd) = mean_sd(&f1);
            let avg =
                |f: fn(&CellResult) -> f64| mean_sd(&rs.iter().map(|r| f(r)).collect::<Vec<_>>()).0;
            // Seeds can stop early at different steps.
            let (lo, hi) = rs.iter().fold((usize::MAX, 0), |(lo, hi), r| {
                (lo.min(r.steps), hi.max(r.steps))
            });
            let steps = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}–{hi}")
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {steps} | {} | {per_seed} | {m:.4}{} | {:.4} | {:.4} |",
                rs[0].train_examples,
                rs.len(),
                sd.map_or(String::new(), |s| format!(" ± {s:.4}")),
                avg(|r| r.accuracy.estimate),
                avg(|r| r.best_val_loss),
            );
        }
        md.push('\n');
    }
    md
}

/// Where the sweep of run `run_dir` is (for the report).
pub fn summary_of(run_dir: &Path) -> PathBuf {
    run_dir.join("sweep/summary.md")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_plan_parses_and_shared_points_are_trained_once() {
        let root = crate::utils::workspace_root();
        let plan = Plan::load(&root.join("configs/sweep-task1.toml")).unwrap();
        let cells = plan.cells(&root, &[], plan.train_examples).unwrap();
        let mut folders: Vec<&str> = cells.iter().map(|c| c.point.folder.as_str()).collect();
        let n = folders.len();
        folders.sort();
        folders.dedup();
        assert!(
            folders.len() < n,
            "the config's own setting recurs on several axes"
        );
        // The config's seed-42 point, the rank-8 point and the lr=1e-3 point are one training.
        let of = |axis: &str, label: &str| {
            cells
                .iter()
                .find(|c| plan.axes[c.axis].name == axis && c.label == label && c.seed == 42)
                .unwrap()
                .point
                .folder
                .clone()
        };
        assert_eq!(of("seeds", "config"), of("rank", "8"));
        assert_eq!(of("seeds", "config"), of("lr", "1e-3"));
        assert_ne!(of("seeds", "config"), of("lr", "3e-3"));
        let err = plan.cells(&root, &["nope".into()], 10).unwrap_err();
        assert!(err.to_string().contains("no axis \"nope\""), "{err}");
    }

    #[test]
    fn seeds_and_settings_select_cells() {
        let root = crate::utils::workspace_root();
        let plan = Plan::load(&root.join("configs/sweep-task1.toml")).unwrap();
        let examples = || plan.cells(&root, &["examples".into()], 1100).unwrap();
        assert_eq!(examples().len(), 12);
        let seven = select(examples(), &[7, 1234], &[]).unwrap();
        assert_eq!(seven.len(), 8);
        assert!(seven.iter().all(|c| c.seed != 42));
        let one = select(examples(), &[42], &["3300".into()]).unwrap();
        assert_eq!(
            (one.len(), one[0].seed, one[0].label.as_str()),
            (1, 42, "3300")
        );
        let err = select(examples(), &[5], &[]).unwrap_err();
        assert!(err.to_string().contains("seed 5"), "{err}");
        let err = select(examples(), &[], &["9".into()]).unwrap_err();
        assert!(err.to_string().contains("setting \"9\""), "{err}");
    }

    #[test]
    fn an_unfinished_sweep_says_so() {
        let root = crate::utils::workspace_root();
        let plan = Plan::load(&root.join("configs/sweep-task1.toml")).unwrap();
        let interval = |x: f64| supportlm_metrics::Interval {
            estimate: x,
            low: x - 0.01,
            high: x + 0.01,
        };
        let result = CellResult {
            axis: "lr".into(),
            label: "3e-3".into(),
            seed: 42,
            folder: "points/x".into(),
            macro_f1: interval(0.99),
            accuracy: interval(0.98),
            best_val_loss: 0.01,
            train_seconds: 200.0,
            train_examples: 1100,
            steps: 138,
        };
        let md = markdown(&plan, std::slice::from_ref(&result), 3);
        assert!(md.starts_with("*Unfinished: 1 of 4 settings"), "{md}");
        assert!(
            md.contains("| 3e-3 | 1100 | 138 | 1 | 0.9900 [0.9800, 1.0000] |"),
            "{md}"
        );
        let md = markdown(&plan, &[result], 0);
        assert!(md.starts_with("**lr**"), "{md}");
    }

    #[test]
    fn several_seeds_give_mean_sd_and_the_range_of_steps() {
        let root = crate::utils::workspace_root();
        let plan = Plan::load(&root.join("configs/sweep-task1.toml")).unwrap();
        let cell = |seed: u64, f1: f64, steps: usize| CellResult {
            axis: "examples".into(),
            label: "110".into(),
            seed,
            folder: format!("points/{seed}"),
            macro_f1: supportlm_metrics::Interval {
                estimate: f1,
                low: f1 - 0.01,
                high: f1 + 0.01,
            },
            accuracy: supportlm_metrics::Interval {
                estimate: 0.9,
                low: 0.8,
                high: 1.0,
            },
            best_val_loss: 0.5,
            train_seconds: 1.0,
            train_examples: 110,
            steps,
        };
        let md = markdown(&plan, &[cell(42, 0.9, 250), cell(7, 0.8, 180)], 0);
        // mean 0.85, sample sd 0.0707.
        assert!(
            md.contains("| 110 | 110 | 180–250 | 2 | 0.9000 (s42), 0.8000 (s7) | 0.8500 ± 0.0707 | 0.9000 | 0.5000 |"),
            "{md}"
        );
    }

    #[test]
    fn mean_and_sample_sd_by_hand() {
        assert_eq!(mean_sd(&[1.0]), (1.0, None));
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((sd.unwrap() - 1.0).abs() < 1e-12);
    }
}
