//! Training-time rewrites of customer messages that take Bitext's template marks off the surface form:
//! its placeholders (`{{Order Number}}`, `{{Person Name}}`, …) replaced by realistic values, noise of
//! the kind real customers type (typos, no capitals, dropped punctuation, run-together words), and
//! the sentences real messages wrap a request in (a greeting, some context, a thank-you).
//! Labels are never touched; every choice comes from a seed, so the same config gives the same text.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::load::Record;

/// What to rewrite (all off by default: the messages as Bitext has them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Replace every `{{…}}` placeholder with a realistic value of its kind.
    pub placeholders: bool,
    /// Share of messages given noise (0 to 1): one to three of typos, lower case, no punctuation, a
    /// missing space.
    pub noise: f64,
    /// Share of messages wrapped in a label-neutral opening and/or closing sentence (0 to 1), so a
    /// request is not always the whole message.
    pub compose: f64,
}

impl AugmentConfig {
    /// Whether nothing is rewritten.
    pub fn is_off(&self) -> bool {
        !self.placeholders && self.noise <= 0.0 && self.compose <= 0.0
    }

    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [("noise", self.noise), ("compose", self.compose)] {
            if !(0.0..=1.0).contains(&v) || v.is_nan() {
                return Err(format!("augment.{name} must be between 0 and 1, not {v}"));
            }
        }
        Ok(())
    }
}

/// Realistic values for each Bitext placeholder (any other `{{…}}` gets a generic reference).
fn values(kind: &str) -> &'static [&'static str] {
    match kind {
        "Order Number" => &[
            "48213",
            "#1029384",
            "ORD-55710",
            "A7731902",
            "order 30917",
            "#88-4410",
            "2024-61277",
            "KX993021",
        ],
        "Invoice Number" => &["INV-2031", "#INV88412", "2024/0193", "F-10277", "77120"],
        "Account Type" | "Account Category" => &[
            "premium", "gold", "business", "free", "standard", "platinum", "family", "student",
            "pro", "basic",
        ],
        "Person Name" => &[
            "Maria",
            "John Smith",
            "Aisha",
            "Tom",
            "Chen Wei",
            "Olga Petrova",
            "Sam",
            "Priya",
            "Lucas",
            "Fatima",
        ],
        "Refund Amount" => &["35.20", "120", "9.99", "249.00", "18.50", "60", "1,050"],
        "Currency Symbol" => &["$", "£", "€", "USD ", "EUR "],
        "Delivery City" => &[
            "Leeds",
            "Austin",
            "Lyon",
            "Toronto",
            "Melbourne",
            "Dublin",
            "Porto",
            "Denver",
        ],
        "Delivery Country" => &[
            "Canada",
            "Germany",
            "Ireland",
            "Spain",
            "Australia",
            "Mexico",
            "Poland",
            "Japan",
        ],
        _ => &["it", "this one", "the one I mentioned"],
    }
}

/// `text` with every `{{Kind}}` replaced by a value of that kind.
fn fill_placeholders(text: &str, rng: &mut ChaCha8Rng) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let kind = rest[start + 2..start + 2 + len].trim();
        out.push_str(values(kind).choose(rng).copied().unwrap_or("it"));
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    out
}

/// One typo in a random word of 4+ letters: two neighbouring letters swapped, one dropped, or one
/// doubled.
fn typo(text: &str, rng: &mut ChaCha8Rng) -> String {
    let words: Vec<(usize, &str)> = text
        .split(' ')
        .scan(0, |at, w| {
            let start = *at;
            *at += w.len() + 1;
            Some((start, w))
        })
        .filter(|(_, w)| w.chars().filter(|c| c.is_alphabetic()).count() >= 4 && w.is_ascii())
        .collect();
    let Some(&(start, word)) = words.choose(rng) else {
        return text.to_string();
    };
    let mut chars: Vec<char> = word.chars().collect();
    let i = rng.random_range(1..chars.len() - 1);
    match rng.random_range(0..3) {
        0 => chars.swap(i, i + 1),
        1 => {
            chars.remove(i);
        }
        _ => chars.insert(i, chars[i]),
    }
    let new: String = chars.into_iter().collect();
    format!("{}{}{}", &text[..start], new, &text[start + word.len()..])
}

/// Openings that say nothing about what the customer wants.
const OPENINGS: [&str; 10] = [
    "Hi there.",
    "Hello,",
    "Good morning.",
    "Hey, quick question.",
    "Hope you can help me.",
    "Sorry to bother you.",
    "I've been a customer for a few years now.",
    "I'm writing from my phone so excuse the typos.",
    "Hi, it's my first time contacting you.",
    "Not sure if this is the right place to ask.",
];

/// Closings that say nothing about what the customer wants.
const CLOSINGS: [&str; 8] = [
    "Thanks in advance.",
    "Thank you!",
    "Cheers.",
    "Appreciate the help.",
    "Let me know, thanks.",
    "Kind regards.",
    "Thanks for your time.",
    "Have a nice day.",
];

/// The message with an opening, a closing, or both.
fn compose(text: &str, rng: &mut ChaCha8Rng) -> String {
    let opening = OPENINGS.choose(rng).copied().unwrap_or_default();
    let closing = CLOSINGS.choose(rng).copied().unwrap_or_default();
    match rng.random_range(0..3) {
        0 => format!("{opening} {text}"),
        1 => format!("{text} {closing}"),
        _ => format!("{opening} {text} {closing}"),
    }
}

