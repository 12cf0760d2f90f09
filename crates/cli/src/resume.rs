//! Resumable evaluation runs: results are appended to a partial file in fixed chunks of the item list,
//! and a rerun with the same settings skips the chunks already there. Chunks are fixed so that batches,
//! and with them every float, are the same whether or not a run was interrupted.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use supportlm_data::Record;

/// Records `settings` as `run.json` in `out`, refusing a folder that holds a run with other settings.
pub fn claim_folder(out: &Path, settings: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    for leftover in supportlm_data::fsio::leftovers(out)? {
        tracing::warn!(path = %leftover.display(), "removing what an interrupted run left unfinished");
        supportlm_data::fsio::remove_leftover(&leftover)?;
    }
    let path = out.join("run.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let old: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if &old != settings {
            bail!(
                "{} holds a run with other settings ({old}); use another --out",
                out.display()
            );
        }
    }
    supportlm_data::fsio::write_atomic(&path, serde_json::to_string_pretty(settings)?.as_bytes())?;
    Ok(())
}

/// A progress bar over items.
pub fn item_bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} {{per_sec}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Every line of a finished JSON-lines file (blank lines skipped). A file that cannot be read is an
/// error naming it with `hint` (where it comes from); a line that does not parse names the file, the
/// line and `item` (what each line should be).
pub fn read_jsonl<T: DeserializeOwned>(
    path: &Path,
    hint: &str,
    item: &str,
) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} ({hint})", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not {item}", path.display(), i + 1))
        })
        .collect()
}

/// The results saved so far. A line cut short by a crash (and anything after it) is named and
/// dropped, never read as a result.
fn read_partial<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str(line) {
            Ok(item) => out.push(item),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    line = i + 1,
                    "dropping an unfinished result an interrupted run left ({e})"
                );
                break;
            }
        }
    }
    Ok(out)
}

fn jsonl<T: Serialize>(items: &[T]) -> anyhow::Result<String> {
    let mut out = String::new();
    for item in items {
        out += &serde_json::to_string(item)?;
        out.push('\n');
    }
    Ok(out)
}

/// The work on one chunk: its records, and a callback for items done within it.
pub type Work<'a, T> = dyn FnMut(&[Record], &mut dyn FnMut(usize)) -> anyhow::Result<Vec<T>> + 'a;

/// Writes `items` as JSON lines, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> anyhow::Result<()> {
    supportlm_data::fsio::write_atomic(path, jsonl(items)?.as_bytes())?;
    Ok(())
}

/// Runs `work` over `records` in chunks of `chunk`, appending results to `partial` (one JSON line each,
/// `id_of` naming the record it belongs to) and skipping chunks a previous run finished. Returns all
/// results in `records` order and how many items were worked on now. `work` gets the chunk and a
/// callback for items done within it.
pub fn run_chunks<T: Serialize + DeserializeOwned>(
    partial: &Path,
    records: &[Record],
    chunk: usize,
    id_of: fn(&T) -> usize,
    bar: &ProgressBar,
    work: &mut Work<T>,
) -> anyhow::Result<(Vec<T>, usize)> {
    let saved: Vec<T> = read_partial(partial)?;
    let saved_ids: HashSet<usize> = saved.iter().map(id_of).collect();
    let chunks: Vec<&[Record]> = records.chunks(chunk.max(1)).collect();
    let complete = |c: &[Record]| c.iter().all(|r| saved_ids.contains(&r.id));
    let kept: HashSet<usize> = chunks
        .iter()
        .filter(|c| complete(c))
        .flat_map(|c| c.iter().map(|r| r.id))
        .collect();
    let mut done: Vec<T> = saved
        .into_iter()
        .filter(|p| kept.contains(&id_of(p)))
        .collect();
    // Keep whole chunks only.
    write_jsonl(partial, &done)?;
    let todo: Vec<&[Record]> = chunks.iter().filter(|c| !complete(c)).copied().collect();
    let todo_items: usize = todo.iter().map(|c| c.len()).sum();
    if !done.is_empty() {
        tracing::info!(done = done.len(), left = todo_items, "resuming");
    }
    bar.set_position(done.len() as u64);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)?;
    for c in todo {
        let base = done.len() as u64;
        let results = work(c, &mut |n| bar.set_position(base + n as u64))?;
        let text = jsonl(&results)?;
        // Two writes, so that crash tests can land between them: a resumed run drops the cut line.
        let (first, second) = text.as_bytes().split_at(text.len() / 2);
        file.write_all(first)?;
        supportlm_data::fsio::chaos::point("eval: half a chunk of results appended");
        file.write_all(second)?;
        file.flush()?;
        supportlm_data::fsio::chaos::point("eval: a chunk of results appended");
        done.extend(results);
    }
    bar.finish();
    let order: HashMap<usize, usize> = records.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    done.sort_by_key(|p| order.get(&id_of(p)).copied().unwrap_or(usize::MAX));
    Ok((done, todo_items))
}
