//! The prompts, as data: `configs/prompts.toml` (system prompts and user turns of the tasks, the
//! content-free messages of contextual calibration, the judge's instructions, the guard's replies),
//! compiled in. [`sha256`] names the file's version in every run's outputs.

use std::sync::LazyLock;

use serde::Deserialize;

/// The file's text, as compiled in.
pub const TEXT: &str = include_str!("../../../configs/prompts.toml");

/// `configs/prompts.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompts {
    /// Task 1 (category and intent).
    pub classify: Classify,
    /// Task 2.
    pub respond: Respond,
    /// The LLM judge of Task 2's replies.
    pub judge: Judge,
    /// The guard's fixed replies.
    pub guard: Guard,
}

/// Task 1's prompts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Classify {
    /// System prompt; `{what}` and `{labels}` filled in.
    pub system: String,
    /// User turn; `{message}` filled in.
    pub user: String,
    /// Content-free messages of contextual calibration (their probabilities are averaged).
    pub content_free: Vec<String>,
}

/// Task 2's prompts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Respond {
    /// System prompt.
    pub system: String,
    /// User turn; `{category}` and `{message}` filled in.
    pub user: String,
}

/// The judge's prompts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Judge {
    /// System prompt.
    pub system: String,
    /// User turn; `{message}`, `{reference}` and `{reply}` filled in.
    pub user: String,
}

/// The guard's replies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    /// The answer to an off-topic message.
    pub scope_reply: String,
    /// What replaces a degenerate reply.
    pub fallback_reply: String,
}

static PROMPTS: LazyLock<Prompts> = LazyLock::new(|| match parse(TEXT) {
    Ok(p) => p,
    // The file is compiled in and parsed by a test, so a build that reaches here has a valid one.
    Err(e) => unreachable!("configs/prompts.toml as compiled in: {e}"),
});

static SHA256: LazyLock<String> = LazyLock::new(|| supportlm_fsio::sha256_hex(TEXT.as_bytes()));

/// The prompts compiled in.
pub fn get() -> &'static Prompts {
    &PROMPTS
}

/// The sha256 of `configs/prompts.toml` as compiled in (recorded with every run).
pub fn sha256() -> &'static str {
    &SHA256
}

/// Reads a prompts file; the error names the field.
pub fn parse(text: &str) -> Result<Prompts, String> {
    let p: Prompts = toml::from_str(text).map_err(|e| e.to_string())?;
    let check = |name: &str, template: &str, keys: &[&str]| -> Result<(), String> {
        for key in keys {
            if !template.contains(&format!("{{{key}}}")) {
                return Err(format!("{name} must contain {{{key}}}"));
            }
        }
        Ok(())
    };
    check("classify.system", &p.classify.system, &["labels"])?;
    check("classify.user", &p.classify.user, &["message"])?;
    check("respond.user", &p.respond.user, &["message"])?;
    check("judge.user", &p.judge.user, &["message", "reply"])?;
    if p.classify.content_free.is_empty() {
        return Err("classify.content_free needs at least one message".into());
    }
    Ok(p)
}

/// `template` with each `{key}` of `values` replaced, in one pass: text that a value brings in is not
/// searched again, and braces that name no key (`{{Order Number}}`, JSON) stay as they are.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = values.iter().find(|(k, _)| {
            after.starts_with(k) && after[k.len()..].starts_with('}') && !k.is_empty()
        });
        match hit {
            Some((k, v)) => {
                out.push_str(v);
                rest = &after[k.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_prompts_parse() {
        parse(TEXT).unwrap();
        assert_eq!(get().classify.content_free, ["N/A", "", "[MASK]"]);
        assert_eq!(sha256().len(), 64);
    }

    #[test]
    fn fill_replaces_named_keys_once_and_leaves_other_braces() {
        let t = "Keep {{Order Number}}; {\"a\": 1} {message} / {category}{message}";
        assert_eq!(
            fill(t, &[("message", "m {category}"), ("category", "REFUND")]),
            "Keep {{Order Number}}; {\"a\": 1} m {category} / REFUNDm {category}"
        );
        assert_eq!(fill("{unknown} {", &[("message", "x")]), "{unknown} {");
    }

    #[test]
    fn a_prompts_file_without_a_needed_placeholder_is_refused() {
        let broken = TEXT.replace("Customer message: {message}\"", "Customer message\"");
        assert!(parse(&broken).unwrap_err().contains("classify.user"));
        assert!(parse("[classify]\n").is_err());
    }
}
