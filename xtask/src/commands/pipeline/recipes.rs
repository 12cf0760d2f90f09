//! The recipes step: Task 1 training recipes (`configs/task1-recipes.toml`: augmentation and budget
//! overrides of the Task 1 config) trained with the same seed and budget, each scored on the OOD
//! development slice (`data/ood/dev.csv`, where the choice is made), on the in-distribution test items
//! and once on the OOD set (`data/ood/ood.csv`, never chosen on). A recipe lives in
//! `t1-recipes/<name>/{train,dev,test,ood}`; finished parts are kept when the step is resumed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use supportlm_prompting::report::ClassifyMetrics;

use super::ood::OOD_FILE;
use super::sweeps::{score_sft, train_task1};
use super::tables::{correctness, interval, paired_mcnemar, read_json, table};
use super::{Run, Step};

/// The recipes, relative to the workspace root.
pub const RECIPES_FILE: &str = "configs/task1-recipes.toml";
/// The development slice the choice is made on.
pub const DEV_FILE: &str = "data/ood/dev.csv";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipes {
    /// How far below the best in-distribution macro-F1 a recipe may be and still be chosen.
    pub in_distribution_tolerance: f64,
    #[serde(rename = "recipe")]
    pub recipes: Vec<Recipe>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Folder name and table row.
    pub name: String,
    /// What the recipe changes, in words.
    pub what: String,
    /// `supportlm train --set` overrides of the Task 1 config.
    pub set: Vec<String>,
    /// Also run in the quick variant.
    #[serde(default)]
    pub quick: bool,
}

impl Recipes {
    pub fn load(run: &Run) -> anyhow::Result<Recipes> {
        let path = run.root.join(RECIPES_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let r: Recipes =
            toml::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
        let mut names = std::collections::HashSet::new();
        for x in &r.recipes {
            anyhow::ensure!(
                !x.name.is_empty()
                    && x.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{RECIPES_FILE}: recipe name {:?} must be letters, digits, '-' or '_'",
                x.name
            );
            anyhow::ensure!(
                names.insert(&x.name),
                "{RECIPES_FILE}: recipe {:?} is named twice",
                x.name
            );
        }
        Ok(r)
    }

    /// The recipes a run trains (the quick variant only those marked `quick`).
    pub fn for_run(self, run: &Run) -> Vec<Recipe> {
        self.recipes
            .into_iter()
            .filter(|r| r.quick || !run.budget.quick)
            .collect()
    }
}

fn folder(r: &Recipe) -> String {
    format!("t1-recipes/{}", r.name)
}

/// Where the default config's adapter (the t1-sft step's) is scored on the development slice.
const DEFAULT_DEV: &str = "t1-recipes/default/dev";

/// The folders the step writes.
pub fn outputs(run: &Run) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Recipes::load(run)?
        .for_run(run)
        .iter()
        .map(|r| run.dir.join(folder(r)))
        .collect();
    out.push(run.dir.join(DEFAULT_DEV));
    Ok(out)
}

/// Trains and scores every recipe that has not finished.
pub fn run_step(run: &Run) -> anyhow::Result<()> {
    let b = &run.budget;
    let s = |x: &str| x.to_string();
    for r in Recipes::load(run)?.for_run(run) {
        let dir = run.dir.join(folder(&r));
        let train = dir.join("train");
        let mut overrides = vec![
            format!("seed={}", b.seed),
            format!("train_examples={}", b.recipe_examples),
        ];
        overrides.extend(r.set.iter().cloned());
        train_task1(run, Step::T1Recipes, &overrides, &train)?;
        let parts: [(&str, Vec<String>); 3] = [
            (
                "dev",
                vec![
                    s("--items-file"),
                    run.root.join(DEV_FILE).display().to_string(),
                ],
            ),
            ("test", vec![s("--limit"), b.sweep_items.to_string()]),
            ("ood", {
                let mut a = vec![
                    s("--items-file"),
                    run.root.join(OOD_FILE).display().to_string(),
                ];
                if let Some(n) = b.ood_items {
                    a.extend([s("--limit"), n.to_string()]);
                }
                a
            }),
        ];
        for (part, extra) in parts {
            score_sft(
                run,
                Step::T1Recipes,
                &train.join("best-adapter"),
                extra,
                &dir.join(part),
            )?;
        }
    }
    // The default config's adapter on the development slice, for the table's last row.
    score_sft(
        run,
        Step::T1Recipes,
        &run.dir.join("t1/sft-train/best-adapter"),
        vec![
            s("--items-file"),
            run.root.join(DEV_FILE).display().to_string(),
        ],
        &run.dir.join(DEFAULT_DEV),
    )?;
    Ok(())
}

