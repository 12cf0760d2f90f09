//! LLM-as-judge with the original study's rubric: relevance 0–5, politeness 0–3, actionable guidance
//! 0–2 (total out of 10). The judge is a model this project loads or any OpenAI-compatible chat
//! endpoint. Scores are parsed from JSON or from `Relevance: 4` lines; anything else is reported as
//! unparseable, never guessed.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use supportlm_data::{Message, Role};
use supportlm_model::generate::{generate, generate_after, GenerateOptions};
use supportlm_model::score::{encode_prefix, score_candidates, PrefixCache};
use supportlm_model::Model;

use crate::error::{PromptError, Result};
use crate::respond::Response;

/// The rubric's criteria and their maxima.
pub const CRITERIA: [(&str, u32); 3] = [("relevance", 5), ("politeness", 3), ("actionable", 2)];

/// One judged response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// How relevant the response is, 0–5.
    pub relevance: u32,
    /// How polite, 0–3.
    pub politeness: u32,
    /// How actionable, 0–2.
    pub actionable: u32,
}

impl Scores {
    /// The sum, 0–10.
    pub fn total(&self) -> u32 {
        self.relevance + self.politeness + self.actionable
    }
}

/// What the judge said about one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The judged item's id.
    pub id: usize,
    /// `None` when the judge's answer could not be parsed (`error` says why).
    pub scores: Option<Scores>,
    /// The judge's reason, when it gave one.
    pub rationale: String,
    /// The judge's whole answer.
    pub raw: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Why the answer could not be parsed (scores are then `None`).
    pub error: Option<String>,
}

/// The judge's conversation for one response (`configs/prompts.toml`, `[judge]`).
pub fn judge_messages(r: &Response) -> Vec<Message> {
    let p = &supportlm_data::prompts::get().judge;
    let reply = if r.generated.trim().is_empty() {
        "(empty reply)"
    } else {
        &r.generated
    };
    let user = supportlm_data::prompts::fill(
        &p.user,
        &[
            ("message", &r.message),
            ("reference", &r.reference),
            ("reply", reply),
        ],
    );
    vec![
        Message::new(Role::System, p.system.clone()),
        Message::new(Role::User, user),
    ]
}

/// Why a judge answer gave no scores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFailure(pub String);

/// Reads the three scores (and a rationale) from a judge's answer: a JSON object anywhere in the text,
/// else `name: value` lines (`Relevance: 4`, `politeness = 2/3`). Every criterion must be present, an
/// integer and within its range.
pub fn parse_verdict(text: &str) -> std::result::Result<(Scores, String), ParseFailure> {
    if let Some(found) = json_object(text) {
        return from_json(&found);
    }
    from_lines(text)
}

