//! Where weights come from, and the one place that maps checkpoint tensor names to model fields.
//!
//! The model uses Hugging Face names and layouts internally. A [`TensorSource`] hands out f32 tensors by
//! Hugging Face name: [`SafetensorsDir`] reads them directly, [`GgufFile`] translates the name
//! ([`names::gguf`]) and un-permutes the Q/K rows that llama.cpp's converter permuted for its RoPE layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::{Architecture, ModelConfig};
use supportlm_quant::ggml::GgmlType;
use supportlm_quant::gguf::GgufFile;

use crate::error::{ModelError, Result};
use crate::llama::{Attention, DecoderLayer, Linear, Llama, Mlp, PromptPath, RmsNorm, Rope};
use crate::names::{self, Target};
use crate::weight::BaseWeight;
use supportlm_quant::BaseQuant;

/// A tensor as stored: GGML blocks and the shape in PyTorch order.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// How the data is stored.
    pub ty: GgmlType,
    /// The stored bytes.
    pub bytes: Vec<u8>,
    /// Shape in PyTorch order.
    pub shape: Vec<usize>,
}

/// Something that yields f32 tensors by Hugging Face name.
pub trait TensorSource {
    /// The tensor as f32 values and its shape (PyTorch order), or `None` if absent.
    fn tensor(&self, hf_name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>>;

    /// The tensor's stored GGML blocks and shape, for sources that keep quantized weights.
    fn raw(&self, _hf_name: &str) -> Result<Option<RawTensor>> {
        Ok(None)
    }

    /// Whether [`TensorSource::raw`] rows of llama Q/K are in llama.cpp's permuted order.
    fn raw_is_permuted(&self) -> bool {
        false
    }

    /// The tensor's values, which must be present with `shape`.
    fn require(&self, hf_name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.tensor(hf_name)? {
            Some((data, found)) if found == shape => Ok(data),
            Some((_, found)) => Err(ModelError::ShapeMismatch {
                tensor: hf_name.to_string(),
                expected: shape.to_vec(),
                found,
            }),
            None => Err(ModelError::MissingTensor {
                tensor: hf_name.to_string(),
            }),
        }
    }
}

/// Which GGUF row each Hugging Face row of a llama Q/K projection comes from: llama.cpp's converter
/// permuted rows per head, `W_hf[h*d + i*d/2 + j] = W_gguf[h*d + 2j + i]`.
pub fn unpermute_order(rows: usize, n_heads: usize) -> Vec<usize> {
    let d = rows / n_heads;
    let half = d / 2;
    let mut order = vec![0; rows];
    for h in 0..n_heads {
        for i in 0..2 {
            for j in 0..half {
                order[h * d + i * half + j] = h * d + 2 * j + i;
            }
        }
    }
    order
}

/// Reverses llama.cpp's Q/K row permutation on f32 values ([`unpermute_order`]); `cols` = 1 for biases.
pub fn unpermute_rows(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let order = unpermute_order(w.len() / cols, n_heads);
    order
        .iter()
        .flat_map(|&src| w[src * cols..(src + 1) * cols].iter().copied())
        .collect()
}

/// A GGUF file read through Hugging Face names.
pub struct GgufSource<'a> {
    /// The file.
    pub file: &'a GgufFile,
    /// Its configuration (Q/K un-permutation needs the head counts).
    pub config: &'a ModelConfig,
}

impl TensorSource for GgufSource<'_> {
    fn tensor(&self, hf_name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let name = names::gguf(hf_name);
        if self.file.tensor_info(&name).is_none() {
            return Ok(None);
        }
        let (data, shape) = self.file.tensor_f32(&name)?;
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let heads = match names::gguf_target(&name) {
            Some(Target::QProj) => Some(self.config.num_attention_heads),
            Some(Target::KProj) => Some(self.config.kv_heads()),
            _ => None,
        };
        // Only llama-architecture GGUFs are permuted by the converter. A tensor whose shape does not
        // split into the heads is left as it is: the shape check after this refuses it.
        let rows = data.len().checked_div(cols).unwrap_or(0);
        let data = match heads {
            Some(n)
                if self.config.model_type == Architecture::Llama
                    && rows > 0
                    && n > 0
                    && rows.is_multiple_of(n) =>
            {
                unpermute_rows(&data, n, cols)
            }
            _ => data,
        };
        Ok(Some((data, shape)))
    }

    fn raw(&self, hf_name: &str) -> Result<Option<RawTensor>> {
        let name = names::gguf(hf_name);
        if self.file.tensor_info(&name).is_none() {
            return Ok(None);
        }
        let (info, bytes) = self.file.tensor_bytes(&name)?;
        Ok(Some(RawTensor {
            ty: info.ty,
            bytes: bytes.to_vec(),
            shape: info.shape(),
        }))
    }

    fn raw_is_permuted(&self) -> bool {
        true
    }
}

