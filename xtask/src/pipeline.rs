//! `cargo xtask pipeline`: the study, end to end. Today: setup → data check → splits → statistics → report.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use supportlm_data::{fsio::write_atomic, load_csv, shipped, split, stats, SplitConfig, Task};

#[derive(Args)]
pub struct PipelineArgs {
    /// The quick variant (smaller subsets; what the README runs).
    #[arg(long)]
    quick: bool,
    /// Name of the run: outputs go to runs/<name>/. Default: `quick` or `full`.
    #[arg(long)]
    name: Option<String>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    let name = args
        .name
        .unwrap_or_else(|| if args.quick { "quick" } else { "full" }.to_string());
    let root = workspace_root().join("runs").join(&name);
    let mut report = String::new();
    writeln!(report, "# supportlm report: run `{name}`\n")?;

    crate::setup::run(&workspace_root())?;
    let t = Instant::now();
    let data_dir = shipped::data_dir();
    shipped::verify(&data_dir).context("data check")?;
    let dataset = load_csv(&data_dir.join(shipped::ALL_ROWS.name))?;
    eprintln!(
        "[data check] {} rows, sha256 verified ({:.1}s)",
        dataset.records.len(),
        t.elapsed().as_secs_f64()
    );

    writeln!(report, "## Data\n")?;
    writeln!(
        report,
        "Source: `data/bitext/{}` (sha256 `{}`), {} rows.\n",
        shipped::ALL_ROWS.name,
        dataset.sha256,
        dataset.records.len()
    )?;
    writeln!(report, "| split task | train | validation | test | duplicates (train/val/test) | shared instructions |")?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    for task in Task::ALL {
        let t = Instant::now();
        let config = SplitConfig {
            task,
            seed: args.seed,
            ..Default::default()
        };
        let out = root.join("data").join(task.as_str());
        let manifest = split::split(&dataset, &config)?.write(&out, &dataset)?;
        let s = |k: &str| &manifest.splits[k];
        writeln!(
            report,
            "| {task} | {} | {} | {} | {}/{}/{} | {} |",
            s("train").rows,
            s("validation").rows,
            s("test").rows,
            s("train").duplicates,
            s("validation").duplicates,
            s("test").duplicates,
            manifest.instructions_shared_between_splits
        )?;
        eprintln!(
            "[split {task}] -> {} ({:.1}s)",
            out.display(),
            t.elapsed().as_secs_f64()
        );
    }

    let st = stats::stats(&dataset.records);
    writeln!(report, "\n### Statistics\n\n```text\n{st}```")?;
    let report_path = root.join("report.md");
    write_atomic(&report_path, report.as_bytes())
        .with_context(|| report_path.display().to_string())?;
    eprintln!("[report] {}", report_path.display());
    Ok(())
}

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
