//! Every checkpoint tensor name, in one place: the Hugging Face names of a llama/qwen2 decoder, their
//! GGUF spellings, the PEFT names of LoRA factors and the projections LoRA can target.
//!
//! Code elsewhere builds names through these functions (`names::layer(i).proj(Target::QProj).weight()`
//! in the style of candle-nn's `VarBuilder::pp`); a test over the workspace's sources fails when a
//! name is spelled anywhere else (`tests/names_in_one_place.rs`).

use std::fmt;

/// The token embedding table, `[vocab, hidden]`.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The final RMSNorm's weight, `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The LM head, `[vocab, hidden]` (absent when tied to the embeddings).
pub const LM_HEAD: &str = "lm_head.weight";
/// The prefix of every decoder layer's tensors.
const LAYERS: &str = "model.layers";
/// What PEFT puts before a base model's tensor name in an adapter file.
const PEFT_PREFIX: &str = "base_model.model.";

/// A linear projection of a decoder layer (and a possible LoRA target).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Attention query.
    QProj,
    /// Attention key.
    KProj,
    /// Attention value.
    VProj,
    /// Attention output.
    OProj,
    /// SwiGLU gate.
    GateProj,
    /// SwiGLU up.
    UpProj,
    /// SwiGLU down.
    DownProj,
}

impl Target {
    /// Every projection, in the order of a layer's forward pass.
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    /// The module name (`q_proj`, …), as PEFT's `target_modules` lists it.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// Whether the projection belongs to the attention block (else the MLP).
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            Target::QProj | Target::KProj | Target::VProj | Target::OProj
        )
    }

    /// The path inside a decoder layer (`self_attn.q_proj`, `mlp.gate_proj`, …).
    pub fn module_path(self) -> String {
        let block = if self.is_attention() {
            "self_attn"
        } else {
            "mlp"
        };
        format!("{block}.{}", self.as_str())
    }

    /// The GGUF name of the projection inside a block (`attn_q`, `ffn_gate`, …).
    fn gguf(self) -> &'static str {
        match self {
            Target::QProj => "attn_q",
            Target::KProj => "attn_k",
            Target::VProj => "attn_v",
            Target::OProj => "attn_output",
            Target::GateProj => "ffn_gate",
            Target::UpProj => "ffn_up",
            Target::DownProj => "ffn_down",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The names of decoder layer `i`'s tensors.
pub fn layer(i: usize) -> LayerNames {
    LayerNames(format!("{LAYERS}.{i}"))
}

/// A decoder layer's name prefix (`model.layers.{i}`); see [`layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerNames(String);

impl LayerNames {
    /// The RMSNorm before attention.
    pub fn input_norm(&self) -> String {
        format!("{}.input_layernorm.weight", self.0)
    }

    /// The RMSNorm before the MLP.
    pub fn post_attention_norm(&self) -> String {
        format!("{}.post_attention_layernorm.weight", self.0)
    }

    /// One projection of the layer.
    pub fn proj(&self, t: Target) -> ProjNames {
        ProjNames(format!("{}.{}", self.0, t.module_path()))
    }
}

/// A projection's module path (`model.layers.{i}.self_attn.q_proj`); see [`LayerNames::proj`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjNames(String);

impl ProjNames {
    /// The weight, `[out, in]`.
    pub fn weight(&self) -> String {
        format!("{}.weight", self.0)
    }

    /// The bias, `[out]` (qwen2's q/k/v).
    pub fn bias(&self) -> String {
        format!("{}.bias", self.0)
    }

    /// The module path itself.
    pub fn path(&self) -> &str {
        &self.0
    }
}

/// A LoRA factor: `A` (`[r, in]`) or `B` (`[out, r]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// `lora_A`, `[r, in]`.
    A,
    /// `lora_B`, `[out, r]`.
    B,
}

