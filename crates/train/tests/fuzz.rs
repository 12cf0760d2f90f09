//! Fuzzing what training reads back: TOML configs, `--set` overrides, and a checkpoint's
//! `trainer_state.json` and `optimizer.safetensors`. The property: a clear error or a correct load,
//! never a panic, an abort, an unbounded allocation or a hang. Bounded by `SUPPORTLM_FUZZ_ITERATIONS`.

use supportlm_fuzzing::{CappedAlloc, Fuzz, Mutation, Verdict};
use supportlm_train::optim::AdamState;
use supportlm_train::state::{self, TrainerState};
use supportlm_train::TrainConfig;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

#[test]
fn fuzz_toml_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let seeds: Vec<Vec<u8>> = [
        "task1-category.toml",
        "task1-intent-quick.toml",
        "task2-response.toml",
    ]
    .iter()
    .map(|f| std::fs::read(root.join(f)).unwrap())
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    Fuzz::new("toml-config", Mutation::Text).run(&seeds, move |bytes| {
        std::fs::write(&path, bytes).unwrap();
        TrainConfig::load(Some(&path), &[]).into()
    });
}

#[test]
fn fuzz_set_overrides() {
    let seeds = vec![
        b"lr=2e-4\nlora.r=16\nbatch_size=4".to_vec(),
        b"max_steps=10\nlora.target_modules=[\"q_proj\", \"v_proj\"]\nbase_quant=\"nf4\"".to_vec(),
        b"patience=3\nmin_delta=0.001\nstore_activations=true".to_vec(),
    ];
    Fuzz::new("set-overrides", Mutation::Text).run(&seeds, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let overrides: Vec<String> = text.lines().map(str::to_string).collect();
        TrainConfig::load(None, &overrides).into()
    });
}

/// A checkpoint folder with two trained tensors of 3 and 5 values.
fn checkpoint(dir: &std::path::Path) {
    let mut adam = AdamState::new(&[3, 5]);
    adam.step = 4;
    let st = TrainerState {
        step: 4,
        total_steps: 10,
        best_val_loss: Some(1.5),
        last_val_loss: Some(1.5),
        best_step: Some(4),
        evals_without_improvement: 0,
        stopped_early: false,
        config: TrainConfig::default().to_toml(),
    };
    state::save(dir, &|_| Ok(()), &adam, &st, 2).unwrap();
}

#[test]
fn fuzz_trainer_state() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    let ck = dir.path().join(state::checkpoint_name(4));
    let seed = std::fs::read(ck.join("trainer_state.json")).unwrap();
    let run = dir.path().to_path_buf();
    Fuzz::new("trainer_state.json", Mutation::Text)
        .scaled(1, 2)
        .run(&[seed], move |bytes| {
            std::fs::write(ck.join("trainer_state.json"), bytes).unwrap();
            state::load_latest(&run, &[3, 5]).into()
        });
}

#[test]
fn fuzz_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    let ck = dir.path().join(state::checkpoint_name(4));
    let seed = std::fs::read(ck.join("optimizer.safetensors")).unwrap();
    let run = dir.path().to_path_buf();
    Fuzz::new("optimizer.safetensors", Mutation::Bytes)
        .scaled(1, 2)
        .run(&[seed], move |bytes| {
            std::fs::write(ck.join("optimizer.safetensors"), bytes).unwrap();
            match state::load_latest(&run, &[3, 5]) {
                // A load that succeeds must hold the sizes it was asked for.
                Ok(Some(c)) => {
                    assert_eq!(
                        c.optimizer.m.iter().map(Vec::len).collect::<Vec<_>>(),
                        [3, 5]
                    );
                    Verdict::Loaded
                }
                _ => Verdict::Refused,
            }
        });
}
