//! Leak-free stratified splits.
//!
//! Rows are grouped by their normalised instruction ([`dedupe_key`]): every copy of an instruction lands in
//! the same split, so the test split measures generalisation, not memory. Within each label the groups are
//! shuffled with a seeded ChaCha RNG and dealt greedily: test takes groups until it holds
//! `round(n × test_ratio)` rows, then validation `round(n × val_ratio)`, and train keeps the rest. Groups are
//! mostly single rows, so every label's share is within one row of the exact ratio.
//!
//! Written as `train.jsonl`, `validation.jsonl`, `test.jsonl` (one [`Record`] per line, sorted by id) and
//! `manifest.json`; the same input, configuration and seed give byte-identical files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::clean::dedupe_key;
use crate::error::{DataError, Result};
use crate::fsio::{sha256_hex, write_atomic};
use crate::load::{Dataset, Record};
use crate::task::Task;

/// How to split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// The task whose label the split is stratified by (the response task keeps only rows with a known
    /// response and stratifies by category).
    pub task: Task,
    /// Seed of the group shuffle.
    pub seed: u64,
    /// Share of each label's rows in validation.
    pub val_ratio: f64,
    /// Share of each label's rows in test.
    pub test_ratio: f64,
    /// Keep one row per normalised instruction.
    pub dedupe: bool,
    /// Drop labels with fewer rows than this (after dedupe).
    pub min_per_label: Option<usize>,
    /// Keep at most this many rows per label (seeded choice of whole duplicate groups).
    pub max_per_label: Option<usize>,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            task: Task::Category,
            seed: 42,
            val_ratio: 0.1,
            test_ratio: 0.1,
            dedupe: false,
            min_per_label: None,
            max_per_label: None,
        }
    }
}

impl SplitConfig {
    fn validate(&self) -> Result<()> {
        let ok = |r: f64| r.is_finite() && (0.0..1.0).contains(&r);
        if !ok(self.val_ratio) || !ok(self.test_ratio) || self.val_ratio + self.test_ratio >= 1.0 {
            return Err(DataError::InvalidConfig(format!(
                "validation ratio {} and test ratio {} must each be in [0, 1) and sum to less than 1",
                self.val_ratio, self.test_ratio
            )));
        }
        if let (Some(min), Some(max)) = (self.min_per_label, self.max_per_label) {
            if min > max {
                return Err(DataError::InvalidConfig(format!(
                    "--min-per-label {min} is larger than --max-per-label {max}"
                )));
            }
        }
        Ok(())
    }
}

/// One of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    /// The training split.
    Train,
    /// The validation split (model selection, few-shot examples).
    Validation,
    /// The held-out test split.
    Test,
}

impl SplitName {
    /// The three splits in file order.
    pub const ALL: [SplitName; 3] = [SplitName::Train, SplitName::Validation, SplitName::Test];

    /// `train`, `validation` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Validation => "validation",
            SplitName::Test => "test",
        }
    }

    /// The split's file name in a split folder (`train.jsonl`, …).
    pub fn file_name(self) -> String {
        format!("{}.jsonl", self.as_str())
    }
}

impl fmt::Display for SplitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SplitName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        SplitName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| format!("unknown split `{s}` (expected train, validation or test)"))
    }
}

/// The rows of one split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Which split.
    pub name: SplitName,
    /// Its rows, sorted by id.
    pub records: Vec<Record>,
}

/// Train, validation and test, plus how they were made.
#[derive(Debug, Clone)]
pub struct SplitSet {
    /// How the splits were made.
    pub config: SplitConfig,
    /// The training split.
    pub train: Split,
    /// The validation split.
    pub validation: Split,
    /// The test split.
    pub test: Split,
    /// Labels removed by `min_per_label`.
    pub dropped_labels: Vec<String>,
}

/// What `manifest.json` records about one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSummary {
    /// The split's file name.
    pub file: String,
    /// Its sha256.
    pub sha256: String,
    /// Rows.
    pub rows: usize,
    /// Distinct normalised instructions.
    pub unique_instructions: usize,
    /// Rows that repeat an instruction already in this split.
    pub duplicates: usize,
    /// Rows per label.
    pub labels: BTreeMap<String, usize>,
}

