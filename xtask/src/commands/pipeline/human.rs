//! The report's human-evaluation section: the pipeline writes a blinded sheet of its Task 2 runs
//! (`human/sheet.csv`, `human/key.json`; never replaced, raters may be filling it), and once
//! `supportlm eval import-human` has written `human/summary.json` from filled copies, the section
//! shows each method's means with intervals and the raters' agreement.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use supportlm_prompting::human::{self, Candidate, HumanSummary, Key};

use super::tables::{interval, read_json, table};

/// Items on the pipeline's sheet.
const ITEMS: usize = 30;

/// Writes `human/` for the Task 2 runs of `runs` (folder under `t2/`, name) and the reference
/// replies when there is no sheet yet and at least two runs have finished.
fn write_sheet(run_dir: &Path, runs: &[(&str, &str)], seed: u64) -> anyhow::Result<()> {
    let dir = run_dir.join("human");
    if dir.join("sheet.csv").exists() {
        return Ok(());
    }
    let finished: Vec<(&str, PathBuf)> = runs
        .iter()
        .map(|&(folder, name)| (name, run_dir.join("t2").join(folder)))
        .filter(|(_, run)| run.join("predictions.jsonl").exists())
        .collect();
    if finished.len() < 2 {
        return Ok(());
    }
    let mut candidates = finished
        .iter()
        .map(|(name, run)| Candidate::from_run(name, run, false))
        .collect::<Result<Vec<_>, _>>()?;
    candidates.push(Candidate::from_run("reference", &finished[0].1, true)?);
    human::write_sheet(&dir, &candidates, ITEMS, seed)?;
    Ok(())
}

/// The section.
pub(super) fn section(
    md: &mut String,
    run_dir: &Path,
    runs: &[(&str, &str)],
    seed: u64,
) -> anyhow::Result<()> {
    write_sheet(run_dir, runs, seed)?;
    let dir = run_dir.join("human");
    if !dir.join("sheet.csv").exists() {
        return Ok(());
    }
    writeln!(md, "## Human evaluation (Task 2)\n")?;
    let Some(s) = read_json::<HumanSummary>(&dir.join("summary.json")) else {
        let items = read_json::<Key>(&dir.join("key.json")).map_or(0, |k| k.items.len());
        writeln!(
            md,
            "`human/sheet.csv` holds {items} test messages with the replies of every Task 2 method and \
             the dataset's reference, blinded and shuffled per message (`human/key.json` maps them \
             back). Give raters a copy each, then run `supportlm eval import-human A.csv B.csv … \
             --key human/key.json` in the run folder; this section shows the result on the next \
             report.\n"
        )?;
        return Ok(());
    };
    writeln!(
        md,
        "{} rater(s), {} messages, {} scores ({} cells left empty). Means of the per-message means \
         over raters, 95% bootstrap intervals over messages; relevance 0–5, politeness 0–3, \
         actionable 0–2. The dataset's reference reply is rated blind as a control.\n",
        s.raters, s.items, s.ratings, s.missing
    )?;
    let mut header = vec!["method".to_string()];
    if let Some(m) = s.methods.first() {
        header.extend(m.criteria.iter().map(|(c, _, _)| c.clone()));
    }
    let rows: Vec<Vec<String>> = s
        .methods
        .iter()
        .map(|m| {
            std::iter::once(m.method.clone())
                .chain(m.criteria.iter().map(|(_, i, _)| interval(Some(i))))
                .collect()
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(md, &header, &rows);
    if !s.agreement.is_empty() {
        let rows: Vec<Vec<String>> = s
            .agreement
            .iter()
            .map(|a| {
                vec![
                    a.criterion.clone(),
                    if a.statistic == "cohen" {
                        "Cohen's kappa"
                    } else {
                        "Fleiss' kappa"
                    }
                    .into(),
                    a.kappa.map_or("undefined".into(), |k| format!("{k:.3}")),
                    a.units.to_string(),
                ]
            })
            .collect();
        writeln!(md, "Agreement between raters:\n")?;
        table(md, &["criterion", "statistic", "kappa", "responses"], &rows);
    }
    Ok(())
}
