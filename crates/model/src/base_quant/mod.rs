//! The frozen base of LoRA training, held in f32, int8 or NF4 (QLoRA), and dequantized one matrix at a
//! time when a layer runs.
//!
//! - [`nf4`]: NF4 and double quantization in bitsandbytes' byte layout; [`int8`]: per-row int8.
//! - [`tables`]: bitsandbytes' code values.
//! - [`FrozenWeight`]: one weight matrix in the chosen format; [`BaseQuant`] names the format.

pub mod int8;
pub mod nf4;
pub mod tables;

use std::fmt;
use std::str::FromStr;

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{Device, Tensor, TensorData};

pub use int8::Int8Matrix;
pub use nf4::{Absmax, Nf4Tensor};

use crate::error::ModelError;
use crate::llama::to_vec;

/// How the frozen base's linear weights are stored during LoRA training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseQuant {
    /// f32 (plain LoRA).
    None,
    /// int8 with one scale per output row.
    Int8,
    /// NF4 with double-quantized block scales (QLoRA).
    Nf4,
}

impl BaseQuant {
    pub const ALL: [BaseQuant; 3] = [BaseQuant::None, BaseQuant::Int8, BaseQuant::Nf4];

    pub fn as_str(self) -> &'static str {
        match self {
            BaseQuant::None => "none",
            BaseQuant::Int8 => "int8",
            BaseQuant::Nf4 => "nf4",
        }
    }
}

impl fmt::Display for BaseQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BaseQuant {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "f32" => Ok(BaseQuant::None),
            "int8" => Ok(BaseQuant::Int8),
            "nf4" => Ok(BaseQuant::Nf4),
            other => Err(ModelError::Input(format!(
                "unknown base quantization {other:?} (expected nf4, int8 or none)"
            ))),
        }
    }
}

/// One frozen `[rows, cols]` weight matrix.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// Kept as a tensor, ready to use.
    F32(Tensor<2>),
    Int8(Int8Matrix),
    Nf4(Nf4Tensor),
}

impl FrozenWeight {
    /// Stores `values` (row-major `[rows, cols]`) in the format `quant` names.
    pub fn new(
        values: Vec<f32>,
        rows: usize,
        cols: usize,
        quant: BaseQuant,
        device: &Device,
    ) -> Self {
        match quant {
            BaseQuant::None => FrozenWeight::F32(Tensor::from_data(
                TensorData::new(values, [rows, cols]),
                device,
            )),
            BaseQuant::Int8 => FrozenWeight::Int8(Int8Matrix::quantize(&values, rows, cols)),
            BaseQuant::Nf4 => FrozenWeight::Nf4(Nf4Tensor::quantize(&values, &[rows, cols], true)),
        }
    }

    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenWeight::F32(t) => t.dims(),
            FrozenWeight::Int8(m) => [m.rows, m.cols],
            FrozenWeight::Nf4(t) => [t.shape[0], t.shape[1]],
        }
    }

    /// The weight as an f32 tensor; quantized formats are dequantized into a fresh buffer that lives
    /// only as long as the returned tensor.
    pub fn tensor(&self, device: &Device) -> Tensor<2> {
        let values = match self {
            FrozenWeight::F32(t) => return t.clone(),
            FrozenWeight::Int8(m) => m.dequantize(),
            FrozenWeight::Nf4(t) => t.dequantize(),
        };
        Tensor::from_data(TensorData::new(values, self.dims()), device)
    }

    /// The values of an f32 weight read in place: `Some` when the weight is kept in f32 in host memory
    /// (the CPU backend) as one contiguous row-major block, `None` otherwise (quantized formats, other
    /// backends): then [`FrozenWeight::dequantize_into`] is the way to the values.
    pub fn host_f32(&self) -> Option<HostF32> {
        let FrozenWeight::F32(t) = self else {
            return None;
        };
        let tensor = t.clone().try_into_primitive::<Flex>().ok()?;
        let (start, end) = tensor.layout().contiguous_offsets()?;
        (tensor.dtype() == burn::tensor::DType::F32).then_some(HostF32 {
            tensor,
            range: start..end,
        })
    }

    /// The weight as f32 values, row-major, into `out` (exactly its size).
    pub fn dequantize_into(&self, out: &mut [f32]) -> crate::error::Result<()> {
        let len: usize = self.dims().iter().product();
        if out.len() != len {
            return Err(crate::error::ModelError::Input(format!(
                "a buffer of {} values cannot hold a {:?} weight",
                out.len(),
                self.dims()
            )));
        }
        match self {
            FrozenWeight::F32(t) => out.copy_from_slice(&to_vec(t.clone())?),
            FrozenWeight::Int8(m) => m.dequantize_into(out),
            FrozenWeight::Nf4(t) => t.dequantize_into(out),
        }
        Ok(())
    }

    /// Bytes this weight keeps resident.
    pub fn resident_bytes(&self) -> usize {
        match self {
            FrozenWeight::F32(t) => 4 * t.dims().iter().product::<usize>(),
            FrozenWeight::Int8(m) => m.resident_bytes(),
            FrozenWeight::Nf4(t) => t.resident_bytes(),
        }
    }
}

/// An f32 weight's values in the CPU backend's own storage (shared with the weight's tensor: holding
/// this keeps them alive, no copy).
#[derive(Debug, Clone)]
pub struct HostF32 {
    tensor: FlexTensor,
    /// Where the values lie in the tensor's storage (checked contiguous f32 when made).
    range: std::ops::Range<usize>,
}

impl HostF32 {
    /// Row-major values.
    pub fn values(&self) -> &[f32] {
        &self.tensor.storage::<f32>()[self.range.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_weights_are_read_in_place_and_quantized_ones_are_not() {
        let device = Device::default();
        let values: Vec<f32> = (0..6 * 64).map(|i| (i as f32 - 100.0) / 37.0).collect();
        let f32_weight = FrozenWeight::new(values.clone(), 6, 64, BaseQuant::None, &device);
        let view = f32_weight
            .host_f32()
            .expect("an f32 weight on the CPU backend");
        assert_eq!(view.values(), values.as_slice());
        // The view is the tensor's own storage, not a copy.
        let FrozenWeight::F32(t) = &f32_weight else {
            unreachable!()
        };
        let storage = t.clone().try_into_primitive::<Flex>().unwrap();
        assert_eq!(
            view.values().as_ptr(),
            storage.as_slice::<f32>().unwrap().as_ptr()
        );
        for quant in [BaseQuant::Int8, BaseQuant::Nf4] {
            let weight = FrozenWeight::new(values.clone(), 6, 64, quant, &device);
            assert!(weight.host_f32().is_none(), "{quant}");
        }
    }
}
