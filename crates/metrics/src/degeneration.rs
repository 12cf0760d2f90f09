//! Degenerate generations: empty text, repetition loops, and text that leaks the prompt or the chat
//! template.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// What is wrong with one generated text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Degeneration {
    /// Nothing but whitespace.
    pub empty: bool,
    /// A loop: a word 4-gram occurs at least [`LOOP_REPEATS`] times, or one line at least 3 times.
    pub repetition: bool,
    /// Contains one of the markers (template tokens, the system prompt, prompt scaffolding).
    pub leak: bool,
}

impl Degeneration {
    /// Whether any check fired.
    pub fn any(&self) -> bool {
        self.empty || self.repetition || self.leak
    }
}

/// Occurrences of one word 4-gram that count as a loop.
pub const LOOP_REPEATS: usize = 4;

/// Checks `text` against the three kinds of degeneration; `leak_markers` are case-sensitive
/// substrings that must not appear in a response.
pub fn check(text: &str, leak_markers: &[&str]) -> Degeneration {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let mut grams: HashMap<&[String], usize> = HashMap::new();
    for g in words.windows(4) {
        *grams.entry(g).or_insert(0) += 1;
    }
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for l in text.lines().map(str::trim).filter(|l| l.len() >= 8) {
        *lines.entry(l).or_insert(0) += 1;
    }
    Degeneration {
        empty: text.trim().is_empty(),
        repetition: grams.values().any(|&c| c >= LOOP_REPEATS) || lines.values().any(|&c| c >= 3),
        leak: leak_markers
            .iter()
            .any(|m| !m.is_empty() && text.contains(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_kind() {
        let ok =
            "I'm sorry to hear that. Please share your order number and I will check it for you.";
        assert!(!check(ok, &["<|im_end|>"]).any());
        assert!(check("  \n ", &[]).empty);
        let looping = "please contact us ".repeat(5);
        assert!(check(&looping, &[]).repetition);
        let lines =
            "Thank you for reaching out!\nThank you for reaching out!\nThank you for reaching out!";
        assert!(check(lines, &[]).repetition);
        assert!(check("Sure.<|im_end|> user", &["<|im_end|>"]).leak);
        assert!(check("Customer message: cancel", &["Customer message:"]).leak);
        // Bitext responses repeat a placeholder now and then; twice is not a loop.
        let twice =
            "your order {{Order Number}} is on its way; track {{Order Number}} in your account";
        assert!(!check(twice, &[]).repetition);
    }
}
