//! Fuzzing what a user hands the model loader: `config.json`, `tokenizer_config.json`, safetensors
//! headers, GGUF models, PEFT adapters (`adapter_config.json` + weights with wrong shapes, names or
//! dtypes). The property: a clear error or a correct load, never a panic, an abort, an unbounded
//! allocation or a hang. Each input is a copy of the tiny model with one file mutated. Bounded by
//! `SUPPORTLM_FUZZ_ITERATIONS`.

use std::path::{Path, PathBuf};

use supportlm_fuzzing::{CappedAlloc, Fuzz, Mutation, Verdict};
use supportlm_model::config::{Architecture, ModelConfig};
use supportlm_model::lora::{Adapter, LoraConfig};
use supportlm_model::{default_device, tiny, Model};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// A tiny model folder, its GGUF twin and an adapter for it, written once per test.
struct Fixture {
    _dir: tempfile::TempDir,
    hf: PathBuf,
    gguf: PathBuf,
    adapter: PathBuf,
    config: ModelConfig,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny::config(Architecture::Llama);
    let hf = dir.path().join("hf");
    tiny::write_hf_dir(&hf, &config, 3, 1).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    tiny::write_gguf(&gguf, &config, 3).unwrap();
    let adapter = dir.path().join("adapter");
    Adapter::init(LoraConfig::default(), &config, "tiny", 5)
        .unwrap()
        .save(&adapter, &config)
        .unwrap();
    Fixture {
        hf: hf.clone(),
        gguf,
        adapter,
        config,
        _dir: dir,
    }
}

/// A scratch copy of folder `from` with `file` replaced by `bytes`.
fn copy_with(from: &Path, to: &Path, file: &str, bytes: &[u8]) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    std::fs::write(to.join(file), bytes).unwrap();
}

/// Loads the model in `dir` and, when that works, encodes a chat turn (the template is part of the load).
fn load(dir: &Path) -> Verdict {
    match Model::load(dir, &default_device()) {
        Ok(model) => model
            .encode_chat(
                &[serde_json::json!({"role": "user", "content": "hi"})],
                true,
            )
            .into(),
        Err(_) => Verdict::Refused,
    }
}

/// Splits a safetensors file into its header JSON and its data.
fn split_safetensors(bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (bytes[8..8 + n].to_vec(), bytes[8 + n..].to_vec())
}

/// A safetensors file from a (mutated) header JSON and the data: the length prefix is recomputed,
/// except for inputs whose length is odd, which keep the seed's (a lying prefix is a case too).
fn join_safetensors(json: &[u8], seed_len: usize, data: &[u8]) -> Vec<u8> {
    let n = if json.len() % 2 == 1 {
        seed_len
    } else {
        json.len()
    };
    let mut file = (n as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json);
    file.extend_from_slice(data);
    file
}

#[test]
fn fuzz_config_json() {
    let f = fixture();
    let seed = std::fs::read(f.hf.join("config.json")).unwrap();
    let scratch = f._dir.path().join("scratch-config");
    let hf = f.hf.clone();
    Fuzz::new("config.json", Mutation::Text)
        .scaled(1, 4)
        .run(&[seed], move |bytes| {
            copy_with(&hf, &scratch, "config.json", bytes);
            load(&scratch)
        });
}

#[test]
fn fuzz_tokenizer_config_json() {
    let f = fixture();
    let seed = std::fs::read(f.hf.join("tokenizer_config.json")).unwrap();
    let scratch = f._dir.path().join("scratch-tokcfg");
    let hf = f.hf.clone();
    Fuzz::new("tokenizer_config.json", Mutation::Text)
        .scaled(1, 4)
        .run(&[seed], move |bytes| {
            copy_with(&hf, &scratch, "tokenizer_config.json", bytes);
            load(&scratch)
        });
}

#[test]
fn fuzz_safetensors_header() {
    let f = fixture();
    let (header, data) = split_safetensors(&std::fs::read(f.hf.join("model.safetensors")).unwrap());
    let scratch = f._dir.path().join("scratch-st");
    let hf = f.hf.clone();
    // The header is mutated; the tensor data after it is kept.
    let seed_len = header.len();
    Fuzz::new("safetensors-header", Mutation::Text)
        .scaled(1, 4)
        .run(&[header], move |bytes| {
            let file = join_safetensors(bytes, seed_len, &data);
            copy_with(&hf, &scratch, "model.safetensors", &file);
            load(&scratch)
        });
}

#[test]
fn fuzz_gguf_model() {
    let f = fixture();
    let seed = std::fs::read(&f.gguf).unwrap();
    // Mutations near the front (the metadata and tensor table) matter; keep the data as it is.
    let head = seed.len().min(8192);
    let (front, rest) = (seed[..head].to_vec(), seed[head..].to_vec());
    let path = f._dir.path().join("scratch.gguf");
    Fuzz::new("gguf-model", Mutation::Bytes)
        .scaled(1, 4)
        .run(&[front], move |bytes| {
            let mut file = bytes.to_vec();
            file.extend_from_slice(&rest);
            std::fs::write(&path, &file).unwrap();
            load(&path)
        });
}

#[test]
fn fuzz_peft_adapter_config() {
    let f = fixture();
    let seed = std::fs::read(f.adapter.join("adapter_config.json")).unwrap();
    let base = Model::load(&f.hf, &default_device()).unwrap();
    let scratch = f._dir.path().join("scratch-adapter-config");
    let (adapter, config) = (f.adapter.clone(), f.config.clone());
    Fuzz::new("adapter_config.json", Mutation::Text)
        .scaled(1, 4)
        .run(&[seed], move |bytes| {
            copy_with(&adapter, &scratch, "adapter_config.json", bytes);
            match Adapter::load(&scratch, &config) {
                Ok(a) => supportlm_model::lora::attach(&base.llama, &a).into(),
                Err(_) => Verdict::Refused,
            }
        });
}

#[test]
fn fuzz_peft_adapter_weights() {
    let f = fixture();
    let (header, data) =
        split_safetensors(&std::fs::read(f.adapter.join("adapter_model.safetensors")).unwrap());
    let base = Model::load(&f.hf, &default_device()).unwrap();
    let scratch = f._dir.path().join("scratch-adapter-weights");
    let (adapter, config) = (f.adapter.clone(), f.config.clone());
    // Wrong shapes, names and dtypes come from mutating the header's JSON.
    let seed_len = header.len();
    Fuzz::new("adapter_model.safetensors", Mutation::Text)
        .scaled(1, 4)
        .run(&[header], move |bytes| {
            let file = join_safetensors(bytes, seed_len, &data);
            copy_with(&adapter, &scratch, "adapter_model.safetensors", &file);
            match Adapter::load(&scratch, &config) {
                Ok(a) => supportlm_model::lora::attach(&base.llama, &a).into(),
                Err(_) => Verdict::Refused,
            }
        });
}

#[test]
fn a_model_larger_than_memory_is_refused_before_loading() {
    // A config.json promising a 400-trillion-parameter model (every dimension within its own bound)
    // next to the tiny model's small weights: refused for its size, before any tensor is read.
    let f = fixture();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.hf.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = 131072.into();
    config["intermediate_size"] = 1048576.into();
    config["num_hidden_layers"] = 1024.into();
    config["num_attention_heads"] = 1024.into();
    config["num_key_value_heads"] = 1024.into();
    let scratch = f._dir.path().join("huge");
    copy_with(
        &f.hf,
        &scratch,
        "config.json",
        config.to_string().as_bytes(),
    );
    let err = Model::load(&scratch, &default_device())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("MB of memory"), "{err}");
}