/// The first balanced `{…}` in `text` that parses as a JSON object.
fn json_object(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let bytes = text.as_bytes();
    for (start, _) in text.match_indices('{') {
        let mut depth = 0i32;
        let mut in_string = false;
        let mut escaped = false;
        for (i, &b) in bytes.iter().enumerate().skip(start) {
            match b {
                _ if escaped => escaped = false,
                b'\\' if in_string => escaped = true,
                b'"' => in_string = !in_string,
                b'{' if !in_string => depth += 1,
                b'}' if !in_string => {
                    depth -= 1;
                    if depth == 0 {
                        if let Ok(serde_json::Value::Object(m)) =
                            serde_json::from_str(&text[start..=i])
                        {
                            return Some(m);
                        }
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    None
}

/// A criterion's key as a judge may spell it.
fn criterion_of(key: &str) -> Option<usize> {
    let k: String = key
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .collect();
    if k.starts_with("relevan") {
        Some(0)
    } else if k.starts_with("polite") {
        Some(1)
    } else if k.starts_with("action") {
        Some(2)
    } else {
        None
    }
}

fn check(
    values: [Option<f64>; 3],
    rationale: String,
) -> std::result::Result<(Scores, String), ParseFailure> {
    let mut out = [0u32; 3];
    for (i, (name, max)) in CRITERIA.iter().enumerate() {
        let v = values[i].ok_or_else(|| ParseFailure(format!("no {name} score")))?;
        if v.fract() != 0.0 || v < 0.0 || v > *max as f64 {
            return Err(ParseFailure(format!(
                "{name} score {v} is not an integer in 0..={max}"
            )));
        }
        out[i] = v as u32;
    }
    Ok((
        Scores {
            relevance: out[0],
            politeness: out[1],
            actionable: out[2],
        },
        rationale,
    ))
}

fn from_json(
    m: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<(Scores, String), ParseFailure> {
    let mut values = [None; 3];
    let mut rationale = String::new();
    for (k, v) in m {
        if let Some(i) = criterion_of(k) {
            values[i] = match v {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::String(s) => s.trim().parse().ok(),
                _ => None,
            };
        } else if let serde_json::Value::String(s) = v {
            let k = k.to_ascii_lowercase();
            if k.contains("rational") || k.contains("reason") || k.contains("explan") {
                rationale = s.clone();
            }
        }
    }
    check(values, rationale)
}

fn from_lines(text: &str) -> std::result::Result<(Scores, String), ParseFailure> {
    let mut values = [None; 3];
    let mut rest = Vec::new();
    for line in text.lines() {
        let clean = line.trim().trim_start_matches(['-', '*', ' ']);
        let Some((key, value)) = clean.split_once([':', '=']) else {
            rest.push(line.trim());
            continue;
        };
        match criterion_of(key) {
            Some(i) if key.len() < 40 => {
                let number: String = value
                    .trim()
                    .trim_start_matches('*')
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                values[i] = number.trim_end_matches('.').parse().ok();
            }
            _ => {
                let k = key.to_ascii_lowercase();
                if k.contains("rational") || k.contains("reason") {
                    rest.push(value.trim());
                } else {
                    rest.push(line.trim());
                }
            }
        }
    }
    if values.iter().all(Option::is_none) {
        return Err(ParseFailure(
            "no JSON object and no `criterion: score` lines".into(),
        ));
    }
    let rationale = rest
        .into_iter()
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    check(values, rationale)
}

/// Where the judging happens.
pub enum Judge<'a> {
    /// A model this project loads. With `constrained`, the answer is forced into the rubric's JSON
    /// shape and each score is the value the model finds most likely (small local models rarely write
    /// the format on their own); otherwise it is generated greedily and parsed.
    Local {
        /// The judge model.
        model: &'a Model,
        /// Its name in reports.
        name: String,
        /// Score each criterion by likelihood instead of generating.
        constrained: bool,
    },
    /// An OpenAI-compatible chat-completions endpoint.
    Http(HttpJudge),
}

/// An OpenAI-compatible endpoint: `POST {base}/chat/completions`.
pub struct HttpJudge {
    /// Base URL (`http://localhost:8000/v1`) or the full `…/chat/completions` URL.
    pub url: String,
    /// The model name sent in requests.
    pub model: String,
    /// Bearer token, when the endpoint needs one.
    pub api_key: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl HttpJudge {
    fn endpoint(&self) -> String {
        let u = self.url.trim_end_matches('/');
        if u.ends_with("/chat/completions") {
            u.to_string()
        } else {
            format!("{u}/chat/completions")
        }
    }

    /// Sends one conversation and returns the reply text.
    pub fn complete(&self, messages: &[Message]) -> Result<String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let body = serde_json::json!({
            "model": self.model,
            "temperature": 0,
            "max_tokens": 256,
            "messages": messages,
        });
        let endpoint = self.endpoint();
        let mut request = agent.post(&endpoint);
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let fail = |m: String| PromptError::Judge(format!("{endpoint}: {m}"));
        let mut response = request.send_json(&body).map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!(
                "HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| fail(format!("the reply is not JSON ({e})")))?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| fail("the reply has no choices[0].message.content".into()))
    }
}

impl Judge<'_> {
    /// A name for reports (the model path or the endpoint's model id).
    pub fn name(&self) -> String {
        match self {
            Judge::Local { name, .. } => name.clone(),
            Judge::Http(h) => format!("{} at {}", h.model, h.url),
        }
    }

    /// The judge's raw answer for one response.
    pub fn ask(&self, r: &Response) -> Result<String> {
        let messages = judge_messages(r);
        match self {
            Judge::Local {
                model,
                constrained: true,
                ..
            } => constrained_answer(model, &messages),
            Judge::Local { model, .. } => {
                let text = model.template.render(&messages, true)?;
                let ids = model.tokenizer.encode(&text, false)?;
                let opts = GenerateOptions {
                    max_new_tokens: 96,
                    ..Default::default()
                };
                let g = generate(model, &[ids], &opts, &mut |_, _, _| {})?;
                Ok(g.into_iter().next().map(|g| g.text).unwrap_or_default())
            }
            Judge::Http(h) => h.complete(&messages),
        }
    }

    /// Judges one response: its answer parsed, or the reason it could not be.
    pub fn judge(&self, r: &Response) -> Result<Verdict> {
        let raw = self.ask(r)?;
        Ok(match parse_verdict(&raw) {
            Ok((scores, rationale)) => Verdict {
                id: r.id,
                scores: Some(scores),
                rationale,
                raw,
                error: None,
            },
            Err(ParseFailure(why)) => Verdict {
                id: r.id,
                scores: None,
                rationale: String::new(),
                raw,
                error: Some(why),
            },
        })
    }
}

/// Tokens of the prompt plus the answer so far: after the encoded prompt, or the whole text.
enum Tokens {
    After(Vec<u32>),
    Whole(Vec<u32>),
}

/// The most likely score ` 0` … ` max` after `prefix` and `item` (ties to the lower score).
fn best_score(model: &Model, prefix: &PrefixCache, item: &[u32], max: u32) -> Result<usize> {
    let candidates = (0..=max)
        .map(|v| model.tokenizer.encode(&format!(" {v}"), false))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let scores = score_candidates(model, prefix, item, &candidates)?;
    Ok(scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(v, _)| v))
}

/// Generation settings of the rationale: up to its closing quote.
fn rationale_options() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 48,
        stop_strings: vec!["\"".into()],
        ..Default::default()
    }
}

/// The judge's answer built by constrained scoring: after `{"relevance":` the most likely of ` 0` … ` 5`,
/// and so on for each criterion; then a rationale generated up to its closing quote.
///
/// The rendered conversation (the long part: message, reference and reply) is encoded once; each step
/// runs only the answer written so far after it. That equals encoding the whole text whenever the
/// tokenizer splits the text at the prompt's end, which is checked; otherwise the whole text is encoded
/// each time.
fn constrained_answer(model: &Model, messages: &[Message]) -> Result<String> {
    let prompt = model.template.render(messages, true)?;
    let prompt_ids = model.tokenizer.encode(&prompt, false)?;
    let prompt_cache = encode_prefix(model, &prompt_ids)?;
    // The answer written so far: its tokens after the encoded prompt, or the whole text's tokens when
    // the tokenizer merged across the prompt's end.
    let split = |answer: &str| -> Result<Tokens> {
        let ids = model
            .tokenizer
            .encode(&format!("{prompt}{answer}"), false)?;
        Ok(match ids.strip_prefix(prompt_ids.as_slice()) {
            Some(rest) if !rest.is_empty() => Tokens::After(rest.to_vec()),
            _ => Tokens::Whole(ids),
        })
    };
    let mut text = String::new();
    let mut answer = serde_json::Map::new();
    for (i, (name, max)) in CRITERIA.iter().enumerate() {
        text += &format!("{}\"{name}\":", if i == 0 { "{" } else { ", " });
        let best = match split(&text)? {
            Tokens::After(item) => best_score(model, &prompt_cache, &item, *max)?,
            Tokens::Whole(ids) => best_score(model, &encode_prefix(model, &ids)?, &[], *max)?,
        };
        text += &format!(" {best}");
        answer.insert(name.to_string(), best.into());
    }
    text += ", \"rationale\": \"";
    let opts = rationale_options();
    let g = match split(&text)? {
        Tokens::After(item) => {
            generate_after(model, &prompt_cache, &[item], &opts, &mut |_, _, _| {})?
        }
        Tokens::Whole(ids) => generate(model, &[ids], &opts, &mut |_, _, _| {})?,
    };
    let rationale = g.into_iter().next().map(|g| g.text).unwrap_or_default();
    answer.insert("rationale".into(), rationale.trim().into());
    // serde_json escapes whatever the rationale holds.
    Ok(serde_json::Value::Object(answer).to_string())
}

/// Mean judge scores with 95% bootstrap intervals over the parsed verdicts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeSummary {
    /// The judge's name.
    pub judge: String,
    /// Items judged.
    pub items: usize,
    /// Answers that could not be parsed.
    pub unparseable: usize,
    /// Means over the parsed verdicts (`None` when none parsed).
    pub relevance: Option<supportlm_metrics::Interval>,
    /// Mean politeness (0–3).
    pub politeness: Option<supportlm_metrics::Interval>,
    /// Mean actionability (0–2).
    pub actionable: Option<supportlm_metrics::Interval>,
    /// Mean total (0–10).
    pub total: Option<supportlm_metrics::Interval>,
}

/// Means with seeded bootstrap intervals over the parsed verdicts.
pub fn summarize(judge: String, verdicts: &[Verdict], resamples: usize, seed: u64) -> JudgeSummary {
    let parsed: Vec<Scores> = verdicts.iter().filter_map(|v| v.scores).collect();
    let mean = |f: &dyn Fn(&Scores) -> u32| {
        (!parsed.is_empty()).then(|| {
            supportlm_metrics::bootstrap_ci(parsed.len(), resamples, 0.95, seed, |idx| {
                idx.iter().map(|&i| f(&parsed[i]) as f64).sum::<f64>() / idx.len().max(1) as f64
            })
        })
    };
    JudgeSummary {
        judge,
        items: verdicts.len(),
        unparseable: verdicts.len() - parsed.len(),
        relevance: mean(&|s| s.relevance),
        politeness: mean(&|s| s.politeness),
        actionable: mean(&|s| s.actionable),
        total: mean(&|s| s.total()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer as first written: the whole text encoded from scratch at every step.
    fn answer_from_scratch(model: &Model, messages: &[Message]) -> String {
        let mut text = model.template.render(messages, true).unwrap();
        let mut answer = serde_json::Map::new();
        for (i, (name, max)) in CRITERIA.iter().enumerate() {
            text += &format!("{}\"{name}\":", if i == 0 { "{" } else { ", " });
            let prefix =
                encode_prefix(model, &model.tokenizer.encode(&text, false).unwrap()).unwrap();
            let best = best_score(model, &prefix, &[], *max).unwrap();
            text += &format!(" {best}");
            answer.insert(name.to_string(), best.into());
        }
        text += ", \"rationale\": \"";
        let ids = model.tokenizer.encode(&text, false).unwrap();
        let g = generate(model, &[ids], &rationale_options(), &mut |_, _, _| {}).unwrap();
        answer.insert("rationale".into(), g[0].text.trim().into());
        serde_json::Value::Object(answer).to_string()
    }

    #[test]
    fn constrained_answer_after_the_encoded_conversation_equals_encoding_it_every_time() {
        use supportlm_model::config::Architecture;
        use supportlm_model::{default_device, tiny};
        let dir = tempfile::tempdir().unwrap();
        let config = tiny::config(Architecture::Llama);
        tiny::write_hf_dir(dir.path(), &config, 11, 1).unwrap();
        let model = Model::load(dir.path(), &default_device()).unwrap();
        for (message, reply) in [
            (
                "where is my order?",
                "It ships tomorrow; here is the tracking link.",
            ),
            (
                "cancel my plan",
                "Sorry to see you go. Go to Settings > Plan > Cancel.",
            ),
        ] {
            let r = Response {
                id: 1,
                message: message.into(),
                category: "ORDER".into(),
                reference: "I can help with that.".into(),
                generated: reply.into(),
                tokens: 0,
                seconds: 0.0,
                stop: supportlm_model::generate::StopReason::Eos,
            };
            let messages = judge_messages(&r);
            assert_eq!(
                constrained_answer(&model, &messages).unwrap(),
                answer_from_scratch(&model, &messages)
            );
        }
    }

    #[test]
    fn parses_json_anywhere_in_the_text() {
        let (s, why) = parse_verdict(
            "Here is my rating:\n```json\n{\"relevance\": 4, \"politeness\": \"3\", \"actionable\": 1, \
             \"rationale\": \"Asks for the {order} number.\"}\n```",
        )
        .unwrap();
        assert_eq!(
            (s.relevance, s.politeness, s.actionable, s.total()),
            (4, 3, 1, 8)
        );
        assert_eq!(why, "Asks for the {order} number.");
        let (s, _) =
            parse_verdict("{\"Relevance\": 5.0, \"Politeness\": 0, \"Actionable guidance\": 2}")
                .unwrap();
        assert_eq!(s.total(), 7);
    }

    #[test]
    fn parses_score_lines() {
        let (s, why) = parse_verdict(
            "Relevance: 3/5\n- Politeness = 2\n**Actionable**: 0\nRationale: vague about refunds.",
        )
        .unwrap();
        assert_eq!((s.relevance, s.politeness, s.actionable), (3, 2, 0));
        assert_eq!(why, "vague about refunds.");
    }

    #[test]
    fn malformed_answers_are_reported_not_guessed() {
        for (text, why) in [
            ("The reply is good.", "no JSON"),
            ("{\"relevance\": 4, \"politeness\": 3}", "no actionable"),
            (
                "{\"relevance\": 7, \"politeness\": 3, \"actionable\": 1}",
                "relevance score 7",
            ),
            (
                "{\"relevance\": 2.5, \"politeness\": 3, \"actionable\": 1}",
                "relevance score 2.5",
            ),
            (
                "Relevance: high\nPoliteness: 2\nActionable: 1",
                "no relevance",
            ),
            // Cut short: no JSON object, and the line reading stops at the first score.
            (
                "{\"relevance\": 4, \"politeness\": 3, \"actionable\": 1",
                "no politeness",
            ),
        ] {
            let err = parse_verdict(text).unwrap_err().0;
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }
}
