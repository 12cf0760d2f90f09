//! GGUF files: header, metadata, tensor table and memory-mapped tensor data (read), and a small writer
//! for F32 tensors (used to export and to build test models).
//!
//! Layout (GGUF v2/v3, little-endian): `"GGUF"`, version u32, tensor count u64, metadata count u64, the
//! metadata key/values, the tensor infos (name, dims innermost first, type, offset), padding to
//! `general.alignment` (default 32), then the tensor data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{QuantError, Result};
use crate::ggml::{dequantize, GgmlType};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type.
    Array(Vec<GgufValue>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl GgufValue {
    /// Any integer value as u64 (negative values are `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name in the file (GGUF naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as GGUF lists them: innermost first (`[in, out]` for a weight matrix).
    pub ne: Vec<usize>,
    /// How its data is stored.
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Values in the tensor (the product of its dimensions).
    pub fn n_elements(&self) -> usize {
        self.ne.iter().product()
    }

    /// Dimensions in PyTorch order (outermost first: `[out, in]`).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// The GGUF version in the header (2 or 3).
    pub version: u32,
    /// Every metadata key and its value.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// How deeply metadata arrays may nest (llama.cpp's files nest at most once).
const MAX_ARRAY_DEPTH: usize = 8;

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(QuantError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                start: self.pos as u64,
                end: self.pos as u64 + n as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // A length can never exceed what is left in the file: catches garbage before allocating.
        if n > (self.bytes.len() - self.pos) as u64 {
            return Err(QuantError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} (declared length {n})"),
                start: self.pos as u64,
                end: self.pos as u64 + n,
                len: self.bytes.len() as u64,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| self.malformed(format!("{what} is not valid UTF-8")))
    }

    fn malformed(&self, message: String) -> QuantError {
        QuantError::Malformed {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn value(&mut self, ty: u32, what: &str) -> Result<GgufValue> {
        self.value_at(ty, what, 0)
    }

    /// A value inside `depth` enclosing arrays (bounded: a file of nested arrays must not overflow the
    /// stack).
    fn value_at(&mut self, ty: u32, what: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(format!(
                        "{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
                    )));
                }
                let item_ty = self.u32(what)?;
                let n = self.len(what)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value_at(item_ty, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(self.malformed(format!("{what}: unknown metadata value type {other}")))
            }
        })
    }
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file, validating the header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| QuantError::io(path, e))?;
        // SAFETY: the map is read-only and the file is not modified while this process holds it; a file
        // truncated by someone else underneath us is outside what any reader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| QuantError::io(path, e))?;
        let (version, metadata, tensors, data_start) = Self::parse(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        path: &Path,
        bytes: &[u8],
    ) -> Result<(u32, BTreeMap<String, GgufValue>, Vec<TensorInfo>, usize)> {
        let mut r = Reader {
            path,
            bytes,
            pos: 0,
        };
        let magic: [u8; 4] = r.array("the magic number")?;
        if &magic != b"GGUF" {
            return Err(QuantError::BadMagic {
                path: path.to_path_buf(),
                found: magic,
            });
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(QuantError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("metadata `{key}`"))?;
            let value = r.value(ty, &format!("metadata `{key}`"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor #{i} name"))?;
            let n_dims = r.u32(&format!("tensor `{name}`"))?;
            if n_dims > 4 {
                return Err(r.malformed(format!(
                    "tensor `{name}` has {n_dims} dimensions (at most 4)"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64(&format!("tensor `{name}`"))? as usize);
            }
            let ty = GgmlType::from_id(r.u32(&format!("tensor `{name}`"))?);
            let offset = r.u64(&format!("tensor `{name}`"))?;
            tensors.push(TensorInfo {
                name,
                ne,
                ty,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 {
            return Err(r.malformed("general.alignment is 0".into()));
        }
        let data_start = r
            .pos
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| r.malformed(format!("general.alignment {alignment} is absurd")))?;
        for t in &tensors {
            // Dimensions from the file are checked before any size arithmetic: their product, and the
            // byte range it implies, must fit in the file.
            let Some(n_elements) = t.ne.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
                return Err(r.malformed(format!(
                    "tensor `{}`: dimensions {:?} overflow",
                    t.name, t.ne
                )));
            };
            let Some(n_bytes) = t.ty.bytes_for(n_elements) else {
                if t.ty.block().is_some() {
                    return Err(r.malformed(format!(
                        "tensor `{}`: {} elements is not a whole number of {} blocks",
                        t.name,
                        t.n_elements(),
                        t.ty.name()
                    )));
                }
                continue; // unsupported type: an error when (if) the tensor is read
            };
            let start = (data_start as u64).saturating_add(t.offset);
            let end = start.saturating_add(n_bytes as u64);
            if end > bytes.len() as u64 {
                return Err(QuantError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("tensor `{}` ({}, {} bytes)", t.name, t.ty.name(), n_bytes),
                    start,
                    end,
                    len: bytes.len() as u64,
                });
            }
        }
        Ok((version, metadata, tensors, data_start))
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The tensor named `name` (GGUF naming), if the file has it.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (still quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| QuantError::MissingTensor {
                tensor: name.to_string(),
            })?;
        let n_bytes = info.ty.bytes_for(info.n_elements()).ok_or_else(|| {
            QuantError::UnsupportedTensorType {
                tensor: name.to_string(),
                type_name: info.ty.name(),
            }
        })?;
        let start = self.data_start + info.offset as usize;
        Ok((info, &self.mmap[start..start + n_bytes]))
    }

    /// A tensor dequantized to f32, with its shape in PyTorch order.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (info, bytes) = self.tensor_bytes(name)?;
        let mut out = vec![0f32; info.n_elements()];
        dequantize(info.ty, bytes, &mut out);
        Ok((out, info.shape()))
    }
}

/// Writes a GGUF v3 file with the given metadata and F32 tensors (shapes in PyTorch order), atomically.
pub fn write_f32(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(&str, &[usize], &[f32])],
) -> Result<()> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(items) => {
                let ty = items.first().map(type_id).unwrap_or(4);
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item);
                }
            }
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    const ALIGN: usize = 32;
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        out.extend_from_slice(&type_id(value).to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(QuantError::Input(format!(
                "tensor `{name}`: shape {shape:?} does not match {} values",
                data.len()
            )));
        }
        put_str(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&GgmlType::F32.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += (data.len() * 4).div_ceil(ALIGN) * ALIGN;
    }
    for (_, _, data) in tensors {
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        for v in *data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    supportlm_fsio::write_atomic(path, &out).map_err(|e| QuantError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(path: &Path) {
        write_f32(
            path,
            &[
                (
                    "general.architecture".into(),
                    GgufValue::String("llama".into()),
                ),
                ("llama.block_count".into(), GgufValue::U32(1)),
                (
                    "tokenizer.ggml.tokens".into(),
                    GgufValue::Array(vec![
                        GgufValue::String("a".into()),
                        GgufValue::String("b".into()),
                    ]),
                ),
            ],
            &[
                ("w", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                ("v", &[4], &[7.0, 8.0, 9.0, 10.0]),
            ],
        )
        .unwrap();
    }

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        tiny(&p);
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(
            g.get("llama.block_count").and_then(GgufValue::as_u64),
            Some(1)
        );
        assert_eq!(
            g.get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len()),
            Some(2)
        );
        let (w, shape) = g.tensor_f32("w").unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(w, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(g.tensor_f32("v").unwrap().0, vec![7.0, 8.0, 9.0, 10.0]);
        let e = g.tensor_f32("nope").unwrap_err().to_string();
        assert!(e.contains("tensor `nope` is missing"), "{e}");
    }

    #[test]
    fn bad_magic_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        std::fs::write(&p, b"GGML\x03\0\0\0 and more bytes here").unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("not a GGUF file (bad magic"), "{e}");
    }

    #[test]
    fn truncated_file_is_named_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        tiny(&p);
        let full = std::fs::read(&p).unwrap();
        for cut in [3, 10, 30, 60, 120, full.len() - 40, full.len() - 1] {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = GgufFile::open(&p).unwrap_err().to_string();
            assert!(e.contains("file is truncated"), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn wrong_tensor_size_and_unsupported_type_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        tiny(&p);
        let mut bytes = std::fs::read(&p).unwrap();
        // Find the type id (0 = F32) of tensor "w": after name, n_dims, 2 dims.
        let name_at = bytes
            .windows(9)
            .position(|w| w == b"\x01\0\0\0\0\0\0\0w")
            .unwrap()
            + 9;
        let ty_at = name_at + 4 + 16;
        // Q5_K: recognised by name, not readable.
        bytes[ty_at..ty_at + 4].copy_from_slice(&13u32.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let g = GgufFile::open(&p).unwrap();
        let e = g.tensor_f32("w").unwrap_err().to_string();
        assert!(e.contains("unsupported tensor type Q5_K"), "{e}");
        // Q4_0 needs whole 32-element blocks: 6 elements is a wrong tensor size.
        bytes[ty_at..ty_at + 4].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("not a whole number of Q4_0 blocks"), "{e}");
    }
}