/// A Hugging Face folder: `config.json` and one or several `*.safetensors` files.
pub struct SafetensorsDir {
    dir: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `maps`.
    index: BTreeMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Safetensors {
                    path: index_path.clone(),
                    message: e.to_string(),
                })?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| ModelError::Safetensors {
                    path: index_path.clone(),
                    message: "no weight_map".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_files(dir, files)
    }

    /// Opens the given safetensors files as one source (e.g. an adapter's `adapter_model.safetensors`).
    pub fn open_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let mut maps = Vec::new();
        let mut index = BTreeMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: read-only map of a file this process does not modify.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), maps.len());
            }
            maps.push((path, mmap));
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            maps,
            index,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name in the folder's files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

impl TensorSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.maps[i];
        let err = |message: String| ModelError::Safetensors {
            path: path.clone(),
            message,
        };
        let st = SafeTensors::deserialize(mmap).map_err(|e| err(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| err(e.to_string()))?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(err(format!(
                    "tensor `{name}` has dtype {other:?} (supported: F32, F16, BF16)"
                )))
            }
        };
        Ok(Some((data, view.shape().to_vec())))
    }
}

/// Builds the decoder from a source, checking every tensor's shape against the configuration.
pub fn load_llama(src: &dyn TensorSource, config: &ModelConfig, device: &Device) -> Result<Llama> {
    load_llama_as(src, config, BaseQuant::None, device)
}

/// [`load_llama`] with the layers' linear weights held in `quant`'s format, each quantized as it is
/// read (the f32 values of one matrix at a time, never the whole model's).
pub fn load_llama_as(
    src: &dyn TensorSource,
    config: &ModelConfig,
    quant: BaseQuant,
    device: &Device,
) -> Result<Llama> {
    config.validate()?;
    crate::alloc::ensure_fits(
        &format!("a {}M-parameter model", config.num_params() / 1_000_000),
        config.load_bytes(),
    )?;
    let c = config;
    let hidden = c.hidden_size;
    let need = |name: &str, shape: &[usize]| src.require(name, shape);
    let t2 = |data: Vec<f32>, shape: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(data, shape), device)
    };
    let t1 = |data: Vec<f32>| {
        let n = data.len();
        Tensor::<1>::from_data(TensorData::new(data, [n]), device)
    };
    let norm = |name: &str| -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: t1(need(name, &[hidden])?),
            eps: c.rms_norm_eps,
        })
    };

    let embed_tokens = t2(
        need(names::EMBED_TOKENS, &[c.vocab_size, hidden])?,
        [c.vocab_size, hidden],
    );
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let ln = names::layer(i);
        let linear = |t: Target| -> Result<Linear> {
            let [out, inp] = t.shape(c);
            let p = ln.proj(t);
            let weight = BaseWeight::new(need(&p.weight(), &[out, inp])?, out, inp, quant, device);
            let bias = if t.has_bias(c) {
                Some(t1(need(&p.bias(), &[out])?))
            } else {
                None
            };
            Ok(Linear {
                weight,
                bias,
                lora: None,
            })
        };
        layers.push(DecoderLayer {
            input_layernorm: norm(&ln.input_norm())?,
            self_attn: Attention {
                q_proj: linear(Target::QProj)?,
                k_proj: linear(Target::KProj)?,
                v_proj: linear(Target::VProj)?,
                o_proj: linear(Target::OProj)?,
            },
            post_attention_layernorm: norm(&ln.post_attention_norm())?,
            mlp: Mlp {
                gate_proj: linear(Target::GateProj)?,
                up_proj: linear(Target::UpProj)?,
                down_proj: linear(Target::DownProj)?,
            },
        });
    }
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(t2(
            need(names::LM_HEAD, &[c.vocab_size, hidden])?,
            [c.vocab_size, hidden],
        ))
    };
    Ok(Llama {
        config: config.clone(),
        embed_tokens,
        layers,
        norm: norm(names::FINAL_NORM)?,
        lm_head,
        rope: Rope::for_config(c, device),
        device: device.clone(),
        prompt_path: PromptPath::default(),
    })
}

/// Writes f32 tensors (name, shape, row-major values) as a safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), data) in tensors.iter().zip(&bytes) {
        let view =
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data).map_err(|e| {
                ModelError::Safetensors {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}`: {e}"),
                }
            })?;
        views.push((name.clone(), view));
    }
    let out =
        safetensors::tensor::serialize(views, metadata).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    supportlm_fsio::write_atomic(path, &out).map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        let (heads, d, cols) = (2, 8, 3);
        let hf: Vec<f32> = (0..heads * d * cols).map(|v| v as f32).collect();
        let gguf = crate::tiny::permute_rows(&hf, heads, cols);
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, heads, cols), hf);
        // Row 1 of head 0 in GGUF order is row d/2 in Hugging Face order.
        assert_eq!(gguf[cols..2 * cols], hf[(d / 2) * cols..(d / 2 + 1) * cols]);
    }
}