/// One to three kinds of noise.
fn add_noise(text: &str, rng: &mut ChaCha8Rng) -> String {
    let mut t = text.to_string();
    let kinds = rng.random_range(1..=3);
    let mut order = [0u8, 1, 2, 3];
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for &kind in &order[..kinds] {
        t = match kind {
            0 => {
                let n = rng.random_range(1..=2);
                (0..n).fold(t, |t, _| typo(&t, rng))
            }
            1 => t.to_lowercase(),
            2 => t
                .chars()
                .filter(|c| !matches!(c, '.' | ',' | '?' | '!' | ';' | ':' | '\''))
                .collect(),
            _ => {
                let spaces: Vec<usize> = t.match_indices(' ').map(|(i, _)| i).collect();
                match spaces.choose(rng) {
                    Some(&i) => format!("{}{}", &t[..i], &t[i + 1..]),
                    None => t,
                }
            }
        };
    }
    if t.trim().is_empty() {
        text.to_string()
    } else {
        t
    }
}

/// The records with their instructions rewritten as `config` says (labels and responses unchanged).
/// Each record's rewrite depends only on `seed` and its id, not on which other records are present.
pub fn augment(records: &[Record], config: &AugmentConfig, seed: u64) -> Vec<Record> {
    if config.is_off() {
        return records.to_vec();
    }
    records
        .iter()
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (r.id as u64).wrapping_mul(0x9E37_79B9));
            let mut text = r.instruction.clone();
            if config.placeholders {
                text = fill_placeholders(&text, &mut rng);
            }
            if config.compose > 0.0 && rng.random_bool(config.compose.clamp(0.0, 1.0)) {
                text = compose(&text, &mut rng);
            }
            if rng.random_bool(config.noise.clamp(0.0, 1.0)) {
                text = add_noise(&text, &mut rng);
            }
            Record {
                instruction: text,
                ..r.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Category, Intent};

    fn record(id: usize, text: &str) -> Record {
        Record {
            id,
            flags: None,
            instruction: text.into(),
            category: Category::Order,
            intent: Intent::TrackOrder,
            response: Some("sure".into()),
        }
    }

    #[test]
    fn placeholders_become_values_of_their_kind() {
        let r = record(3, "where is order {{Order Number}} for {{Person Name}}?");
        let config = AugmentConfig {
            placeholders: true,
            ..Default::default()
        };
        let out = augment(std::slice::from_ref(&r), &config, 7).remove(0);
        assert!(!out.instruction.contains("{{"), "{}", out.instruction);
        assert!(out.instruction.starts_with("where is order "));
        assert!(values("Person Name")
            .iter()
            .any(|n| out.instruction.ends_with(&format!("for {n}?"))));
        assert_eq!(
            (out.category, out.intent, &out.response),
            (r.category, r.intent, &r.response)
        );
        // An unclosed mark is left alone.
        assert_eq!(
            fill_placeholders("a {{b", &mut ChaCha8Rng::seed_from_u64(1)),
            "a {{b"
        );
    }

    #[test]
    fn noise_is_seeded_and_applied_at_the_asked_rate() {
        let records: Vec<Record> = (0..400)
            .map(|i| {
                record(
                    i,
                    "I would like to check the status of my delivery, please.",
                )
            })
            .collect();
        let config = AugmentConfig {
            noise: 0.5,
            ..Default::default()
        };
        let a = augment(&records, &config, 11);
        assert_eq!(a, augment(&records, &config, 11), "not deterministic");
        assert_ne!(
            a,
            augment(&records, &config, 12),
            "the seed changes nothing"
        );
        let changed = a
            .iter()
            .zip(&records)
            .filter(|(x, y)| x.instruction != y.instruction)
            .count();
        assert!((150..=250).contains(&changed), "{changed} of 400 changed");
        assert!(a.iter().all(|r| !r.instruction.trim().is_empty()));
        // Off: the records as given.
        assert_eq!(augment(&records, &AugmentConfig::default(), 11), records);
        assert!(AugmentConfig {
            noise: 1.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .contains("augment.noise"));
    }

    #[test]
    fn typos_keep_the_other_words() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..50 {
            let t = typo("cancel my order now", &mut rng);
            let words: Vec<&str> = t.split(' ').collect();
            assert_eq!(words.len(), 4, "{t}");
            let same = ["cancel", "my", "order", "now"]
                .iter()
                .zip(&words)
                .filter(|(a, b)| a == b)
                .count();
            assert_eq!(same, 3, "{t}");
        }
    }

    #[test]
    fn composed_messages_keep_the_request_whole() {
        let records: Vec<Record> = (0..200).map(|i| record(i, "where is my parcel")).collect();
        let config = AugmentConfig {
            compose: 1.0,
            ..Default::default()
        };
        for r in augment(&records, &config, 3) {
            assert!(
                r.instruction.contains("where is my parcel"),
                "{}",
                r.instruction
            );
            assert!(r.instruction.len() > "where is my parcel".len());
        }
        assert!(AugmentConfig {
            compose: -0.1,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .contains("augment.compose"));
    }
}
