//! Human evaluation of Task 2: a blinded rating sheet and what raters' filled copies say.
//!
//! [`export`] draws items every method answered (seeded), shuffles each item's responses into
//! slots A, B, … (seeded per item), and writes a CSV sheet with one row per (item, slot) and empty
//! columns for the judge's rubric ([`crate::judge::CRITERIA`]: relevance 0–5, politeness 0–3,
//! actionable 0–2), plus a [`Key`] that maps slots back to methods. [`read_sheet`] checks a filled
//! copy against the key; [`summarise`] gives each method's mean per criterion with a bootstrap
//! interval over items, and the raters' agreement per criterion (Cohen's kappa for two raters,
//! Fleiss' for more, on the responses every rater scored).

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use supportlm_metrics::{bootstrap_ci, cohen_kappa, fleiss_kappa, Interval};

use crate::error::{PromptError, Result};
use crate::judge::CRITERIA;

const HEADER: [&str; 8] = [
    "item",
    "message",
    "slot",
    "response",
    "relevance",
    "politeness",
    "actionable",
    "comment",
];

/// One method's responses, by record id: `(message, response)`.
pub struct Candidate {
    /// The method's name (kept in the key, never in the sheet).
    pub method: String,
    /// Its responses.
    pub responses: BTreeMap<usize, (String, String)>,
}

impl Candidate {
    /// A Task 2 run's replies from its `predictions.jsonl` (`reference`: the dataset's replies to
    /// the same messages instead of the generated ones).
    pub fn from_run(method: &str, dir: &std::path::Path, reference: bool) -> Result<Candidate> {
        let path = dir.join("predictions.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| PromptError::io(&path, e))?;
        let mut responses = BTreeMap::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let at = || format!("{} line {}", path.display(), i + 1);
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| human(format!("{}: {e}", at())))?;
            let text = |name: &str| {
                v.get(name)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| human(format!("{}: no `{name}` text (not a Task 2 run?)", at())))
            };
            let id = v
                .get("id")
                .and_then(|x| x.as_u64())
                .ok_or_else(|| human(format!("{}: no numeric `id`", at())))?;
            let reply = text(if reference { "reference" } else { "generated" })?;
            responses.insert(id as usize, (text("message")?, reply));
        }
        Ok(Candidate {
            method: method.to_string(),
            responses,
        })
    }
}

/// Which method stands behind each slot of each item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Key {
    /// The seed that drew the items and shuffled the slots.
    pub seed: u64,
    /// The methods, in the order they were given.
    pub methods: Vec<String>,
    /// The rubric: criterion and its maximum.
    pub criteria: Vec<(String, u32)>,
    /// The sheet's items.
    pub items: Vec<KeyItem>,
}

/// One item of the sheet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyItem {
    /// Its number on the sheet (1-based).
    pub item: usize,
    /// The record id it came from.
    pub id: usize,
    /// The method behind slot A, B, ….
    pub slots: Vec<String>,
}

fn slot_name(i: usize) -> String {
    char::from(b'A' + i as u8).to_string()
}

fn human(msg: impl Into<String>) -> PromptError {
    PromptError::Human(msg.into())
}

