//! Fuzzing the data loaders: the Bitext CSV, split records (JSON lines) and split manifests. The
//! property: a clear error or a correct load, never a panic, an abort, an unbounded allocation or a
//! hang. Bounded by `SUPPORTLM_FUZZ_ITERATIONS`.

use std::path::Path;

use supportlm_data::load::parse_csv;
use supportlm_data::split::from_jsonl;
use supportlm_data::{load_csv, shipped, split, SplitConfig, SplitSet, Task};
use supportlm_fuzzing::{CappedAlloc, Fuzz, Mutation};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// The first `n` lines of the shipped CSV (header included).
fn csv_head(n: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(shipped::default_input()).unwrap();
    let mut out: String = text.lines().take(n).collect::<Vec<_>>().join("\n");
    out.push('\n');
    out.into_bytes()
}

#[test]
fn fuzz_csv() {
    let seeds = vec![csv_head(12), csv_head(40)];
    Fuzz::new("csv", Mutation::Text).run(&seeds, |bytes| {
        parse_csv(Path::new("fuzz.csv"), bytes).into()
    });
}

/// A small split written to `dir`.
fn write_split(dir: &Path) {
    let dataset = load_csv(&shipped::default_input()).unwrap();
    let config = SplitConfig {
        task: Task::Category,
        max_per_label: Some(6),
        ..Default::default()
    };
    split::split(&dataset, &config)
        .unwrap()
        .write(dir, &dataset)
        .unwrap();
}

#[test]
fn fuzz_split_records() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path());
    let seed = std::fs::read(dir.path().join("validation.jsonl")).unwrap();
    Fuzz::new("split-records", Mutation::Text).run(&[seed], |bytes| {
        from_jsonl(Path::new("validation.jsonl"), bytes).into()
    });
}

#[test]
fn fuzz_split_manifest() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path());
    let seed = std::fs::read(dir.path().join("manifest.json")).unwrap();
    let path = dir.path().to_path_buf();
    Fuzz::new("split-manifest", Mutation::Text)
        .scaled(1, 2)
        .run(&[seed], move |bytes| {
            std::fs::write(path.join("manifest.json"), bytes).unwrap();
            SplitSet::read(&path).into()
        });
}
