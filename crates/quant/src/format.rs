//! The storage formats of a frozen base's linear weights.

use std::fmt;
use std::str::FromStr;

use crate::error::QuantError;

/// How the frozen base's linear weights are stored (LoRA training, and serving an adapter on a
/// quantized base).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseQuant {
    /// f32 (plain LoRA).
    None,
    /// int8 with one scale per output row ([`crate::Int8Matrix`]).
    Int8,
    /// NF4 with double-quantized block scales (QLoRA, [`crate::Nf4Tensor`]).
    Nf4,
}

impl BaseQuant {
    /// Every format, smallest saving first.
    pub const ALL: [BaseQuant; 3] = [BaseQuant::None, BaseQuant::Int8, BaseQuant::Nf4];

    /// The name used in configs and on the command line.
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
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "f32" => Ok(BaseQuant::None),
            "int8" => Ok(BaseQuant::Int8),
            "nf4" => Ok(BaseQuant::Nf4),
            other => Err(QuantError::Input(format!(
                "unknown base quantization {other:?} (expected nf4, int8 or none)"
            ))),
        }
    }
}