/// The sheet (CSV text) and its key: `items` records answered by every candidate (all of them when
/// fewer), drawn with `seed`.
pub fn export(candidates: &[Candidate], items: usize, seed: u64) -> Result<(String, Key)> {
    if candidates.len() < 2 || candidates.len() > 26 {
        return Err(human(format!(
            "a sheet compares 2 to 26 methods, not {}",
            candidates.len()
        )));
    }
    let mut common: BTreeSet<usize> = candidates[0].responses.keys().copied().collect();
    for c in &candidates[1..] {
        common.retain(|id| c.responses.contains_key(id));
    }
    if common.is_empty() {
        return Err(human("the runs have no record in common"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids: Vec<usize> = common.into_iter().collect();
    ids.shuffle(&mut rng);
    ids.truncate(items.max(1));
    ids.sort_unstable();

    let mut out = csv::Writer::from_writer(Vec::new());
    let io = |e: csv::Error| human(format!("writing the sheet: {e}"));
    out.write_record(HEADER).map_err(io)?;
    let mut key_items = Vec::new();
    for (n, &id) in ids.iter().enumerate() {
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.shuffle(&mut rng);
        let message = &candidates[0].responses[&id].0;
        for (slot, &c) in order.iter().enumerate() {
            let response = &candidates[c].responses[&id].1;
            out.write_record([
                &(n + 1).to_string(),
                message,
                &slot_name(slot),
                response,
                "",
                "",
                "",
                "",
            ])
            .map_err(io)?;
        }
        key_items.push(KeyItem {
            item: n + 1,
            id,
            slots: order
                .iter()
                .map(|&c| candidates[c].method.clone())
                .collect(),
        });
    }
    let sheet = out
        .into_inner()
        .map_err(|e| human(format!("writing the sheet: {e}")))?;
    let key = Key {
        seed,
        methods: candidates.iter().map(|c| c.method.clone()).collect(),
        criteria: CRITERIA.iter().map(|&(c, m)| (c.to_string(), m)).collect(),
        items: key_items,
    };
    Ok((String::from_utf8_lossy(&sheet).into_owned(), key))
}

/// What the raters read beside the sheet (`README.txt`).
const README: &str =
    "Rate each response to the customer's message; the responses of one item come from \
different systems in a shuffled order (slot A, B, ...), and nothing on the sheet says which.\n\n\
relevance (0-5): does the reply address the customer's actual request?\n\
politeness (0-3): is it courteous and professional?\n\
actionable (0-2): does it give concrete next steps?\n\n\
Fill the three columns with whole numbers (leave a cell empty if you cannot judge), keep the other \
columns as they are, save as CSV, and return your copy. Read them back with\n\
supportlm eval import-human RATER1.csv RATER2.csv ... --key key.json\n";

/// [`export`] written to `dir`: `sheet.csv` (for the raters), `key.json` (kept from them) and
/// `README.txt` (their instructions), each atomically. Whether an existing sheet may be replaced is
/// the caller's decision (raters may be filling it).
pub fn write_sheet(
    dir: &std::path::Path,
    candidates: &[Candidate],
    items: usize,
    seed: u64,
) -> Result<Key> {
    let (sheet, key) = export(candidates, items, seed)?;
    std::fs::create_dir_all(dir).map_err(|e| PromptError::io(dir, e))?;
    let key_text =
        serde_json::to_string_pretty(&key).map_err(|e| human(format!("writing the key: {e}")))?;
    for (name, text) in [
        ("key.json", key_text.as_str()),
        ("sheet.csv", sheet.as_str()),
        ("README.txt", README),
    ] {
        let path = dir.join(name);
        supportlm_fsio::write_atomic(&path, text.as_bytes())
            .map_err(|e| PromptError::io(&path, e))?;
    }
    Ok(key)
}

/// One filled row: an item's slot and the rater's scores (`None`: left empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    /// The sheet's item number.
    pub item: usize,
    /// The slot (0 = A).
    pub slot: usize,
    /// Per criterion of the key, in its order.
    pub scores: Vec<Option<u32>>,
}

/// Reads one rater's filled sheet, checking every row against `key`: known item and slot, each
/// row once, scores integers within the criterion's range or empty. `name` names the sheet in
/// errors.
pub fn read_sheet(text: &str, key: &Key, name: &str) -> Result<Vec<Rating>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| human(format!("{name}: unreadable header: {e}")))?
        .clone();
    let col = |want: &str| {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(want))
            .ok_or_else(|| human(format!("{name}: no `{want}` column")))
    };
    let (item_col, slot_col) = (col("item")?, col("slot")?);
    let score_cols: Vec<usize> = key
        .criteria
        .iter()
        .map(|(c, _)| col(c))
        .collect::<Result<_>>()?;
    let items: BTreeMap<usize, &KeyItem> = key.items.iter().map(|i| (i.item, i)).collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let line = row + 2;
        let record = record.map_err(|e| human(format!("{name}, line {line}: {e}")))?;
        let field = |i: usize| record.get(i).unwrap_or("").trim();
        let item: usize = field(item_col).parse().map_err(|_| {
            human(format!(
                "{name}, line {line}: item `{}` is not a number",
                field(item_col)
            ))
        })?;
        let Some(k) = items.get(&item) else {
            return Err(human(format!(
                "{name}, line {line}: item {item} is not in the key"
            )));
        };
        let slot_text = field(slot_col).to_ascii_uppercase();
        let slot = (0..k.slots.len())
            .find(|&s| slot_name(s) == slot_text)
            .ok_or_else(|| {
                human(format!(
                    "{name}, line {line}: item {item} has no slot `{slot_text}`"
                ))
            })?;
        if !seen.insert((item, slot)) {
            return Err(human(format!(
                "{name}, line {line}: item {item} slot {slot_text} appears twice"
            )));
        }
        let mut scores = Vec::new();
        for ((criterion, max), &c) in key.criteria.iter().zip(&score_cols) {
            let v = field(c);
            scores.push(if v.is_empty() {
                None
            } else {
                match v.parse::<u32>() {
                    Ok(s) if s <= *max => Some(s),
                    _ => {
                        return Err(human(format!(
                        "{name}, line {line}: {criterion} `{v}` is not an integer from 0 to {max}"
                    )))
                    }
                }
            });
        }
        out.push(Rating { item, slot, scores });
    }
    Ok(out)
}