/// The PEFT name of a LoRA factor in `adapter_model.safetensors`
/// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`).
pub fn peft(layer_index: usize, target: Target, factor: Factor) -> String {
    let which = match factor {
        Factor::A => 'A',
        Factor::B => 'B',
    };
    format!(
        "{PEFT_PREFIX}{}.lora_{which}.weight",
        layer(layer_index).proj(target).path()
    )
}

/// The GGUF name of a Hugging Face llama/qwen2 tensor name (names it does not know are returned as
/// they are).
pub fn gguf(hf_name: &str) -> String {
    let top = [
        (EMBED_TOKENS, "token_embd.weight"),
        (FINAL_NORM, "output_norm.weight"),
        (LM_HEAD, "output.weight"),
    ];
    if let Some((_, g)) = top.iter().find(|(h, _)| *h == hf_name) {
        return g.to_string();
    }
    let Some(rest) = hf_name
        .strip_prefix(LAYERS)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return hf_name.to_string();
    };
    let Some((index, field)) = rest.split_once('.') else {
        return hf_name.to_string();
    };
    let norms = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ];
    let projs = Target::ALL.map(|t| (t.module_path(), t.gguf()));
    let pairs = norms.iter().map(|&(h, g)| (h.to_string(), g)).chain(projs);
    for (h, g) in pairs {
        if let Some(suffix) = field.strip_prefix(h.as_str()) {
            return format!("blk.{index}.{g}{suffix}");
        }
    }
    hf_name.to_string()
}

/// The `(layer, projection)` whose weight a Hugging Face name is (`model.layers.3.mlp.up_proj.weight` →
/// `(3, UpProj)`); `None` for any other tensor (biases and norms included).
pub fn parse_proj_weight(hf_name: &str) -> Option<(usize, Target)> {
    let rest = hf_name.strip_prefix(LAYERS)?.strip_prefix('.')?;
    let (index, field) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let module = field.strip_suffix(".weight")?;
    let target = Target::ALL
        .into_iter()
        .find(|t| t.module_path() == module)?;
    Some((index, target))
}

/// The projection a GGUF tensor name belongs to (`blk.3.attn_q.weight` → `QProj`), if any.
pub fn gguf_target(gguf_name: &str) -> Option<Target> {
    let mut parts = gguf_name.split('.');
    let (Some("blk"), Some(_), Some(module)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    Target::ALL.into_iter().find(|t| t.gguf() == module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_gguf_names() {
        assert_eq!(gguf(EMBED_TOKENS), "token_embd.weight");
        assert_eq!(gguf(LM_HEAD), "output.weight");
        assert_eq!(
            gguf(&layer(3).proj(Target::QProj).bias()),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            gguf(&layer(12).proj(Target::DownProj).weight()),
            "blk.12.ffn_down.weight"
        );
        assert_eq!(
            gguf(&layer(0).post_attention_norm()),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(gguf("unknown.tensor"), "unknown.tensor");
        assert_eq!(gguf_target("blk.7.attn_k.weight"), Some(Target::KProj));
        assert_eq!(gguf_target("blk.7.attn_norm.weight"), None);
        assert_eq!(
            parse_proj_weight(&layer(3).proj(Target::UpProj).weight()),
            Some((3, Target::UpProj))
        );
        assert_eq!(
            parse_proj_weight(&layer(3).proj(Target::QProj).bias()),
            None
        );
        assert_eq!(parse_proj_weight(&layer(3).input_norm()), None);
    }

    #[test]
    fn layer_and_peft_names_have_the_checkpoint_spelling() {
        let l = layer(5);
        assert_eq!(l.input_norm(), "model.layers.5.input_layernorm.weight");
        assert_eq!(
            l.proj(Target::GateProj).weight(),
            "model.layers.5.mlp.gate_proj.weight"
        );
        assert_eq!(
            peft(5, Target::VProj, Factor::B),
            "base_model.model.model.layers.5.self_attn.v_proj.lora_B.weight"
        );
    }
}