/// The source file a split came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceSummary {
    /// The source file's name.
    pub file: String,
    /// Its sha256.
    pub sha256: String,
    /// Its rows.
    pub rows: usize,
}

/// `manifest.json`: everything needed to trust and reproduce a split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The split settings.
    pub config: SplitConfig,
    /// Each split's share of the rows.
    pub ratios: BTreeMap<String, f64>,
    /// The file the rows came from.
    pub source: SourceSummary,
    /// Labels removed by `min_per_label`.
    pub dropped_labels: Vec<String>,
    /// Normalised instructions that occur in more than one split (0 by construction; recorded as proof).
    pub instructions_shared_between_splits: usize,
    /// Each split's summary, by name.
    pub splits: BTreeMap<String, SplitSummary>,
}

/// Splits a dataset.
pub fn split(dataset: &Dataset, config: &SplitConfig) -> Result<SplitSet> {
    config.validate()?;
    let task = config.task;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);

    // Group rows by normalised instruction, per label, in source order.
    let mut groups_by_label: BTreeMap<&'static str, Vec<Vec<&Record>>> = BTreeMap::new();
    let mut group_of: HashMap<String, (&'static str, usize)> = HashMap::new();
    for record in dataset.records.iter().filter(|r| task.accepts(r)) {
        let label = task.label_of(record);
        let key = dedupe_key(&record.instruction);
        match group_of.get(&key) {
            Some(&(l, g)) => {
                if !config.dedupe {
                    // A duplicate instruction with another label stays with its first group's split.
                    groups_by_label.get_mut(l).expect("group exists")[g].push(record);
                }
            }
            None => {
                let groups = groups_by_label.entry(label).or_default();
                group_of.insert(key, (label, groups.len()));
                groups.push(vec![record]);
            }
        }
    }

    let mut dropped_labels = Vec::new();
    let (mut train, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (label, mut groups) in groups_by_label {
        let rows: usize = groups.iter().map(Vec::len).sum();
        if config.min_per_label.is_some_and(|min| rows < min) {
            dropped_labels.push(label.to_string());
            continue;
        }
        groups.shuffle(&mut rng);
        if let Some(max) = config.max_per_label {
            let mut kept = 0;
            groups.retain(|g| {
                let keep = kept + g.len() <= max;
                if keep {
                    kept += g.len();
                }
                keep
            });
        }
        let n: usize = groups.iter().map(Vec::len).sum();
        let test_target = (n as f64 * config.test_ratio).round() as usize;
        let val_target = (n as f64 * config.val_ratio).round() as usize;
        let (mut n_test, mut n_val) = (0, 0);
        for group in groups {
            if n_test + group.len() <= test_target {
                n_test += group.len();
                test.extend(group.into_iter().cloned());
            } else if n_val + group.len() <= val_target {
                n_val += group.len();
                validation.extend(group.into_iter().cloned());
            } else {
                train.extend(group.into_iter().cloned());
            }
        }
    }
    for records in [&mut train, &mut validation, &mut test] {
        records.sort_by_key(|r| r.id);
    }
    Ok(SplitSet {
        config: config.clone(),
        train: Split {
            name: SplitName::Train,
            records: train,
        },
        validation: Split {
            name: SplitName::Validation,
            records: validation,
        },
        test: Split {
            name: SplitName::Test,
            records: test,
        },
        dropped_labels,
    })
}

impl SplitSet {
    /// The three splits in order.
    pub fn splits(&self) -> [&Split; 3] {
        [&self.train, &self.validation, &self.test]
    }

    /// One split by name.
    pub fn get(&self, name: SplitName) -> &Split {
        match name {
            SplitName::Train => &self.train,
            SplitName::Validation => &self.validation,
            SplitName::Test => &self.test,
        }
    }

    /// Writes the three JSONL files and `manifest.json` into `dir` (each atomically) and returns the manifest.
    pub fn write(&self, dir: &Path, source: &Dataset) -> Result<Manifest> {
        let mut splits = BTreeMap::new();
        for split in self.splits() {
            let bytes = to_jsonl(&split.records)?;
            let file = split.name.file_name();
            let path = dir.join(&file);
            write_atomic(&path, &bytes).map_err(|e| DataError::io(&path, e))?;
            splits.insert(
                split.name.as_str().to_string(),
                self.summary(split, file, &bytes),
            );
        }
        let manifest = Manifest {
            config: self.config.clone(),
            ratios: BTreeMap::from([
                (
                    "train".to_string(),
                    1.0 - self.config.val_ratio - self.config.test_ratio,
                ),
                ("validation".to_string(), self.config.val_ratio),
                ("test".to_string(), self.config.test_ratio),
            ]),
            source: SourceSummary {
                file: source
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                sha256: source.sha256.clone(),
                rows: source.records.len(),
            },
            dropped_labels: self.dropped_labels.clone(),
            instructions_shared_between_splits: self.shared_instructions(),
            splits,
        };
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| DataError::Sampling(e.to_string()))?;
        json.push(b'\n');
        let path = dir.join("manifest.json");
        write_atomic(&path, &json).map_err(|e| DataError::io(&path, e))?;
        Ok(manifest)
    }

    /// Reads a split written by [`SplitSet::write`], checking every file against the manifest's sha256.
    pub fn read(dir: &Path) -> Result<SplitSet> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| DataError::io(&manifest_path, e))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Jsonl {
            path: manifest_path.clone(),
            line: e.line(),
            message: e.to_string(),
        })?;
        let read_split = |name: SplitName| -> Result<Split> {
            let path = dir.join(name.file_name());
            let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
            let expected = manifest
                .splits
                .get(name.as_str())
                .map(|s| s.sha256.clone())
                .unwrap_or_default();
            let actual = sha256_hex(&bytes);
            if actual != expected {
                return Err(DataError::Altered {
                    path,
                    expected,
                    actual,
                    hint: "re-create the split with `supportlm data split`".into(),
                });
            }
            Ok(Split {
                name,
                records: from_jsonl(&path, &bytes)?,
            })
        };
        Ok(SplitSet {
            train: read_split(SplitName::Train)?,
            validation: read_split(SplitName::Validation)?,
            test: read_split(SplitName::Test)?,
            config: manifest.config,
            dropped_labels: manifest.dropped_labels,
        })
    }

    fn summary(&self, split: &Split, file: String, bytes: &[u8]) -> SplitSummary {
        let unique: HashSet<String> = split
            .records
            .iter()
            .map(|r| dedupe_key(&r.instruction))
            .collect();
        let mut labels = BTreeMap::new();
        for r in &split.records {
            *labels
                .entry(self.config.task.label_of(r).to_string())
                .or_insert(0) += 1;
        }
        SplitSummary {
            file,
            sha256: sha256_hex(bytes),
            rows: split.records.len(),
            unique_instructions: unique.len(),
            duplicates: split.records.len() - unique.len(),
            labels,
        }
    }

    fn shared_instructions(&self) -> usize {
        let keys = |s: &Split| -> HashSet<String> {
            s.records
                .iter()
                .map(|r| dedupe_key(&r.instruction))
                .collect()
        };
        let (tr, va, te) = (keys(&self.train), keys(&self.validation), keys(&self.test));
        tr.intersection(&va).count() + tr.intersection(&te).count() + va.intersection(&te).count()
    }
}

