//! Zero-shot and few-shot prompts, split into the token prefix every item shares (system prompt and
//! few-shot turns) and each item's own tokens (its user turn and the assistant header).
//!
//! The split falls on a chat-template boundary (after an end-of-turn), so tokenizing the two parts
//! separately gives the same ids as tokenizing the whole prompt; [`encode_prompts`] checks this on
//! the first item.

use supportlm_data::{Record, Task};
use supportlm_model::chat::ChatTemplate;
use supportlm_model::tokenizer::Tokenizer;

use crate::error::{PromptError, Result};

/// A shared prefix and per-item suffixes, as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    /// The tokens every item shares (system prompt and examples).
    pub prefix: Vec<u32>,
    /// Each item's own tokens after the prefix.
    pub items: Vec<Vec<u32>>,
    /// The rendered text of the first full prompt (for logs and reports).
    pub example_text: String,
}

/// Encodes the prompt of every record: the task's system prompt, `examples` as earlier turns, then the
/// record's message and the assistant header.
pub fn encode_prompts(
    task: Task,
    examples: &[Record],
    records: &[Record],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Prompts> {
    let mut prefix_text: Option<String> = None;
    let mut prefix = Vec::new();
    let mut items = Vec::with_capacity(records.len());
    let mut example_text = String::new();
    for (i, r) in records.iter().enumerate() {
        let conv = task
            .conversation(examples, r, false)
            .ok_or_else(|| PromptError::Prompt("a few-shot example has no answer".into()))?;
        let full = template.render(&conv.messages, true)?;
        if prefix_text.is_none() {
            let head = template.render(&conv.messages[..conv.messages.len() - 1], false)?;
            if !full.starts_with(&head) {
                return Err(PromptError::Prompt(
                    "the chat template renders the shared part differently per item".into(),
                ));
            }
            prefix = tokenizer.encode(&head, false)?;
            prefix_text = Some(head);
            example_text = full.clone();
        }
        let head = prefix_text.as_deref().unwrap_or_default();
        let rest = full.strip_prefix(head).ok_or_else(|| {
            PromptError::Prompt("an item's prompt does not start with the shared prefix".into())
        })?;
        let item = tokenizer.encode(rest, false)?;
        if i == 0 {
            let whole = tokenizer.encode(&full, false)?;
            let joined: Vec<u32> = prefix.iter().chain(&item).copied().collect();
            if whole != joined {
                return Err(PromptError::Prompt(
                    "tokenizing the shared prefix and the item separately changes the ids".into(),
                ));
            }
        }
        items.push(item);
    }
    Ok(Prompts {
        prefix,
        items,
        example_text,
    })
}

/// The token ids of each label as a complete answer: the label followed by the end-of-turn token
/// (so that a label that is a prefix of another is not favoured).
pub fn label_candidates(labels: &[&str], tokenizer: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    let end = tokenizer.eos_ids.first().copied();
    labels
        .iter()
        .map(|l| {
            let mut ids = tokenizer.encode(l, false)?;
            ids.extend(end);
            Ok(ids)
        })
        .collect()
}
