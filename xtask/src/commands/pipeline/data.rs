//! The pipeline's data step: check the shipped data's hashes, write the seeded splits of every task
//! under `runs/<name>/data/<task>/`, and a summary (`data/summary.md`) for the report.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Context;
use supportlm_data::{fsio::write_atomic, load_csv, shipped, split, stats, SplitConfig, Task};

use super::Run;

pub fn run(run: &Run) -> anyhow::Result<()> {
    let mut report = String::new();
    let t = Instant::now();
    let data_dir = shipped::data_dir();
    shipped::verify(&data_dir).context("data check")?;
    let dataset = load_csv(&data_dir.join(shipped::ALL_ROWS.name))?;
    eprintln!(
        "[data check] {} rows, sha256 verified ({:.1}s)",
        dataset.records.len(),
        t.elapsed().as_secs_f64()
    );

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
            seed: run.budget.seed,
            ..Default::default()
        };
        let out = run.dir.join("data").join(task.as_str());
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
    let path = run.dir.join("data").join("summary.md");
    write_atomic(&path, report.as_bytes()).with_context(|| path.display().to_string())?;
    Ok(())
}
