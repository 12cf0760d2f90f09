//! A base model's weight matrices, held in f32, int8 or NF4 (the formats are `supportlm_quant`'s;
//! QLoRA trains against the quantized ones, `supportlm serve --base-quant` serves from them) and
//! dequantized one matrix at a time when a layer runs: on the CPU by the host kernels, on a GPU device
//! by tensor ops over codes packed into 32-bit words there ([`PackedWeight`]).

use std::sync::Arc;

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use supportlm_quant::nf4::{nf4_code, NF4_BLOCK};
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
    /// Int8 or NF4 codes resident on a device other than the CPU, dequantized there.
    Packed(Arc<PackedWeight>),
}

impl BaseWeight {
    /// Stores `values` (row-major `[rows, cols]`) in the format `quant` names: quantized formats in host
    /// memory on the CPU, packed on the device elsewhere.
    pub fn new(
        values: Vec<f32>,
        rows: usize,
        cols: usize,
        quant: BaseQuant,
        device: &Device,
    ) -> Self {
        if quant != BaseQuant::None && !crate::device::is_cpu(device) {
            let host = BaseWeight::new(values, rows, cols, quant, &Device::flex());
            return BaseWeight::Packed(Arc::new(PackedWeight::upload(&host, device)));
        }
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
            BaseWeight::Packed(p) => p.dims,
        }
    }

    /// The weight as an f32 tensor; quantized formats are dequantized into a fresh buffer that lives
    /// only as long as the returned tensor.
    pub fn tensor(&self, device: &Device) -> Tensor<2> {
        let values = match self {
            BaseWeight::F32(t) => return t.clone(),
            BaseWeight::Packed(p) => return p.dequantize(),
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
        HostF32::of(t)
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
            BaseWeight::F32(_) | BaseWeight::Packed(_) => {
                let values = self
                    .tensor(&Device::flex())
                    .try_into_vec_as::<f32>()
                    .map_err(|e| {
                        ModelError::Internal(format!(
                            "reading a weight back from the backend: {e:?}"
                        ))
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
            BaseWeight::Packed(p) => p.resident_bytes(),
        }
    }
}

/// Int8 or NF4 codes on a device, packed into 32-bit words (four int8 or eight NF4 codes each, the
/// first value in the highest bits), with their scales, dequantized there by tensor ops when the layer
/// runs, so a GPU neither holds f32 copies nor fetches weights from the host per step. The values are
/// the host formats' exactly: the same code times the same scale, one f32 rounding.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    format: BaseQuant,
    dims: [usize; 2],
    words: Tensor<1, Int>,
    /// int8: each row's `absmax / 127`; NF4: each 64-value block's absmax (double quantization undone
    /// when uploaded: 32 bits per block instead of 8 + 32/256).
    scales: Tensor<1>,
    /// NF4's 16 code values (`None` for int8).
    code: Option<Tensor<1>>,
}

impl PackedWeight {
    /// Packs a host int8 or NF4 weight onto `device`.
    fn upload(host: &BaseWeight, device: &Device) -> Self {
        let dims = host.dims();
        let words = |w: Vec<i32>| {
            let n = w.len();
            Tensor::<1, Int>::from_data(TensorData::new(w, [n]), device)
        };
        let floats = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<1>::from_data(TensorData::new(v, [n]), device)
        };
        match host {
            BaseWeight::Int8(m) => PackedWeight {
                format: BaseQuant::Int8,
                dims,
                words: words(pack(m.codes.iter().map(|&q| q as u8 as u32), 8)),
                scales: floats(m.absmax.iter().map(|&a| a / 127.0).collect()),
                code: None,
            },
            BaseWeight::Nf4(t) => {
                // Codes of the last, partial block padded to a whole block.
                let blocks = t.len().div_ceil(NF4_BLOCK);
                let nibbles = t
                    .packed
                    .iter()
                    .flat_map(|&b| [u32::from(b >> 4), u32::from(b & 15)])
                    .chain(std::iter::repeat(0))
                    .take(blocks * NF4_BLOCK);
                PackedWeight {
                    format: BaseQuant::Nf4,
                    dims,
                    words: words(pack(nibbles, 4)),
                    scales: floats(t.absmax.values()),
                    code: Some(floats(nf4_code().to_vec())),
                }
            }
            BaseWeight::F32(_) | BaseWeight::Packed(_) => {
                unreachable!("only host int8 and NF4 weights are packed")
            }
        }
    }

    /// The weight as an f32 tensor on its device.
    fn dequantize(&self) -> Tensor<2> {
        let [rows, cols] = self.dims;
        let bits = if self.format == BaseQuant::Nf4 { 4 } else { 8 };
        let per_word = 32 / bits;
        let mask = (1i64 << bits) - 1;
        // Value k of each word: shifted down, masked (arithmetic shifts of negative words are undone
        // by the mask, whatever the backend's integer width).
        let parts: Vec<Tensor<1, Int>> = (0..per_word)
            .map(|k| {
                self.words
                    .clone()
                    .bitwise_right_shift_scalar((32 - bits * (k + 1)) as i64)
                    .bitwise_and_scalar(mask)
            })
            .collect();
        let n_words = self.words.dims()[0];
        let codes = Tensor::stack::<2>(parts, 1).reshape([n_words * per_word]);
        let values = match &self.code {
            Some(code) => {
                let blocks = self.scales.dims()[0];
                let values = code.clone().select(0, codes).reshape([blocks, NF4_BLOCK])
                    * self.scales.clone().reshape([blocks, 1]);
                values
                    .reshape([blocks * NF4_BLOCK])
                    .narrow(0, 0, rows * cols)
            }
            None => {
                // Bytes back to signed values: b - 256 when b >= 128.
                let signed = codes.clone() - codes.bitwise_right_shift_scalar(7).mul_scalar(256);
                let values = signed
                    .narrow(0, 0, rows * cols)
                    .float()
                    .reshape([rows, cols])
                    * self.scales.clone().reshape([rows, 1]);
                values.reshape([rows * cols])
            }
        };
        values.reshape([rows, cols])
    }

    /// Bytes resident on the device.
    fn resident_bytes(&self) -> usize {
        4 * (self.words.dims()[0]
            + self.scales.dims()[0]
            + self.code.as_ref().map_or(0, |c| c.dims()[0]))
    }
}