/// One method's mean per criterion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodScores {
    /// The method.
    pub method: String,
    /// Per criterion: the mean of the items' means over raters, a 95% bootstrap interval over items,
    /// and the ratings behind it.
    pub criteria: Vec<(String, Interval, usize)>,
}

/// The raters' agreement on one criterion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// The criterion.
    pub criterion: String,
    /// "cohen" (two raters) or "fleiss" (more).
    pub statistic: String,
    /// The kappa; `None` when undefined (one category only, no common responses).
    pub kappa: Option<f64>,
    /// Responses every rater scored on this criterion.
    pub units: usize,
}

/// What the filled sheets say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HumanSummary {
    /// Sheets read.
    pub raters: usize,
    /// Items on the sheet.
    pub items: usize,
    /// Scores given, and left empty.
    pub ratings: usize,
    /// Cells left empty.
    pub missing: usize,
    /// Per method, in the key's order.
    pub methods: Vec<MethodScores>,
    /// Per criterion; empty with one rater.
    pub agreement: Vec<Agreement>,
}

/// Summarises the raters' sheets (each read by [`read_sheet`] against `key`).
pub fn summarise(key: &Key, sheets: &[Vec<Rating>], resamples: usize, seed: u64) -> HumanSummary {
    let method_of: BTreeMap<(usize, usize), &str> = key
        .items
        .iter()
        .flat_map(|i| {
            i.slots
                .iter()
                .enumerate()
                .map(move |(slot, m)| ((i.item, slot), m.as_str()))
        })
        .collect();
    // scores[(item, slot)][criterion] = one value per rater who gave it.
    let mut by_unit: BTreeMap<(usize, usize), Vec<Vec<Option<u32>>>> = BTreeMap::new();
    let (mut ratings, mut missing) = (0, 0);
    for sheet in sheets {
        for r in sheet {
            ratings += r.scores.iter().filter(|s| s.is_some()).count();
            missing += r.scores.iter().filter(|s| s.is_none()).count();
            by_unit
                .entry((r.item, r.slot))
                .or_insert_with(|| vec![Vec::new(); key.criteria.len()])
                .iter_mut()
                .zip(&r.scores)
                .for_each(|(v, s)| v.push(*s));
        }
    }
    let methods = key
        .methods
        .iter()
        .map(|method| {
            // This method's responses, in item order (by_unit is ordered by item, then slot).
            let units: Vec<(usize, &Vec<Vec<Option<u32>>>)> = by_unit
                .iter()
                .filter(|(unit, _)| method_of.get(unit) == Some(&method.as_str()))
                .map(|(&(item, _), v)| (item, v))
                .collect();
            let criteria = key
                .criteria
                .iter()
                .enumerate()
                .map(|(c, (name, _))| {
                    // Per item: the mean over raters of this method's (first) response.
                    let mut per_item: Vec<f64> = Vec::new();
                    let mut last_item = None;
                    for &(item, v) in &units {
                        if last_item == Some(item) {
                            continue;
                        }
                        last_item = Some(item);
                        let given: Vec<f64> = v[c].iter().flatten().map(|&x| x as f64).collect();
                        if !given.is_empty() {
                            per_item.push(given.iter().sum::<f64>() / given.len() as f64);
                        }
                    }
                    let n: usize = units
                        .iter()
                        .map(|(_, v)| v[c].iter().flatten().count())
                        .sum();
                    let interval = bootstrap_ci(per_item.len(), resamples, 0.95, seed, |idx| {
                        idx.iter().map(|&i| per_item[i]).sum::<f64>() / idx.len().max(1) as f64
                    });
                    (name.clone(), interval, n)
                })
                .collect();
            MethodScores {
                method: method.clone(),
                criteria,
            }
        })
        .collect();

    let raters = sheets.len();
    let agreement = if raters < 2 {
        Vec::new()
    } else {
        key.criteria
            .iter()
            .enumerate()
            .map(|(c, (name, max))| {
                // Responses every rater scored on this criterion.
                let complete: Vec<Vec<u32>> = by_unit
                    .values()
                    .map(|v| v[c].iter().flatten().copied().collect::<Vec<u32>>())
                    .filter(|v| v.len() == raters)
                    .collect();
                let kappa = if complete.is_empty() {
                    None
                } else if raters == 2 {
                    let (a, b): (Vec<u32>, Vec<u32>) =
                        complete.iter().map(|v| (v[0], v[1])).unzip();
                    cohen_kappa(&a, &b)
                } else {
                    let counts: Vec<Vec<usize>> = complete
                        .iter()
                        .map(|v| {
                            let mut row = vec![0; *max as usize + 1];
                            v.iter().for_each(|&s| row[s as usize] += 1);
                            row
                        })
                        .collect();
                    fleiss_kappa(&counts)
                };
                Agreement {
                    criterion: name.clone(),
                    statistic: if raters == 2 { "cohen" } else { "fleiss" }.into(),
                    kappa,
                    units: complete.len(),
                }
            })
            .collect()
    };
    HumanSummary {
        raters,
        items: key.items.len(),
        ratings,
        missing,
        methods,
        agreement,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates() -> Vec<Candidate> {
        let mk = |n: usize, method: &str, ids: &[usize]| Candidate {
            method: method.into(),
            responses: ids
                .iter()
                .map(|&id| {
                    (
                        id,
                        (
                            format!("message {id}, with \"quotes\", commas\nand a newline"),
                            format!("reply {n} to {id}"),
                        ),
                    )
                })
                .collect(),
        };
        vec![
            mk(0, "zero-shot", &[1, 2, 3, 4, 5]),
            mk(1, "sft", &[2, 3, 4, 5, 6]),
            mk(2, "reference", &[1, 2, 3, 4, 5, 6]),
        ]
    }

    /// Fills the sheet: each method gets a fixed score per criterion, plus `shift` on item 1.
    fn fill(sheet: &str, key: &Key, scores: &[(&str, [u32; 3])], shift: u32) -> String {
        let mut r = csv::Reader::from_reader(sheet.as_bytes());
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(r.headers().unwrap()).unwrap();
        for rec in r.records() {
            let rec = rec.unwrap();
            let item: usize = rec[0].parse().unwrap();
            let slot = (rec[2].as_bytes()[0] - b'A') as usize;
            let method = &key.items[item - 1].slots[slot];
            let s = scores.iter().find(|(m, _)| m == method).unwrap().1;
            let bump = |x: u32, max: u32| if item == 1 { (x + shift).min(max) } else { x };
            let cells: Vec<String> = [
                rec[0].to_string(),
                rec[1].to_string(),
                rec[2].to_string(),
                rec[3].to_string(),
                bump(s[0], 5).to_string(),
                bump(s[1], 3).to_string(),
                bump(s[2], 2).to_string(),
                String::new(),
            ]
            .into();
            w.write_record(&cells).unwrap();
        }
        String::from_utf8(w.into_inner().unwrap()).unwrap()
    }

    #[test]
    fn export_is_blinded_seeded_and_on_common_items() {
        let (sheet, key) = export(&candidates(), 3, 7).unwrap();
        assert_eq!(
            export(&candidates(), 3, 7).unwrap(),
            (sheet.clone(), key.clone())
        );
        assert_eq!(key.items.len(), 3);
        for item in &key.items {
            assert!(
                [2, 3, 4, 5].contains(&item.id),
                "only ids every run answered"
            );
            let mut slots = item.slots.clone();
            slots.sort();
            assert_eq!(slots, ["reference", "sft", "zero-shot"]);
        }
        // The sheet never names a method; quoting keeps multi-line messages in one field.
        assert!(["zero-shot", "sft", "reference"]
            .iter()
            .all(|m| !sheet.contains(m)));
        let rows = csv::Reader::from_reader(sheet.as_bytes()).records().count();
        assert_eq!(rows, 9);
        // All five common ids when more are asked for.
        assert_eq!(export(&candidates(), 50, 7).unwrap().1.items.len(), 4);
        assert!(export(&candidates()[..1], 3, 7).is_err());
    }

    #[test]
    fn bad_sheets_are_named_by_line() {
        let (sheet, key) = export(&candidates(), 2, 1).unwrap();
        let filled = fill(
            &sheet,
            &key,
            &[
                ("zero-shot", [1, 1, 0]),
                ("sft", [4, 3, 2]),
                ("reference", [5, 3, 2]),
            ],
            0,
        );
        assert_eq!(read_sheet(&filled, &key, "a.csv").unwrap().len(), 6);
        let err = |text: &str| read_sheet(text, &key, "a.csv").unwrap_err().to_string();
        let out_of_range = filled.replacen(",4,3,2,", ",6,3,2,", 1);
        assert!(
            err(&out_of_range).contains("relevance `6` is not an integer from 0 to 5"),
            "{}",
            err(&out_of_range)
        );
        let unknown = filled.replacen("\n1,", "\n9,", 1);
        assert!(err(&unknown).contains("item 9 is not in the key"));
        let no_column = filled.replacen("politeness", "politeness_", 1);
        assert!(err(&no_column).contains("no `politeness` column"));
        let mut w = csv::Writer::from_writer(Vec::new());
        let mut r = csv::Reader::from_reader(filled.as_bytes());
        w.write_record(r.headers().unwrap()).unwrap();
        let records: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        for rec in records.iter().chain(records.last()) {
            w.write_record(rec).unwrap();
        }
        let twice = String::from_utf8(w.into_inner().unwrap()).unwrap();
        assert!(err(&twice).contains("appears twice"));
    }

    #[test]
    fn summary_by_hand() {
        let (sheet, key) = export(&candidates(), 4, 3).unwrap();
        let scores = [
            ("zero-shot", [1, 2, 0]),
            ("sft", [4, 3, 2]),
            ("reference", [5, 3, 1]),
        ];
        let a = read_sheet(&fill(&sheet, &key, &scores, 0), &key, "a").unwrap();
        // Rater b gives one more point on item 1 (capped at the maximum).
        let b = read_sheet(&fill(&sheet, &key, &scores, 1), &key, "b").unwrap();
        let s = summarise(&key, &[a.clone(), b.clone()], 200, 1);
        assert_eq!((s.raters, s.items, s.ratings, s.missing), (2, 4, 72, 0));
        let sft = &s.methods[1];
        assert_eq!(sft.method, "sft");
        // sft relevance: items 2-4 at 4 by both; item 1 at 4 (a) and 5 (b) -> 4.5; mean (4.5 + 12) / 4.
        assert!((sft.criteria[0].1.estimate - 4.125).abs() < 1e-12);
        assert_eq!(sft.criteria[0].2, 8);
        // Politeness of sft and reference is 3 for both raters everywhere (the cap); zero-shot 2 -> 3 on
        // item 1 for b. Units: 12 responses, both raters.
        assert!(s
            .agreement
            .iter()
            .all(|g| g.units == 12 && g.statistic == "cohen"));
        // One rater: no agreement; three identical raters: Fleiss' kappa 1.
        assert!(summarise(&key, std::slice::from_ref(&a), 10, 1)
            .agreement
            .is_empty());
        let three = summarise(&key, &[a.clone(), a.clone(), a], 10, 1);
        assert!(three
            .agreement
            .iter()
            .all(|g| g.statistic == "fleiss" && g.kappa == Some(1.0)));
    }
}
