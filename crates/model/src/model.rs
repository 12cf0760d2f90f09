//! A loaded model: decoder weights, tokenizer and chat template, from a GGUF file or a Hugging Face folder.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use burn::tensor::Device;
use serde::Serialize;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::decode::DecodeWeights;
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use crate::loader::{load_llama_as, GgufSource, SafetensorsDir, TensorSource};
use crate::lora::{attach, merge, Adapter, MergedSource};
use crate::tokenizer::Tokenizer;
use supportlm_quant::gguf::GgufFile;
use supportlm_quant::BaseQuant;

/// The checkpoint file(s), kept open (memory-mapped) for weights read later.
enum Weights {
    Gguf(GgufFile),
    Hf(SafetensorsDir),
}

/// An opened checkpoint (GGUF file or Hugging Face folder): configuration, tokenizer and memory-mapped
/// weights, read one tensor at a time through [`Checkpoint::with_source`].
pub struct Checkpoint {
    /// The file or folder opened.
    pub path: PathBuf,
    /// Its configuration.
    pub config: ModelConfig,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    weights: Weights,
}

impl Checkpoint {
    /// Opens a `.gguf` file or a Hugging Face folder (`config.json`, `*.safetensors`, `tokenizer.json`).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let config_path = path.join("config.json");
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| ModelError::io(&config_path, e))?;
            let config = ModelConfig::from_json(&text)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            let weights = SafetensorsDir::open(path)?;
            Ok(Checkpoint {
                path: path.to_path_buf(),
                config,
                tokenizer,
                weights: Weights::Hf(weights),
            })
        } else if path.exists() {
            let file = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&file)?;
            let tokenizer = Tokenizer::from_gguf(&file)?;
            Ok(Checkpoint {
                path: path.to_path_buf(),
                config,
                tokenizer,
                weights: Weights::Gguf(file),
            })
        } else {
            Err(ModelError::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model file or folder (run `cargo xtask setup` for the default model)",
                ),
            ))
        }
    }

    /// Calls `f` with the weights as a [`TensorSource`] (Hugging Face names and layouts).
    pub fn with_source<R>(&self, f: impl FnOnce(&dyn TensorSource) -> R) -> R {
        match &self.weights {
            Weights::Gguf(file) => f(&GgufSource {
                file,
                config: &self.config,
            }),
            Weights::Hf(dir) => f(dir),
        }
    }
}

