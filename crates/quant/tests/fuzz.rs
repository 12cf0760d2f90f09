//! Fuzzing the GGUF reader: truncations, flipped bytes, absurd counts, offsets and dimensions. The
//! property: `GgufFile::open` and reading every tensor end in a clear error or a correct load, never a
//! panic, an abort, an unbounded allocation or a hang. Bounded by `SUPPORTLM_FUZZ_ITERATIONS`.

use supportlm_fuzzing::{CappedAlloc, Fuzz, Mutation, Verdict};
use supportlm_quant::ggml::GgmlType;
use supportlm_quant::gguf::{self, GgufFile, GgufValue};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Where tensor `name`'s type id sits in a file written by `gguf::write_f32`.
fn type_offset(bytes: &[u8], name: &str, n_dims: usize) -> usize {
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("tensor name in the header");
    at + name.len() + 4 + 8 * n_dims
}

/// Valid files: F32 tensors and the same header retyped to the block formats the models use.
fn seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.gguf");
    let meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        ("llama.block_count".to_string(), GgufValue::U32(2)),
        ("general.alignment".to_string(), GgufValue::U32(32)),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(vec![
                GgufValue::String("a".into()),
                GgufValue::String("b".into()),
            ]),
        ),
        ("x.f".to_string(), GgufValue::F64(0.5)),
    ];
    let values: Vec<f32> = (0..256).map(|i| i as f32 / 7.0).collect();
    gguf::write_f32(
        &path,
        &meta,
        &[("t.a", &[4, 64], &values[..]), ("t.b", &[256], &values[..])],
    )
    .unwrap();
    let f32_file = std::fs::read(&path).unwrap();
    let mut out = vec![f32_file.clone()];
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let mut b = f32_file.clone();
        let at = type_offset(&b, "t.b", 1);
        b[at..at + 4].copy_from_slice(&ty.id().to_le_bytes());
        out.push(b);
    }
    out
}

fn open_and_read(bytes: &[u8], dir: &std::path::Path) -> Verdict {
    let path = dir.join("input.gguf");
    std::fs::write(&path, bytes).unwrap();
    let Ok(file) = GgufFile::open(&path) else {
        return Verdict::Refused;
    };
    let names: Vec<String> = file.tensors.iter().map(|t| t.name.clone()).collect();
    let mut verdict = Verdict::Loaded;
    for name in names {
        if file.tensor_f32(&name).is_err() {
            verdict = Verdict::Refused;
        }
    }
    verdict
}

#[test]
fn fuzz_gguf_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    Fuzz::new("gguf", Mutation::Bytes).run(&seeds(), move |bytes| open_and_read(bytes, &path));
}

#[test]
fn deeply_nested_metadata_arrays_are_refused_not_a_stack_overflow() {
    // An array of arrays of arrays …: 12 bytes per level, 100,000 levels.
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100_000 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.gguf");
    std::fs::write(&path, &b).unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(err.contains("nested"), "{err}");
}

#[test]
fn absurd_dimensions_are_refused_before_any_arithmetic_overflows() {
    let seeds = seeds();
    let mut b = seeds[0].clone();
    // t.a: dims [64, 4] in GGUF order; make both 2^33 (their product overflows 64 bits).
    let at = type_offset(&b, "t.a", 2) - 16;
    b[at..at + 8].copy_from_slice(&(1u64 << 33).to_le_bytes());
    b[at + 8..at + 16].copy_from_slice(&(1u64 << 33).to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.gguf");
    std::fs::write(&path, &b).unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(err.contains("t.a"), "{err}");
}
