//! Every GGML block type the loader reads, against gguf-py's reference dequantization (bit-exact).

use serde_json::Value;
use supportlm_quant::ggml::{dequantize, GgmlType};

#[test]
fn dequantization_matches_gguf_py_bit_for_bit() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ggml-quants/quant_cases.json"
    );
    let f: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut seen = Vec::new();
    for case in f["cases"].as_array().unwrap() {
        let name = case["type"].as_str().unwrap();
        let ty = match name {
            "Q4_0" => GgmlType::Q4_0,
            "Q4_1" => GgmlType::Q4_1,
            "Q8_0" => GgmlType::Q8_0,
            "Q4_K" => GgmlType::Q4K,
            "Q6_K" => GgmlType::Q6K,
            "F16" => GgmlType::F16,
            "BF16" => GgmlType::BF16,
            other => panic!("unexpected type {other}"),
        };
        assert_eq!(ty.name(), name);
        let hex = case["hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize(ty, &bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name} value {i}: {g} vs {w}");
        }
        seen.push(name.to_string());
    }
    assert_eq!(seen.len(), 7);
}