/// `values` of `bits` bits each (8 or 4), packed into 32-bit words first value highest, the last word
/// padded with zeros.
fn pack(values: impl Iterator<Item = u32>, bits: usize) -> Vec<i32> {
    let per_word = 32 / bits;
    let mut words = Vec::new();
    let (mut word, mut filled) = (0u32, 0);
    for v in values {
        word |= v << (32 - bits * (filled + 1));
        filled += 1;
        if filled == per_word {
            words.push(word as i32);
            (word, filled) = (0, 0);
        }
    }
    if filled > 0 {
        words.push(word as i32);
    }
    words
}

/// An f32 tensor's values in the CPU backend's own storage (shared with the weight's tensor: holding
/// this keeps them alive, no copy).
#[derive(Debug, Clone)]
pub struct HostF32 {
    tensor: FlexTensor,
    /// Where the values lie in the tensor's storage (checked contiguous f32 when made).
    range: std::ops::Range<usize>,
}

impl HostF32 {
    /// The values of `t` in place: `Some` when it lies in the CPU backend's storage as one contiguous
    /// row-major block of f32, `None` otherwise.
    pub fn of<const D: usize>(t: &Tensor<D>) -> Option<HostF32> {
        let tensor = t.clone().try_into_primitive::<Flex>().ok()?;
        let (start, end) = tensor.layout().contiguous_offsets()?;
        (tensor.dtype() == burn::tensor::DType::F32).then_some(HostF32 {
            tensor,
            range: start..end,
        })
    }

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
        let device = Device::flex();
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

    /// The packed form dequantizes to the host formats' values exactly; checked here on the CPU backend
    /// (whose integers are 64-bit: the masks must undo sign extension there too).
    #[test]
    fn packed_codes_dequantize_to_the_host_values() {
        let device = Device::flex();
        // 5 × 70: NF4 ends in a partial block, int8 in a partial word.
        let values: Vec<f32> = (0..5 * 70)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        for quant in [BaseQuant::Int8, BaseQuant::Nf4] {
            let host = BaseWeight::new(values.clone(), 5, 70, quant, &device);
            let packed = PackedWeight::upload(&host, &device);
            let mut expected = vec![0f32; 5 * 70];
            host.dequantize_into(&mut expected).unwrap();
            let got = packed.dequantize().try_into_vec_as::<f32>().unwrap();
            assert_eq!(got, expected, "{quant}");
        }
    }
}
