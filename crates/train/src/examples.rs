//! Records → training sequences: the task's conversation rendered with the model's chat template, the
//! loss on the assistant turn only (its text and its end-of-turn token).

use crate::qlora::Sequence;
use supportlm_data::{Record, Task};
use supportlm_model::chat::ChatTemplate;
use supportlm_model::tokenizer::Tokenizer;

use crate::error::{Result, TrainError};

/// Encoded examples and what happened on the way.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    /// The encoded examples, in record order.
    pub sequences: Vec<Sequence>,
    /// Examples whose answer was cut at `max_len`.
    pub truncated: usize,
    /// Examples dropped: no answer known, or the prompt alone reaches `max_len`.
    pub skipped: usize,
}

/// Encodes one record as an SFT example (`None` when it cannot be one; `bool`: truncated).
pub fn encode(
    task: Task,
    record: &Record,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<Option<(Sequence, bool)>> {
    let Some(with) = task.conversation(&[], record, true) else {
        return Ok(None);
    };
    let without = task
        .conversation(&[], record, false)
        .ok_or_else(|| TrainError::Examples("conversation without answer".into()))?;
    let prompt_text = template.render(&without.messages, true)?;
    let full_text = template.render(&with.messages, false)?;
    let answer_text = full_text
        .strip_prefix(prompt_text.as_str())
        .ok_or_else(|| {
            TrainError::Examples(
                "the chat template renders the prompt differently with and without the answer"
                    .into(),
            )
        })?;
    let prompt = tokenizer.encode(&prompt_text, false)?;
    let answer = tokenizer.encode(answer_text, false)?;
    // The loss covers the answer up to and including its end-of-turn token, not what follows it.
    let end = answer
        .iter()
        .position(|t| tokenizer.eos_ids.contains(t))
        .map_or(answer.len(), |i| i + 1);
    if prompt.len() + 1 >= max_len {
        return Ok(None);
    }
    let mut ids = prompt.clone();
    ids.extend_from_slice(&answer);
    let mut loss_mask = vec![false; prompt.len()];
    loss_mask.extend((0..answer.len()).map(|i| i < end));
    let truncated = ids.len() > max_len && end + prompt.len() > max_len;
    ids.truncate(max_len);
    loss_mask.truncate(max_len);
    Ok(Some((Sequence { ids, loss_mask }, truncated)))
}

/// Encodes every record.
pub fn encode_all(
    task: Task,
    records: &[Record],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<Encoded> {
    let mut out = Encoded::default();
    for r in records {
        match encode(task, r, tokenizer, template, max_len)? {
            Some((seq, truncated)) => {
                out.truncated += usize::from(truncated);
                out.sequences.push(seq);
            }
            None => out.skipped += 1,
        }
    }
    Ok(out)
}