/// The recipe chosen from (development accuracy, in-distribution macro-F1) per recipe: the best
/// development accuracy among recipes whose macro-F1 is within `tolerance` of the best macro-F1,
/// ties broken by macro-F1, then by order (the simpler recipe comes first in the file).
pub fn choose(scores: &[(f64, f64)], tolerance: f64) -> Option<usize> {
    let best_f1 = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    let mut chosen: Option<usize> = None;
    for (i, &(dev, f1)) in scores.iter().enumerate() {
        if f1 < best_f1 - tolerance {
            continue;
        }
        let better = match chosen {
            None => true,
            Some(c) => {
                let (cd, cf) = scores[c];
                dev > cd || (dev == cd && f1 > cf)
            }
        };
        if better {
            chosen = Some(i);
        }
    }
    chosen
}

/// The examples a finished training run in `train` used.
fn examples_of(train: &Path) -> Option<usize> {
    read_json::<supportlm_train::TrainOutcome>(&train.join("outcome.json"))
        .map(|o| o.train_examples)
}

/// The report's recipe table: what each change buys on the development slice, in distribution and
/// out of distribution, against the first recipe (McNemar on the OOD messages), and which is chosen.
pub fn report(md: &mut String, run: &Run) -> anyhow::Result<()> {
    let d = &run.dir;
    if !d.join("t1-recipes").exists() {
        return Ok(());
    }
    let recipes = Recipes::load(run)?;
    let tolerance = recipes.in_distribution_tolerance;
    struct Row {
        recipe: Recipe,
        examples: Option<usize>,
        dev: ClassifyMetrics,
        test: ClassifyMetrics,
        ood: ClassifyMetrics,
        ood_correct: Option<HashMap<u64, bool>>,
    }
    let mut rows = Vec::new();
    for r in recipes.for_run(run) {
        let dir = d.join(folder(&r));
        let metrics =
            |part: &str| read_json::<ClassifyMetrics>(&dir.join(part).join("metrics.json"));
        let (Some(dev), Some(test), Some(ood)) = (metrics("dev"), metrics("test"), metrics("ood"))
        else {
            continue;
        };
        let examples = examples_of(&dir.join("train"));
        rows.push(Row {
            ood_correct: correctness(&dir.join("ood")),
            recipe: r,
            examples,
            dev,
            test,
            ood,
        });
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(md, "### What makes SFT generalise: training recipes\n")?;
    writeln!(
        md,
        "Each recipe of `{RECIPES_FILE}` is the Task 1 config with the changes named, trained with the \
         same seed on {} balanced examples unless it says otherwise, then scored on the development \
         slice `{DEV_FILE}` ({} hand-written messages, where the choice is made), on {} in-distribution \
         test items and once on the OOD set (never chosen on). Chosen: the best development accuracy \
         among recipes within {tolerance} of the best in-distribution macro-F1. McNemar compares each \
         recipe with the first on the same OOD messages.\n",
        run.budget.recipe_examples, rows[0].dev.items, rows[0].test.items,
    )?;
    let chosen = choose(
        &rows
            .iter()
            .map(|r| (r.dev.accuracy.estimate, r.test.macro_f1.estimate))
            .collect::<Vec<_>>(),
        tolerance,
    );
    let first = rows[0].ood_correct.as_ref();
    let first_ood = rows[0].ood.accuracy.estimate;
    // One table row; `correct`: which OOD messages it got right, compared with the first recipe's
    // (`None` for the first itself).
    let row = |name: String,
               what: String,
               examples: Option<usize>,
               (dev, test, ood): (&ClassifyMetrics, &ClassifyMetrics, &ClassifyMetrics),
               correct: Option<&HashMap<u64, bool>>| {
        let versus = match (first, correct) {
            (Some(a), Some(b)) => {
                let (_, t) = paired_mcnemar(b, a);
                format!(
                    "{} / {} · {}",
                    t.a_only,
                    t.b_only,
                    super::tables::p_is(t.exact_p)
                )
            }
            _ => "–".into(),
        };
        vec![
            name,
            what,
            examples.map_or("–".into(), |n| n.to_string()),
            interval(Some(&dev.accuracy)),
            interval(Some(&test.macro_f1)),
            interval(Some(&ood.accuracy)),
            format!("{:+.4}", ood.accuracy.estimate - first_ood),
            versus,
        ]
    };
    let mut out: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            row(
                format!(
                    "{}{}",
                    r.recipe.name,
                    if chosen == Some(i) { " (chosen)" } else { "" }
                ),
                r.recipe.what.clone(),
                r.examples,
                (&r.dev, &r.test, &r.ood),
                r.ood_correct.as_ref().filter(|_| i > 0),
            )
        })
        .collect();
    // The default config, as the t1-sft step trained it and the other steps scored it.
    let default = (
        read_json::<ClassifyMetrics>(&d.join(DEFAULT_DEV).join("metrics.json")),
        read_json::<ClassifyMetrics>(&d.join("t1/sft-constrained/metrics.json")),
        read_json::<ClassifyMetrics>(&d.join("t1-ood/sft-constrained/metrics.json")),
    );
    if let (Some(dev), Some(test), Some(ood)) = default {
        out.push(row(
            "default config (t1-sft)".into(),
            format!(
                "`{}` as the Task 1 SFT step trains it (test: {} items)",
                run.budget.t1_config, test.items
            ),
            examples_of(&d.join("t1/sft-train")),
            (&dev, &test, &ood),
            correctness(&d.join("t1-ood/sft-constrained")).as_ref(),
        ));
    }
    table(
        md,
        &[
            "recipe",
            "changes",
            "training examples",
            "dev accuracy (Wilson 95%)",
            "test macro-F1 (bootstrap 95%)",
            "OOD accuracy (Wilson 95%)",
            "OOD vs first",
            "OOD only this right / only first right · McNemar exact p",
        ],
        &out,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_the_best_development_accuracy_within_the_in_distribution_tolerance() {
        // The second is best on dev but loses too much in distribution; the third wins.
        let s = [(0.80, 0.990), (0.95, 0.970), (0.90, 0.985), (0.90, 0.995)];
        assert_eq!(choose(&s, 0.01), Some(3), "tie on dev broken by macro-F1");
        assert_eq!(choose(&s, 0.05), Some(1));
        assert_eq!(choose(&s[..3], 0.01), Some(2));
        // Exact ties keep the earlier (simpler) recipe.
        assert_eq!(choose(&[(0.9, 0.99), (0.9, 0.99)], 0.0), Some(0));
        assert_eq!(choose(&[], 0.01), None);
    }

    #[test]
    fn the_shipped_recipes_parse_and_each_override_is_a_valid_config() {
        let root = crate::utils::workspace_root();
        let text = std::fs::read_to_string(root.join(RECIPES_FILE)).unwrap();
        let r: Recipes = toml::from_str(&text).unwrap();
        assert!(r.recipes.iter().any(|x| x.quick));
        for x in &r.recipes {
            let c = supportlm_train::TrainConfig::load(
                Some(&root.join("configs/task1-category.toml")),
                &x.set,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", x.name));
            // The baseline stays the messages as Bitext has them, whatever the default config does.
            if x.name == "plain" {
                assert!(
                    c.augment.is_off(),
                    "plain rewrites messages: {:?}",
                    c.augment
                );
            }
        }
    }
}
