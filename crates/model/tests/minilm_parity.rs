//! all-MiniLM-L6-v2 in Burn against the transformers / sentence-transformers reference embeddings in
//! `fixtures/all-minilm-l6-v2/` (token ids exact; embeddings and cosines within 1e-5).
//!
//! Needs `checkpoints/embed/all-MiniLM-L6-v2/` (`cargo xtask setup`).

use std::path::PathBuf;

use supportlm_model::bert::{cosine, SentenceEncoder};
use supportlm_model::default_device;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn encoder() -> SentenceEncoder {
    let dir = root().join("checkpoints/embed/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `cargo xtask setup`",
        dir.display()
    );
    SentenceEncoder::load(&dir, &default_device()).unwrap()
}

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/all-minilm-l6-v2/embedding_cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn embeddings_match_sentence_transformers() {
    let enc = encoder();
    let f = fixture();
    let sentences: Vec<&str> = f["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for (s, want) in sentences.iter().zip(f["input_ids"].as_array().unwrap()) {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(enc.encode(s).unwrap(), want, "{s}");
    }
    // One padded batch, as the reference did.
    let emb = enc.embed(&sentences).unwrap();
    for (i, e) in emb.iter().enumerate() {
        assert_eq!(e.len(), 384);
        for (j, want) in f["embedding_first8"][i]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (e[j] - want).abs() < 1e-5,
                "sentence {i} dim {j}: {} vs {want}",
                e[j]
            );
        }
        let sum: f64 = e.iter().map(|&x| x as f64).sum();
        let want = f["embedding_sum"][i].as_f64().unwrap();
        assert!(
            (sum - want).abs() < 1e-4,
            "sentence {i} sum: {sum} vs {want}"
        );
        for (k, other) in emb.iter().enumerate() {
            let want = f["cosine"][i][k].as_f64().unwrap() as f32;
            let got = cosine(e, other);
            assert!((got - want).abs() < 1e-5, "cosine {i},{k}: {got} vs {want}");
        }
    }
    // Alone (no padding) gives the same vector as in the batch.
    let alone = enc.embed(&sentences[3..]).unwrap();
    let diff = alone[0]
        .iter()
        .zip(&emb[3])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "padding changed the embedding by {diff}");
}

#[test]
fn long_texts_are_cut_to_max_len_keeping_sep() {
    let enc = encoder();
    let long = "refund ".repeat(400);
    let ids = enc.encode(&long).unwrap();
    assert_eq!(ids.len(), enc.max_len);
    assert_eq!(ids[0], 101);
    assert_eq!(*ids.last().unwrap(), 102);
    assert!(SentenceEncoder::load(&root().join("no-such-dir"), &default_device()).is_err());
}
