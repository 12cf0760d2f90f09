//! `supportlm eval export-human` and `eval import-human`: the blinded human-evaluation sheet of
//! Task 2 (`supportlm_prompting::human`) written from response runs, and filled copies read back.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use supportlm_data::fsio::write_atomic;
use supportlm_prompting::human::{
    read_sheet, summarise, write_sheet, Candidate, HumanSummary, Key,
};

#[derive(Args)]
pub struct ExportHumanArgs {
    /// A Task 2 run folder (with `predictions.jsonl`) as NAME=DIR, or DIR (named after the folder);
    /// repeat for each method.
    #[arg(long = "run", required = true)]
    runs: Vec<String>,
    /// Add the dataset's reference reply as one more blinded response (a control for the raters).
    #[arg(long)]
    with_reference: bool,
    /// Items on the sheet (drawn among those every run answered).
    #[arg(long, default_value_t = 30)]
    items: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder: `sheet.csv` (for the raters), `key.json` (keep it from them), `README.txt`.
    #[arg(long)]
    out: PathBuf,
    /// Replace a sheet already in --out (raters' copies elsewhere stay valid only with the old key).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct ImportHumanArgs {
    /// Filled copies of the sheet, one per rater.
    #[arg(required = true)]
    sheets: Vec<PathBuf>,
    /// The key `export-human` wrote (default: `key.json` beside the first sheet).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The summary to write (default: `summary.json` beside the key).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the bootstrap intervals.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// The candidates of `runs` (`NAME=DIR` or `DIR`), plus the reference when asked.
pub fn candidates(runs: &[String], with_reference: bool) -> anyhow::Result<Vec<Candidate>> {
    let mut out: Vec<Candidate> = Vec::new();
    for run in runs {
        let (name, dir) = match run.split_once('=') {
            Some((n, d)) => (n.to_string(), PathBuf::from(d)),
            None => {
                let dir = PathBuf::from(run);
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| run.clone());
                (name, dir)
            }
        };
        if out.iter().any(|c| c.method == name) {
            bail!("two runs are named `{name}`: name them NAME=DIR");
        }
        out.push(Candidate::from_run(&name, &dir, false)?);
    }
    if with_reference {
        let first = runs[0].split_once('=').map_or(runs[0].as_str(), |(_, d)| d);
        out.push(Candidate::from_run("reference", Path::new(first), true)?);
    }
    Ok(out)
}

pub fn export_cmd(args: ExportHumanArgs) -> anyhow::Result<()> {
    let sheet_path = args.out.join("sheet.csv");
    if sheet_path.exists() && !args.force {
        bail!(
            "{} exists (raters may be filling it): pass --force to replace it and its key",
            sheet_path.display()
        );
    }
    let candidates = candidates(&args.runs, args.with_reference)?;
    let key = write_sheet(&args.out, &candidates, args.items, args.seed)?;
    println!(
        "{} items x {} responses -> {} (key: {})",
        key.items.len(),
        key.methods.len(),
        sheet_path.display(),
        args.out.join("key.json").display()
    );
    Ok(())
}

/// Reads the key and the sheets and summarises them.
pub fn import(sheets: &[PathBuf], key_path: &Path, seed: u64) -> anyhow::Result<HumanSummary> {
    let key: Key = serde_json::from_str(
        &std::fs::read_to_string(key_path)
            .with_context(|| format!("reading {}", key_path.display()))?,
    )
    .with_context(|| format!("{} is not a human-evaluation key", key_path.display()))?;
    let mut read = Vec::new();
    for path in sheets {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        read.push(read_sheet(&text, &key, &path.display().to_string())?);
    }
    Ok(summarise(&key, &read, 1000, seed))
}

pub fn import_cmd(args: ImportHumanArgs) -> anyhow::Result<()> {
    let key_path = match &args.key {
        Some(k) => k.clone(),
        None => args.sheets[0]
            .parent()
            .unwrap_or(Path::new("."))
            .join("key.json"),
    };
    let summary = import(&args.sheets, &key_path, args.seed)?;
    let out = args.out.clone().unwrap_or_else(|| {
        key_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("summary.json")
    });
    write_atomic(&out, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!(
        "{} rater(s), {} items, {} scores ({} cells empty)",
        summary.raters, summary.items, summary.ratings, summary.missing
    );
    for m in &summary.methods {
        let cells: Vec<String> = m
            .criteria
            .iter()
            .map(|(c, i, _)| format!("{c} {:.2} [{:.2}, {:.2}]", i.estimate, i.low, i.high))
            .collect();
        println!("  {:<14} {}", m.method, cells.join("  "));
    }
    for a in &summary.agreement {
        match a.kappa {
            Some(k) => println!(
                "  agreement on {}: {} kappa {k:.3} over {} responses",
                a.criterion,
                if a.statistic == "cohen" {
                    "Cohen's"
                } else {
                    "Fleiss'"
                },
                a.units
            ),
            None => println!(
                "  agreement on {}: undefined ({} responses)",
                a.criterion, a.units
            ),
        }
    }
    println!("summary -> {}", out.display());
    Ok(())
}