fn to_jsonl(records: &[Record]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).map_err(|e| DataError::Sampling(e.to_string()))?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Parses JSONL records; errors name the file and line.
pub fn from_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::Jsonl {
        path: path.to_path_buf(),
        line: bytes[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1,
        message: "invalid UTF-8".into(),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| DataError::Jsonl {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{Category, Intent};

    fn dataset(n: usize) -> Dataset {
        let intents = [Intent::CancelOrder, Intent::GetRefund, Intent::Review];
        let records = (0..n)
            .map(|i| {
                // every 7th row repeats the previous row (in another case), with the same label
                let dup = i % 7 == 6;
                let intent = intents[if dup { i - 1 } else { i } % 3];
                Record {
                    id: i,
                    flags: None,
                    instruction: if dup {
                        format!("MESSAGE {}", i - 1)
                    } else {
                        format!("message {i}")
                    },
                    category: intent.category(),
                    intent,
                    response: (i % 2 == 0).then(|| format!("response {i}")),
                }
            })
            .collect();
        Dataset {
            path: "mem.csv".into(),
            sha256: "x".into(),
            records,
        }
    }

    #[test]
    fn shares_are_within_one_row_and_nothing_leaks() {
        let ds = dataset(1000);
        let set = split(&ds, &SplitConfig::default()).unwrap();
        assert_eq!(
            set.splits().iter().map(|s| s.records.len()).sum::<usize>(),
            1000
        );
        for label in [Category::Order, Category::Refund, Category::Feedback] {
            let n = ds.records.iter().filter(|r| r.category == label).count() as f64;
            for (split, ratio) in set.splits().iter().zip([0.8, 0.1, 0.1]) {
                let got = split.records.iter().filter(|r| r.category == label).count() as f64;
                assert!(
                    (got - n * ratio).abs() <= 1.0,
                    "{label} {}: {got} vs {}",
                    split.name,
                    n * ratio
                );
            }
        }
        assert_eq!(set.shared_instructions(), 0);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_split() {
        let ds = dataset(300);
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ma = split(&ds, &SplitConfig::default())
            .unwrap()
            .write(a.path(), &ds)
            .unwrap();
        let mb = split(&ds, &SplitConfig::default())
            .unwrap()
            .write(b.path(), &ds)
            .unwrap();
        assert_eq!(ma, mb);
        for f in [
            "train.jsonl",
            "validation.jsonl",
            "test.jsonl",
            "manifest.json",
        ] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap()
            );
        }
        let other = split(
            &ds,
            &SplitConfig {
                seed: 7,
                ..Default::default()
            },
        )
        .unwrap();
        let first = split(&ds, &SplitConfig::default()).unwrap();
        assert_ne!(other.test, first.test);
    }

    #[test]
    fn written_split_reads_back_and_detects_tampering() {
        let ds = dataset(200);
        let dir = tempfile::tempdir().unwrap();
        let set = split(&ds, &SplitConfig::default()).unwrap();
        set.write(dir.path(), &ds).unwrap();
        let back = SplitSet::read(dir.path()).unwrap();
        assert_eq!(back.test, set.test);
        std::fs::write(dir.path().join("test.jsonl"), b"{}\n").unwrap();
        let e = SplitSet::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("test.jsonl: file was altered"), "{e}");
    }

    #[test]
    fn dedupe_keeps_one_copy_and_caps_apply() {
        let ds = dataset(700);
        let set = split(
            &ds,
            &SplitConfig {
                dedupe: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            set.splits().iter().map(|s| s.records.len()).sum::<usize>(),
            600
        );
        let capped = split(
            &ds,
            &SplitConfig {
                max_per_label: Some(50),
                ..Default::default()
            },
        )
        .unwrap();
        for label in [Category::Order, Category::Refund, Category::Feedback] {
            let total: usize = capped
                .splits()
                .iter()
                .map(|s| s.records.iter().filter(|r| r.category == label).count())
                .sum();
            assert!((49..=50).contains(&total), "{total}");
        }
        let dropped = split(
            &ds,
            &SplitConfig {
                min_per_label: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(dropped.dropped_labels.len(), 3);
    }

    #[test]
    fn response_task_keeps_only_known_responses() {
        let ds = dataset(300);
        let set = split(
            &ds,
            &SplitConfig {
                task: Task::Response,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(set
            .splits()
            .iter()
            .all(|s| s.records.iter().all(|r| r.response.is_some())));
    }

    #[test]
    fn bad_ratios_are_rejected() {
        let ds = dataset(10);
        let e = split(
            &ds,
            &SplitConfig {
                test_ratio: 0.6,
                val_ratio: 0.5,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sum to less than 1"), "{e}");
    }
}
