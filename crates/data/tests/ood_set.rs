//! The hand-written out-of-distribution set (`data/ood/`): it loads as a Bitext CSV, covers every
//! category evenly, has no Bitext placeholders, shares no message with Bitext, and its annotation file
//! agrees with it.

use std::collections::{BTreeMap, HashSet};

use supportlm_data::clean::dedupe_key;
use supportlm_data::{load_csv, shipped, Category, Intent};

fn ood_dir() -> std::path::PathBuf {
    shipped::data_dir().join("../ood")
}

#[test]
fn the_ood_set_is_balanced_labelled_and_not_from_bitext() {
    let ood = load_csv(&ood_dir().join("ood.csv")).unwrap();
    assert!(ood.records.len() >= 220, "{}", ood.records.len());
    let mut per_category: BTreeMap<Category, usize> = BTreeMap::new();
    for r in &ood.records {
        *per_category.entry(r.category).or_default() += 1;
        assert!(
            !r.instruction.contains("{{"),
            "placeholder in {:?}",
            r.instruction
        );
        assert!(r.response.is_none());
    }
    assert_eq!(per_category.len(), Category::ALL.len());
    assert!(per_category.values().all(|&n| n >= 20), "{per_category:?}");
    let intents: HashSet<Intent> = ood.records.iter().map(|r| r.intent).collect();
    assert_eq!(intents.len(), Intent::ALL.len(), "every intent is covered");
    let keys: HashSet<String> = ood
        .records
        .iter()
        .map(|r| dedupe_key(&r.instruction))
        .collect();
    assert_eq!(keys.len(), ood.records.len(), "duplicate messages");

    let bitext = load_csv(&shipped::default_input()).unwrap();
    let shared: Vec<&String> = bitext
        .records
        .iter()
        .map(|r| dedupe_key(&r.instruction))
        .filter_map(|k| keys.get(&k))
        .collect();
    assert!(shared.is_empty(), "messages also in Bitext: {shared:?}");
}

#[test]
fn the_development_slice_is_balanced_and_apart_from_the_set_and_bitext() {
    let dev = load_csv(&ood_dir().join("dev.csv")).unwrap();
    assert_eq!(dev.records.len(), 55);
    for c in Category::ALL {
        assert_eq!(
            dev.records.iter().filter(|r| r.category == *c).count(),
            5,
            "{c}"
        );
    }
    let ood = load_csv(&ood_dir().join("ood.csv")).unwrap();
    let bitext = load_csv(&shipped::default_input()).unwrap();
    let taken: HashSet<String> = ood
        .records
        .iter()
        .chain(&bitext.records)
        .map(|r| dedupe_key(&r.instruction))
        .collect();
    for r in &dev.records {
        assert!(
            !taken.contains(&dedupe_key(&r.instruction)),
            "{:?}",
            r.instruction
        );
        assert!(!r.instruction.contains("{{"));
    }
}

#[test]
fn the_annotation_passes_match_the_set() {
    let ood = load_csv(&ood_dir().join("ood.csv")).unwrap();
    let text = std::fs::read_to_string(ood_dir().join("annotations.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "id,first_pass_intent,second_pass_intent,second_pass_position,final_intent,resolution"
    );
    let mut agree = 0;
    let mut positions = HashSet::new();
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), ood.records.len());
    for (row, r) in rows.iter().zip(&ood.records) {
        let f: Vec<&str> = row.splitn(6, ',').collect();
        assert_eq!(f[0].parse::<usize>().unwrap(), r.id);
        let (first, second, final_): (Intent, Intent, Intent) = (
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[4].parse().unwrap(),
        );
        assert_eq!(final_, r.intent, "row {}", r.id);
        assert!(positions.insert(f[3].parse::<usize>().unwrap()));
        if first == second {
            agree += 1;
        } else {
            assert!(
                !f[5].is_empty(),
                "row {}: a disagreement without its resolution",
                r.id
            );
        }
    }
    // The agreement the README reports.
    assert_eq!((agree, rows.len()), (230, 231));
}
