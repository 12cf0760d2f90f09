//! The shipped Bitext data, end to end: load, split, k-shot, on the real 26,872 rows.

use std::collections::HashSet;

use supportlm_data::clean::dedupe_key;
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::{load_csv, shipped, split, SplitConfig, Task};

fn all_rows() -> supportlm_data::load::Dataset {
    let dir = shipped::data_dir();
    shipped::verify(&dir).expect("shipped data intact");
    load_csv(&dir.join(shipped::ALL_ROWS.name)).expect("shipped data loads")
}

#[test]
fn shipped_files_load_with_the_documented_counts() {
    let ds = all_rows();
    assert_eq!(ds.records.len(), 26_872);
    assert_eq!(
        ds.records.iter().filter(|r| r.response.is_some()).count(),
        8_352
    );
    assert_eq!(
        ds.records.iter().filter(|r| r.flags.is_some()).count(),
        8_687
    );
    let unique: HashSet<String> = ds
        .records
        .iter()
        .map(|r| dedupe_key(&r.instruction))
        .collect();
    assert_eq!(
        ds.records.len() - unique.len(),
        2_598,
        "rows repeating an earlier instruction"
    );
    let complete = load_csv(&shipped::data_dir().join(shipped::COMPLETE_ROWS.name)).unwrap();
    assert_eq!(complete.records.len(), 6_401);
    assert!(complete
        .records
        .iter()
        .all(|r| r.response.is_some() && r.flags.is_some()));
}

#[test]
fn default_splits_are_stratified_leak_free_and_kshot_stays_out_of_test() {
    let ds = all_rows();
    for task in Task::ALL {
        let set = split::split(
            &ds,
            &SplitConfig {
                task,
                ..Default::default()
            },
        )
        .unwrap();
        let accepted: Vec<_> = ds.records.iter().filter(|r| task.accepts(r)).collect();
        let total: usize = set.splits().iter().map(|s| s.records.len()).sum();
        assert_eq!(
            total,
            accepted.len(),
            "{task}: every row in exactly one split"
        );
        for label in task.labels().into_iter().chain(if task == Task::Response {
            Task::Category.labels()
        } else {
            vec![]
        }) {
            let n = accepted
                .iter()
                .filter(|r| task.label_of(r) == label)
                .count() as f64;
            for (s, ratio) in set.splits().iter().zip([0.8, 0.1, 0.1]) {
                let got = s
                    .records
                    .iter()
                    .filter(|r| task.label_of(r) == label)
                    .count() as f64;
                assert!(
                    (got - n * ratio).abs() <= 1.0,
                    "{task} {label} {}: {got} vs {}",
                    s.name,
                    n * ratio
                );
            }
        }
        let keys = |i: usize| -> HashSet<String> {
            set.splits()[i]
                .records
                .iter()
                .map(|r| dedupe_key(&r.instruction))
                .collect()
        };
        let (tr, va, te) = (keys(0), keys(1), keys(2));
        assert!(
            tr.is_disjoint(&te) && va.is_disjoint(&te) && tr.is_disjoint(&va),
            "{task}: leakage"
        );

        let shots =
            balanced_kshot(&set.validation.records, &set.test.records, task, 1, 42).unwrap();
        assert_eq!(shots.len(), if task == Task::Intent { 27 } else { 11 });
        assert!(shots
            .iter()
            .all(|r| !te.contains(&dedupe_key(&r.instruction))));
    }
}