/// Everything needed to turn text into text.
pub struct Model {
    /// The decoder.
    pub llama: Llama,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub template: ChatTemplate,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// The adapter merged into the weights, if any.
    pub adapter: Option<Adapter>,
    /// The adapter attached unmerged (see [`Model::attach_adapter`]), if any; the decode path reads
    /// its factors from here.
    pub attached: Option<Arc<Adapter>>,
    /// How the layers' linear weights are held (see [`Model::quantize_base`]).
    pub base_quant: BaseQuant,
    /// Shared by a base and the models attached to it.
    checkpoint: Arc<Weights>,
    decode: Arc<OnceLock<DecodeWeights>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .field("config", &self.llama.config)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads a `.gguf` file or a Hugging Face folder (`config.json`, `*.safetensors`, `tokenizer.json`).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_checkpoint(Checkpoint::open(path)?, device)
    }

    /// [`Model::load`] with the base's linear weights held in `quant`'s format (see
    /// [`Model::quantize_base`]), quantized one matrix at a time as they are read: the f32 model is
    /// never in memory whole.
    pub fn load_as(path: &Path, quant: BaseQuant, device: &Device) -> Result<Self> {
        Self::from_checkpoint_as(Checkpoint::open(path)?, quant, device)
    }

    /// Builds the decoder of an opened checkpoint.
    pub fn from_checkpoint(checkpoint: Checkpoint, device: &Device) -> Result<Self> {
        Self::from_checkpoint_as(checkpoint, BaseQuant::None, device)
    }

    /// [`Model::from_checkpoint`] with the linear weights in `quant`'s format.
    pub fn from_checkpoint_as(
        checkpoint: Checkpoint,
        quant: BaseQuant,
        device: &Device,
    ) -> Result<Self> {
        let Checkpoint {
            path,
            config,
            tokenizer,
            weights,
        } = checkpoint;
        let llama = match &weights {
            Weights::Gguf(file) => load_llama_as(
                &GgufSource {
                    file,
                    config: &config,
                },
                &config,
                quant,
                device,
            )?,
            Weights::Hf(dir) => load_llama_as(dir, &config, quant, device)?,
        };
        if tokenizer.vocab_size() > llama.config.vocab_size {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                llama.config.vocab_size
            )));
        }
        let template = ChatTemplate::for_tokenizer(&tokenizer)?;
        Ok(Model {
            llama,
            tokenizer,
            template,
            source: path,
            adapter: None,
            attached: None,
            base_quant: quant,
            checkpoint: Arc::new(weights),
            decode: Arc::new(OnceLock::new()),
        })
    }

    /// The weights of the token-by-token decode path (quantized as stored), read on first use.
    pub fn decode_weights(&self) -> Result<&DecodeWeights> {
        if let Some(w) = self.decode.get() {
            return Ok(w);
        }
        let config = &self.llama.config;
        let gguf;
        let base: &dyn TensorSource = match self.checkpoint.as_ref() {
            Weights::Gguf(file) => {
                gguf = GgufSource { file, config };
                &gguf
            }
            Weights::Hf(dir) => dir,
        };
        let weights = match &self.adapter {
            Some(adapter) => DecodeWeights::load(
                &MergedSource {
                    base,
                    adapter,
                    config,
                },
                config,
            )?,
            None => DecodeWeights::load_as(base, config, self.base_quant)?,
        };
        Ok(self.decode.get_or_init(|| weights))
    }

    /// Merges a LoRA adapter into this model (Burn weights now, decode weights when next needed).
    /// A model holds at most one merged adapter; attach others with [`crate::lora::attach`].
    pub fn merge_adapter(mut self, adapter: Adapter) -> Result<Self> {
        if self.adapter.is_some() {
            return Err(ModelError::Adapter(
                "this model already has an adapter merged in".into(),
            ));
        }
        if self.base_quant != BaseQuant::None {
            return Err(ModelError::Adapter(format!(
                "an adapter cannot be merged into a {} base: attach it instead",
                self.base_quant
            )));
        }
        merge(&mut self.llama, &adapter)?;
        self.adapter = Some(adapter);
        self.decode = Arc::new(OnceLock::new());
        Ok(self)
    }

    /// A model that runs this base with `adapter` attached, unmerged: the base's weights (Burn tensors,
    /// memory-mapped checkpoint, decode weights) are shared, not copied; the adapter's factors are added
    /// on every adapted projection, in prefill and scoring and in decoding. One base in memory
    /// serves any number of adapters this way; each costs its factors (`r × (in + out)` f32 values per
    /// adapted projection, twice: once as Burn tensors, once as the adapter the decode path reads).
    pub fn attach_adapter(&self, adapter: Adapter) -> Result<Self> {
        if self.adapter.is_some() || self.attached.is_some() {
            return Err(ModelError::Adapter(
                "attach adapters to a base without one (this model already has an adapter)".into(),
            ));
        }
        let llama = attach(&self.llama, &adapter)?;
        Ok(Model {
            llama,
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
            source: self.source.clone(),
            adapter: None,
            attached: Some(Arc::new(adapter)),
            base_quant: self.base_quant,
            checkpoint: self.checkpoint.clone(),
            decode: self.decode.clone(),
        })
    }

    /// Holds the layers' linear weights in `quant`'s format (int8 or NF4, the formats QLoRA trains
    /// against, with the same codes) instead of f32: in the Burn model, dequantized one matrix at a time
    /// when a layer runs, and in the decode path, read by the kernels straight from the codes.
    /// Embeddings, norms and the LM head stay as loaded. Adapters are then attached (not merged) to
    /// the quantized base. For a base without an adapter.
    pub fn quantize_base(mut self, quant: BaseQuant) -> Result<Self> {
        if self.adapter.is_some() || self.attached.is_some() {
            return Err(ModelError::Adapter(
                "quantize the base before attaching an adapter to it".into(),
            ));
        }
        if quant == self.base_quant {
            return Ok(self);
        }
        if self.base_quant != BaseQuant::None {
            return Err(ModelError::Input(format!(
                "the base is already {}; load it again for {quant}",
                self.base_quant
            )));
        }
        self.llama.quantize_linears(quant)?;
        self.base_quant = quant;
        self.decode = Arc::new(OnceLock::new());
        Ok(self)
    }

    /// Loads the adapter folder `dir` (PEFT format) and merges it.
    pub fn load_adapter(self, dir: &Path) -> Result<Self> {
        let adapter = Adapter::load(dir, &self.llama.config)?;
        self.merge_adapter(adapter)
    }

    /// Renders messages with the chat template and tokenizes the result (no extra BOS: templates add
    /// their own markers).
    pub fn encode_chat<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.template.render(messages, add_generation_prompt)?;
        self.tokenizer.encode(&text, false)
    }
}
