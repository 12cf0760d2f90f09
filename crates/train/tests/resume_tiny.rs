//! Training on a tiny random model: the loss mask covers the answer only, an interrupted and resumed
//! run ends byte-identical to an uninterrupted one, and the validation loss falls.

mod common;
use common::records;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use supportlm_data::Task;
use supportlm_model::chat::ChatTemplate;
use supportlm_model::config::Architecture;
use supportlm_model::llama::to_vec;
use supportlm_model::model::Checkpoint;
use supportlm_model::{default_device, tiny};
use supportlm_train::examples::encode;
use supportlm_train::qlora::QloraModel;
use supportlm_train::trainer::{train, MetricsLine, TrainJob};
use supportlm_train::{TrainConfig, TrainError};

struct Setup {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    checkpoint: Checkpoint,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    tiny::write_hf_dir(&root.join("base"), &tiny::config(Architecture::Llama), 5, 1).unwrap();
    let checkpoint = Checkpoint::open(&root.join("base")).unwrap();
    Setup {
        _dir: dir,
        root,
        checkpoint,
    }
}

fn config() -> TrainConfig {
    config_with(&["base_quant=nf4"])
}

fn config_with(extra: &[&str]) -> TrainConfig {
    let mut overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    overrides.extend(
        [
            "max_steps=7",
            "epochs=2",
            "batch_size=3",
            "grad_accum=2",
            "eval_every=3",
            "save_every=1",
            "keep_checkpoints=2",
            "val_examples=6",
            "lr=5e-3",
            "lora.r=2",
            "lora.dropout=0.1",
            "max_len=1024",
        ]
        .map(String::from),
    );
    TrainConfig::load(None, &overrides).unwrap()
}

fn run(
    s: &Setup,
    out: &Path,
    config: &TrainConfig,
    resume: bool,
    stop_at: Option<usize>,
) -> Result<Vec<MetricsLine>, TrainError> {
    let mut model = s
        .checkpoint
        .with_source(|src| {
            QloraModel::load(
                src,
                &s.checkpoint.config,
                config.base_quant,
                &default_device(),
            )
        })
        .unwrap();
    let template = ChatTemplate::for_tokenizer(&s.checkpoint.tokenizer).unwrap();
    let (train_set, val_set) = (records(20, 0), records(9, 100));
    let stop = AtomicBool::new(false);
    let job = TrainJob {
        model: &mut model,
        tokenizer: &s.checkpoint.tokenizer,
        template: &template,
        train: &train_set,
        validation: &val_set,
        config,
        out_dir: out,
        base_model: "tiny",
        resume,
        stop: Some(&stop),
    };
    let mut lines = Vec::new();
    train(job, &mut |line, _| {
        lines.push(line.clone());
        if Some(line.step) == stop_at {
            stop.store(true, Ordering::SeqCst);
        }
    })?;
    Ok(lines)
}

fn losses(path: &Path) -> Vec<(u64, Option<f64>, Option<f64>)> {
    std::fs::read_to_string(path.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["train_loss"].as_f64(),
                v["val_loss"].as_f64(),
            )
        })
        .collect()
}

#[test]
fn interrupted_and_resumed_run_is_byte_identical() {
    let s = setup();
    let c = config();
    let a = s.root.join("a");
    run(&s, &a, &c, false, None).unwrap();
    // "Random" interruption points, fixed so the test is reproducible.
    for stop_at in [1usize, 4] {
        let b = s.root.join(format!("b{stop_at}"));
        let err = run(&s, &b, &c, false, Some(stop_at)).unwrap_err();
        assert!(
            matches!(err, TrainError::Interrupted { step } if step == stop_at),
            "{err}"
        );
        // Without --resume the folder is protected.
        assert!(run(&s, &b, &c, false, None).is_err());
        run(&s, &b, &c, true, None).unwrap();
        for f in [
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "best-adapter/adapter_model.safetensors",
        ] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{f} after stopping at {stop_at}"
            );
        }
        assert_eq!(losses(&a), losses(&b));
    }
    // Resuming with another config is refused.
    let other = TrainConfig {
        lr: 1e-3,
        ..c.clone()
    };
    let b = s.root.join("b1");
    assert!(run(&s, &b, &other, true, None).is_err());
    // The validation loss fell.
    let l = losses(&a);
    let first = l.first().unwrap().2.unwrap();
    let best = l.iter().filter_map(|x| x.2).fold(f64::MAX, f64::min);
    assert!(best < first, "validation loss {first} -> best {best}");
    assert_eq!(l.len(), 8);
}

#[test]
fn loss_mask_covers_the_answer_and_its_end_of_turn_only() {
    let s = setup();
    let tok = &s.checkpoint.tokenizer;
    let template = ChatTemplate::for_tokenizer(tok).unwrap();
    let r = &records(1, 0)[0];
    let (seq, truncated) = encode(Task::Category, r, tok, &template, 512)
        .unwrap()
        .unwrap();
    assert!(!truncated);
    let masked: Vec<u32> = seq
        .ids
        .iter()
        .zip(&seq.loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&t, _)| t)
        .collect();
    let text = tok.decode(&masked).unwrap();
    assert!(text.starts_with("REFUND"), "{text:?}");
    assert!(
        tok.eos_ids.contains(masked.last().unwrap()),
        "ends with the end-of-turn token"
    );
    let first = seq.loss_mask.iter().position(|&m| m).unwrap();
    assert!(seq.loss_mask[first..].iter().take(masked.len()).all(|&m| m));
    let prompt = tok.decode(&seq.ids[..first]).unwrap();
    assert!(
        prompt.contains("refund refund please") && prompt.ends_with("assistant\n"),
        "{prompt:?}"
    );
    // Too long: the answer is cut and reported, or the example dropped when the prompt alone is too long.
    let (short, truncated) = encode(Task::Category, r, tok, &template, first + 2)
        .unwrap()
        .unwrap();
    assert!(truncated && short.ids.len() == first + 2);
    assert!(encode(Task::Category, r, tok, &template, 10)
        .unwrap()
        .is_none());
}

#[test]
fn full_fine_tuning_resumes_byte_identical_and_writes_a_loadable_model() {
    let s = setup();
    let c = config_with(&["tuning=full", "base_quant=none", "max_steps=4", "lr=1e-3"]);
    let a = s.root.join("full-a");
    let lines = run(&s, &a, &c, false, None).unwrap();
    let b = s.root.join("full-b");
    assert!(run(&s, &b, &c, false, Some(2)).is_err());
    run(&s, &b, &c, true, None).unwrap();
    for f in ["model/model.safetensors", "best-model/model.safetensors"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(losses(&a), losses(&b));
    // Every parameter was trained: the saved model differs from the base, and loads as a model.
    let trained = supportlm_model::Model::load(&a.join("model"), &default_device()).unwrap();
    let base = supportlm_model::Model::load(&s.root.join("base"), &default_device()).unwrap();
    let values = |m: &supportlm_model::Model| to_vec(m.llama.embed_tokens.clone()).unwrap();
    assert_ne!(values(&trained), values(&base));
    let first = lines.first().unwrap().val_loss.unwrap();
    let last = lines.last().unwrap().val_loss.unwrap();
    assert!(last < first, "validation loss {first} -> {last}");
}
