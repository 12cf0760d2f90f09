//! Quantized weights and the kernels that read them, apart from any model: supportlm's counterpart of
//! candle's `quantized/` and mistral.rs's `mistralrs-quant`.
//!
//! What lives where:
//! - [`gguf`] reads (and, for F32, writes) GGUF files; [`ggml`] names the GGML block types and
//!   dequantizes them exactly as gguf-py does.
//! - [`nf4`] (NF4 + double quantization, byte-exact with bitsandbytes; code tables in [`nf4_tables`]) and
//!   [`int8`] (per-row int8): the frozen-base formats of (Q)LoRA training, named by [`BaseQuant`].
//! - [`kernels`]: matrix × few-vectors products straight from quantized rows (token-by-token decoding),
//!   one file per instruction set (`avx2.rs`, `avx512.rs`, `portable.rs`).
//! - [`gemm`]: dense f32 products on host buffers (faer's x86-64 kernels, else the `gemm` crate) for the
//!   CPU paths that bypass tensor ops: the training step and the prompt pass.
//! - [`pointwise`]: a vectorizable `exp` and row softmax for those same host paths.
//! - [`cpu`]: the one CPU-feature check every kernel of the workspace goes through (and the
//!   `SUPPORTLM_SIMD` cap), plus [`simd_fn!`] for loops compiled twice (AVX2 + FMA and plain).
//!
//! Not here: tensors of any framework (no Burn), model architectures, training. This is the crate the
//! dev profile builds at `opt-level = 3` (with the training crate, whose step loops are hot too).

pub mod cpu;
pub mod error;
pub mod format;
pub mod gemm;
pub mod ggml;
pub mod gguf;
pub mod int8;
pub mod kernels;
pub mod nf4;
pub mod nf4_tables;
pub mod pointwise;

pub use error::{QuantError, Result};
pub use format::BaseQuant;
pub use int8::Int8Matrix;
pub use nf4::{Absmax, Nf4Tensor};
