//! Balanced draws. The k-shot sampler: k examples per label, drawn with a seed from a pool (the
//! validation split), never using an instruction that also occurs in the excluded rows (the test
//! split). [`balanced_subset`]: up to n records with the labels taking turns (training sets, the
//! TF-IDF baseline's limited fit).

use std::collections::{BTreeMap, HashSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::clean::dedupe_key;
use crate::error::{DataError, Result};
use crate::load::Record;
use crate::task::Task;

/// Draws `k` examples for every label of `task` from `pool`, skipping any whose normalised instruction
/// occurs in `exclude`, and returns them in a seeded order. The response task is balanced over categories.
pub fn balanced_kshot(
    pool: &[Record],
    exclude: &[Record],
    task: Task,
    k: usize,
    seed: u64,
) -> Result<Vec<Record>> {
    let excluded: HashSet<String> = exclude.iter().map(|r| dedupe_key(&r.instruction)).collect();
    let labels = match task {
        Task::Response => Task::Category.labels(),
        _ => task.labels(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::with_capacity(labels.len() * k);
    for label in labels {
        let mut candidates: Vec<&Record> = pool
            .iter()
            .filter(|r| task.label_of(r) == label && task.accepts(r))
            .filter(|r| !excluded.contains(&dedupe_key(&r.instruction)))
            .collect();
        if candidates.len() < k {
            return Err(DataError::Sampling(format!(
                "label `{label}` has {} usable examples in the pool, {k} needed",
                candidates.len()
            )));
        }
        candidates.shuffle(&mut rng);
        chosen.extend(candidates.into_iter().take(k).cloned());
    }
    chosen.shuffle(&mut rng);
    Ok(chosen)
}

/// Up to `n` records balanced over the task's labels: labels take turns, each contributing its records
/// in a seeded order, until `n` are chosen or every label is used up. The result is in a seeded order.
pub fn balanced_subset(records: &[Record], task: Task, n: usize, seed: u64) -> Vec<Record> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_label: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records.iter().filter(|r| task.accepts(r)) {
        by_label.entry(task.label_of(r)).or_default().push(r);
    }
    let mut queues: Vec<Vec<&Record>> = by_label
        .into_values()
        .map(|mut v| {
            v.shuffle(&mut rng);
            v.reverse();
            v
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n && queues.iter().any(|q| !q.is_empty()) {
        for q in queues.iter_mut() {
            if out.len() == n {
                break;
            }
            if let Some(r) = q.pop() {
                out.push(r.clone());
            }
        }
    }
    out.shuffle(&mut rng);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Intent;

    fn pool() -> Vec<Record> {
        (0..27 * 4)
            .map(|i| {
                let intent = Intent::ALL[i % 27];
                Record {
                    id: i,
                    flags: None,
                    instruction: format!("message {i}"),
                    category: intent.category(),
                    intent,
                    response: Some(format!("response {i}")),
                }
            })
            .collect()
    }

    #[test]
    fn one_example_per_label_seeded_and_never_excluded() {
        let pool = pool();
        let exclude = vec![pool[0].clone(), pool[27].clone()];
        let shots = balanced_kshot(&pool, &exclude, Task::Category, 1, 42).unwrap();
        assert_eq!(shots.len(), 11);
        let mut labels: Vec<_> = shots.iter().map(|r| r.category).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), 11);
        assert!(shots.iter().all(|r| r.id != 0 && r.id != 27));
        assert_eq!(
            shots,
            balanced_kshot(&pool, &exclude, Task::Category, 1, 42).unwrap()
        );
        let intents = balanced_kshot(&pool, &[], Task::Intent, 2, 1).unwrap();
        assert_eq!(intents.len(), 54);
    }

    #[test]
    fn a_balanced_subset_takes_labels_in_turn_until_they_run_out() {
        let pool = pool();
        // 27 intents × 4 records: 54 is two of each; seeded, so the same draw twice.
        let two = balanced_subset(&pool, Task::Intent, 54, 7);
        let mut per: std::collections::HashMap<Intent, usize> = Default::default();
        two.iter()
            .for_each(|r| *per.entry(r.intent).or_default() += 1);
        assert!(per.len() == 27 && per.values().all(|&c| c == 2), "{per:?}");
        assert_eq!(two, balanced_subset(&pool, Task::Intent, 54, 7));
        assert_ne!(two, balanced_subset(&pool, Task::Intent, 54, 8));
        // More than the pool holds: all of it, once.
        let all = balanced_subset(&pool, Task::Intent, 1000, 7);
        let mut ids: Vec<usize> = all.iter().map(|r| r.id).collect();
        ids.sort();
        assert_eq!(ids, (0..pool.len()).collect::<Vec<_>>());
    }

    #[test]
    fn too_few_examples_is_an_error_naming_the_label() {
        let e = balanced_kshot(&pool(), &[], Task::Intent, 5, 42)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has 4 usable examples in the pool, 5 needed"),
            "{e}"
        );
    }
}
