//! A base model's weight matrices, held in f32, int8 or NF4 (the formats are `supportlm_quant`'s;
//! QLoRA trains against the quantized ones, `supportlm serve --base-quant` serves from them) and
//! dequantized one matrix at a time when a layer runs.

use std::sync::Arc;

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{ModelError, Result};
use supportlm_quant::{BaseQuant, Int8Matrix, Nf4Tensor};

/// One `[rows, cols]` weight matrix (a linear layer's, `[out, in]`). Clones share the quantized
/// storage.
// A few hundred of these per model: the f32 variant's inline tensor handle costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// Kept as a tensor, ready to use.
    F32(Tensor<2>),
    /// Per-row int8, dequantized when the layer runs.
    Int8(Arc<Int8Matrix>),
    /// NF4 with double-quantized scales, dequantized when the layer runs.
    Nf4(Arc<Nf4Tensor>),
}

impl BaseWeight {
    /// Stores `values` (row-major `[rows, cols]`) in the format `quant` names.
    pub fn new(
        values: Vec<f32>,
        rows: usize,
        cols: usize,
        quant: BaseQuant,
        device: &Device,
    ) -> Self {
        match quant {
            BaseQuant::None => BaseWeight::F32(Tensor::from_data(
                TensorData::new(values, [rows, cols]),
                device,
            )),
            BaseQuant::Int8 => {
                BaseWeight::Int8(Arc::new(Int8Matrix::quantize(&values, rows, cols)))
            }
            BaseQuant::Nf4 => {
                BaseWeight::Nf4(Arc::new(Nf4Tensor::quantize(&values, &[rows, cols], true)))
            }
        }
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            BaseWeight::F32(t) => t.dims(),
            BaseWeight::Int8(m) => [m.rows, m.cols],
            BaseWeight::Nf4(t) => [t.shape[0], t.shape[1]],
        }
    }

    /// The weight as an f32 tensor; quantized formats are dequantized into a fresh buffer that lives
    /// only as long as the returned tensor.
    pub fn tensor(&self, device: &Device) -> Tensor<2> {
        let values = match self {
            BaseWeight::F32(t) => return t.clone(),
            BaseWeight::Int8(m) => m.dequantize(),
            BaseWeight::Nf4(t) => t.dequantize(),
        };
        Tensor::from_data(TensorData::new(values, self.dims()), device)
    }

    /// The values of an f32 weight read in place: `Some` when the weight is kept in f32 in host memory
    /// (the CPU backend) as one contiguous row-major block, `None` otherwise (quantized formats, other
    /// backends): then [`BaseWeight::dequantize_into`] is the way to the values.
    pub fn host_f32(&self) -> Option<HostF32> {
        let BaseWeight::F32(t) = self else {
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
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        let len: usize = self.dims().iter().product();
        if out.len() != len {
            return Err(ModelError::Internal(format!(
                "a buffer of {} values cannot hold a {:?} weight",
                out.len(),
                self.dims()
            )));
        }
        match self {
            BaseWeight::F32(t) => {
                let values = t.clone().try_into_vec_as::<f32>().map_err(|e| {
                    ModelError::Internal(format!("reading a weight back from the backend: {e:?}"))
                })?;
                out.copy_from_slice(&values)
            }
            BaseWeight::Int8(m) => m.dequantize_into(out),
            BaseWeight::Nf4(t) => t.dequantize_into(out),
        }
        Ok(())
    }

    /// Bytes this weight keeps resident.
    pub fn resident_bytes(&self) -> usize {
        match self {
            BaseWeight::F32(t) => 4 * t.dims().iter().product::<usize>(),
            BaseWeight::Int8(m) => m.resident_bytes(),
            BaseWeight::Nf4(t) => t.resident_bytes(),
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
        let f32_weight = BaseWeight::new(values.clone(), 6, 64, BaseQuant::None, &device);
        let view = f32_weight
            .host_f32()
            .expect("an f32 weight on the CPU backend");
        assert_eq!(view.values(), values.as_slice());
        // The view is the tensor's own storage, not a copy.
        let BaseWeight::F32(t) = &f32_weight else {
            unreachable!()
        };
        let storage = t.clone().try_into_primitive::<Flex>().unwrap();
        assert_eq!(
            view.values().as_ptr(),
            storage.as_slice::<f32>().unwrap().as_ptr()
        );
        for quant in [BaseQuant::Int8, BaseQuant::Nf4] {
            let weight = BaseWeight::new(values.clone(), 6, 64, quant, &device);
            assert!(weight.host_f32().is_none(), "{quant}");
        }
    }
}
