//! NF4 and double quantization against bitsandbytes' own output (`tests/fixtures/nf4-bitsandbytes`).

use serde_json::Value;
use supportlm_quant::nf4::{dynamic_code, nf4_code};
use supportlm_quant::{Absmax, Nf4Tensor};

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/nf4-bitsandbytes/nf4_cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn u8s(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn code_tables_match_bitsandbytes() {
    let f = fixture();
    assert_eq!(nf4_code().to_vec(), f32s(&f["code"]));
    for case in f["cases"].as_array().unwrap() {
        assert_eq!(
            dynamic_code().to_vec(),
            f32s(&case["double_quant"]["state2_code"])
        );
    }
}

#[test]
fn single_and_double_quantization_reproduce_bitsandbytes_bytes() {
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let input = f32s(&case["input"]);

        let single = Nf4Tensor::quantize(&input, &shape, false);
        let s = &case["single_quant"];
        assert_eq!(single.packed, u8s(&s["packed"]), "{name}: single packed");
        assert_eq!(
            single.absmax,
            Absmax::Single(f32s(&s["absmax"])),
            "{name}: absmax"
        );
        assert_close(&single.dequantize(), &f32s(&s["dequantized"]), 1e-6, name);

        let double = Nf4Tensor::quantize(&input, &shape, true);
        let d = &case["double_quant"];
        assert_eq!(double.packed, u8s(&case["packed"]), "{name}: double packed");
        let Absmax::Double {
            codes,
            state2_absmax,
            offset,
        } = &double.absmax
        else {
            panic!("{name}: expected double quantization");
        };
        assert_eq!(codes, &u8s(&d["absmax_codes"]), "{name}: absmax codes");
        assert_eq!(
            *offset,
            d["offset"].as_f64().unwrap() as f32,
            "{name}: offset"
        );
        assert_close(state2_absmax, &f32s(&d["state2_absmax"]), 0.0, name);
        assert_close(&double.dequantize(), &f32s(&d["dequantized"]), 1e-6, name);
        // About 4.127 bits per parameter (4 + 8/64 + 32/(64*256)) for whole second-level blocks.
        let bits = 8.0 * double.resident_bytes() as f64 / input.len() as f64;
        assert!(bits < 4.7, "{name}: {bits} bits per parameter");
    }
}
