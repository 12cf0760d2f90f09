//! ROUGE (rouge-score), BLEU and chrF (sacrebleu) against `fixtures/metrics/metrics_cases.json` (1e-6).

use serde_json::Value;
use supportlm_metrics::text::{
    corpus_bleu, corpus_chrf, rouge, rouge_stemmed, sentence_bleu, sentence_chrf,
};

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/metrics_cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn close(got: f64, want: &Value, what: &str) {
    let want = want.as_f64().unwrap();
    assert!((got - want).abs() < 1e-6, "{what}: {got} vs {want}");
}

#[test]
fn sentence_metrics_match_rouge_score_and_sacrebleu() {
    let f = fixture();
    for (i, case) in f["text_pairs"].as_array().unwrap().iter().enumerate() {
        let (h, r) = (
            case["hypothesis"].as_str().unwrap(),
            case["reference"].as_str().unwrap(),
        );
        for (key, got) in [
            ("rouge_unstemmed", rouge(h, r)),
            ("rouge_stemmed", rouge_stemmed(h, r)),
        ] {
            let want = &case[key];
            for (name, prf) in [
                ("rouge1", got.rouge1),
                ("rouge2", got.rouge2),
                ("rougeL", got.rouge_l),
                ("rougeLsum", got.rouge_lsum),
            ] {
                if want[name].is_null() {
                    continue;
                }
                close(
                    prf.precision,
                    &want[name]["precision"],
                    &format!("pair {i} {key} {name} precision"),
                );
                close(
                    prf.recall,
                    &want[name]["recall"],
                    &format!("pair {i} {key} {name} recall"),
                );
                close(prf.f, &want[name]["f"], &format!("pair {i} {key} {name} f"));
            }
        }
        close(
            sentence_bleu(h, r),
            &case["sentence_bleu"],
            &format!("pair {i} BLEU"),
        );
        close(
            sentence_chrf(h, r),
            &case["sentence_chrf"],
            &format!("pair {i} chrF"),
        );
    }
}

#[test]
fn corpus_metrics_match_sacrebleu() {
    let f = fixture();
    let c = &f["text_corpus"];
    let strs = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (h, r) = (strs(&c["hypotheses"]), strs(&c["references"]));
    close(corpus_bleu(&h, &r), &c["corpus_bleu"], "corpus BLEU");
    close(corpus_chrf(&h, &r), &c["corpus_chrf"], "corpus chrF");
}
