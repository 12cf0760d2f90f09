//! Classification metrics and McNemar's test against scikit-learn and statsmodels
//! (`fixtures/metrics/metrics_cases.json`, tolerance 1e-9).

use serde_json::Value;
use supportlm_metrics::{mcnemar, ClassificationReport};

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/metrics_cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn close(got: f64, want: &Value, what: &str) {
    let want = want.as_f64().unwrap();
    assert!((got - want).abs() < 1e-9, "{what}: {got} vs {want}");
}

#[test]
fn classification_reports_match_sklearn() {
    let f = fixture();
    for case in f["classification"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let labels = strings(&case["labels"]);
        let r = ClassificationReport::compute(
            &labels,
            &strings(&case["y_true"]),
            &strings(&case["y_pred"]),
        );
        close(r.accuracy, &case["accuracy"], name);
        for (key, avg) in [
            ("macro", r.macro_avg),
            ("weighted", r.weighted_avg),
            ("micro", r.micro_avg),
        ] {
            close(
                avg.precision,
                &case[key]["precision"],
                &format!("{name} {key} precision"),
            );
            close(
                avg.recall,
                &case[key]["recall"],
                &format!("{name} {key} recall"),
            );
            close(avg.f1, &case[key]["f1"], &format!("{name} {key} f1"));
        }
        for (label, scores) in labels.iter().zip(&r.per_class) {
            let want = &case["per_class"][label];
            close(
                scores.precision,
                &want["precision"],
                &format!("{name} {label} precision"),
            );
            close(
                scores.recall,
                &want["recall"],
                &format!("{name} {label} recall"),
            );
            close(scores.f1, &want["f1"], &format!("{name} {label} f1"));
            assert_eq!(scores.support as u64, want["support"].as_u64().unwrap());
        }
        let cm: Vec<Vec<usize>> = case["confusion_matrix"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect()
            })
            .collect();
        assert_eq!(r.confusion, cm, "{name} confusion");
        assert_eq!(
            r.outside_labels as u64,
            case["failed_count"].as_u64().unwrap()
        );
        close(
            r.cohen_kappa,
            &case["cohen_kappa"],
            &format!("{name} kappa"),
        );
        close(r.mcc, &case["mcc"], &format!("{name} mcc"));
    }
}

#[test]
fn mcnemar_matches_statsmodels() {
    let f = fixture();
    for case in f["mcnemar"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let truth = strings(&case["y_true"]);
        let a: Vec<bool> = strings(&case["pred_a"])
            .iter()
            .zip(&truth)
            .map(|(p, t)| p == t)
            .collect();
        let b: Vec<bool> = strings(&case["pred_b"])
            .iter()
            .zip(&truth)
            .map(|(p, t)| p == t)
            .collect();
        let m = mcnemar(&a, &b);
        assert_eq!(
            m.a_only as u64,
            case["a_correct_b_wrong"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            m.b_only as u64,
            case["a_wrong_b_correct"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            m.both_correct as u64,
            case["both_correct"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            m.both_wrong as u64,
            case["both_wrong"].as_u64().unwrap(),
            "{name}"
        );
        let rel = |got: f64, want: &Value, what: &str| {
            let w = want.as_f64().unwrap();
            assert!(
                (got - w).abs() <= 1e-9 * w.abs().max(1e-300) || (got - w).abs() < 1e-15,
                "{name} {what}: {got} vs {w}"
            );
        };
        rel(m.exact_p, &case["exact_binomial_p"], "exact p");
        close(m.chi2_statistic, &case["chi2_corrected_statistic"], "chi2");
        rel(m.chi2_p, &case["chi2_corrected_p"], "chi2 p");
    }
}
