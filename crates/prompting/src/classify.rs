//! The classification evaluator: one method, one decision rule, a list of records → predictions.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use supportlm_data::{Record, Task};
use supportlm_model::generate::{generate_after, score_and_generate, GenerateOptions, Generation};
use supportlm_model::score::{encode_prefix, score_items, PrefixCache};
use supportlm_model::Model;

use crate::error::{PromptError, Result};
use crate::extract::{extract_label, Extraction, EXTRACTION_FAILED};
use crate::prompt::{encode_prompts, label_candidates, Prompts};

/// How the model is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The system prompt and the message only.
    ZeroShot,
    /// Balanced k-shot: one validation example per label before the message.
    FewShot,
    /// The model carries a fine-tuned adapter and gets the zero-shot prompt it was trained on.
    Sft,
}

impl Method {
    /// The name used on the command line and in run files.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ZeroShot => "zero-shot",
            Method::FewShot => "few-shot",
            Method::Sft => "sft",
        }
    }
}

/// How an answer becomes a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Greedy generation of a few tokens, then [`extract_label`].
    Generate,
    /// The label with the highest log-likelihood after the prompt.
    Constrained,
    /// The constrained rule after contextual calibration (Zhao et al., 2021, "Calibrate Before Use"):
    /// each label's probability divided by the one the same prompt gives it for content-free messages
    /// ([`content_free`], averaged), so a prompt's bias toward some labels no longer decides.
    Calibrated,
}

/// The content-free messages of contextual calibration (`configs/prompts.toml`: the paper's "N/A", ""
/// and "[MASK]").
pub fn content_free() -> &'static [String] {
    &supportlm_data::prompts::get().classify.content_free
}

impl Decision {
    /// The name used on the command line and in run files.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Generate => "generate",
            Decision::Constrained => "constrained",
            Decision::Calibrated => "calibrated",
        }
    }
}

/// Evaluator settings.
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    /// Categories or intents.
    pub task: Task,
    /// How the model is prompted.
    pub method: Method,
    /// How a label is read from the model.
    pub decision: Decision,
    /// Few-shot examples (earlier turns); empty for zero-shot and SFT.
    pub examples: Vec<Record>,
    /// Divide each label's log-likelihood by its token count (constrained rule).
    pub length_normalize: bool,
    /// New tokens for the generate rule.
    pub max_new_tokens: usize,
    /// Items per forward pass (scored together, or generated together).
    pub batch: usize,
}

/// One evaluated item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The record's id (its row in the source file).
    pub id: usize,
    /// The customer message.
    pub message: String,
    /// The true label.
    pub truth: String,
    /// The predicted label (`EXTRACTION_FAILED` when none could be read).
    pub prediction: String,
    /// The generated text (generate rule) or the best label (constrained rule).
    pub raw: String,
    /// Softmax over labels of their scores (constrained), 1 or 0 for generate (extracted or not).
    pub confidence: f64,
    /// Which extraction rule found the label.
    pub extraction: Extraction,
}

impl Prediction {
    /// Whether the prediction is the true label.
    pub fn correct(&self) -> bool {
        self.truth == self.prediction
    }
}

/// Classifies `records` by `options.decision`; `progress(done, total)` is called after each batch.
/// `model` must already carry the adapter for [`Method::Sft`].
pub fn classify(
    model: &Model,
    records: &[Record],
    options: &ClassifyOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Prediction>> {
    let per_item = classify_rules(model, records, options, &[options.decision], progress)?;
    Ok(per_item.into_iter().flat_map(|mut p| p.pop()).collect())
}

/// Several decision rules from one pass per item (`options.decision` is not read): each batch of
/// items is run once after the prefix with the label candidates laid out as a tree, which gives the
/// constrained scores (and, divided by the content-free ones, the calibrated rule's), and with
/// [`Decision::Generate`] among `rules` the same keys and values continue into greedy generation.
/// Returns per record one prediction per rule, in `rules`' order, each equal to what [`classify`]
/// gives for that rule alone.
pub fn classify_rules(
    model: &Model,
    records: &[Record],
    options: &ClassifyOptions,
    rules: &[Decision],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<Prediction>>> {
    let task = options.task;
    let Setup {
        labels,
        prompts,
        prefix,
        candidates,
    } = setup(model, records, options)?;
    let started = Instant::now();
    let calibration = if rules.contains(&Decision::Calibrated) {
        Some(content_free_log_probs(
            model,
            options,
            &prompts.prefix,
            &prefix,
            &candidates,
        )?)
    } else {
        None
    };
    let generates = rules.contains(&Decision::Generate);
    let scores = rules.iter().any(|&r| r != Decision::Generate);
    let chunk = options.batch.max(1);
    let mut out = Vec::with_capacity(records.len());
    for (chunk_r, chunk_items) in records.chunks(chunk).zip(prompts.items.chunks(chunk)) {
        // Per item: the label scores (when a scored rule is asked for) and the generation.
        let passes: Vec<(Option<Vec<f32>>, Option<Generation>)> = match (scores, generates) {
            (true, true) => score_and_generate(
                model,
                &prefix,
                chunk_items,
                &candidates,
                &generate_options(options),
                &mut |_, _, _| {},
            )?
            .into_iter()
            .map(|(s, g)| (Some(s), Some(g)))
            .collect(),
            (true, false) => score_items(model, &prefix, chunk_items, &candidates)?
                .into_iter()
                .map(|s| (Some(s), None))
                .collect(),
            (false, _) => generate_after(
                model,
                &prefix,
                chunk_items,
                &generate_options(options),
                &mut |_, _, _| {},
            )?
            .into_iter()
            .map(|g| (None, Some(g)))
            .collect(),
        };
        for (r, (item_scores, mut generation)) in chunk_r.iter().zip(passes) {
            let per_rule = rules
                .iter()
                .map(|rule| match rule {
                    Decision::Generate => {
                        let g = generation.take().expect("generated once, for its one rule");
                        generated(task, &labels, r, g)
                    }
                    Decision::Constrained | Decision::Calibrated => {
                        let cal = match rule {
                            Decision::Calibrated => calibration.as_deref(),
                            _ => None,
                        };
                        let s = item_scores.clone().expect("scored for a scored rule");
                        scored(options, &labels, &candidates, r, s, cal)
                    }
                })
                .collect();
            out.push(per_rule);
        }
        progress(out.len(), records.len());
    }
    tracing::info!(
        items = records.len(),
        seconds = started.elapsed().as_secs_f64(),
        method = options.method.as_str(),
        decision = rules
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join("+"),
        "classified"
    );
    Ok(out)
}

/// The constrained rule's distribution over the task's labels for messages nobody has labelled (a
/// server's requests): per message, `(label, probability)` in label order, from one scoring pass over
/// all of them after the shared prefix. `method` as in [`ClassifyOptions`] (the adapter, for SFT, is
/// already on `model`); `examples` are the few-shot turns. For many batches, [`LabelScorer`] encodes
/// the shared prefix once.
pub fn label_probabilities(
    model: &Model,
    messages: &[String],
    task: Task,
    method: Method,
    examples: &[Record],
) -> Result<Vec<Vec<(&'static str, f64)>>> {
    LabelScorer::new(model, task, method, examples)?.probabilities(messages)
}

/// [`label_probabilities`] batch after batch with the same task, method and examples: the shared
/// prefix (the system prompt and any few-shot turns) is encoded on the first batch and kept, not
/// encoded again for every batch (for a 10-shot prompt, about a second per batch on 2 cores).
pub struct LabelScorer<'m> {
    model: &'m Model,
    task: Task,
    examples: Vec<Record>,
    labels: Vec<&'static str>,
    candidates: Vec<Vec<u32>>,
    /// The prefix's tokens and its encoding, once a batch has been scored.
    prefix: Option<(Vec<u32>, PrefixCache)>,
}

impl<'m> LabelScorer<'m> {
    /// A scorer for `task` (a classification task) answered by `method` on `model`.
    pub fn new(model: &'m Model, task: Task, method: Method, examples: &[Record]) -> Result<Self> {
        if !matches!(task, Task::Category | Task::Intent) {
            return Err(PromptError::Prompt(format!(
                "{task} is not a classification task"
            )));
        }
        let labels = task.labels();
        let candidates = label_candidates(&labels, &model.tokenizer)?;
        let examples = if method == Method::FewShot {
            examples.to_vec()
        } else {
            Vec::new()
        };
        Ok(LabelScorer {
            model,
            task,
            examples,
            labels,
            candidates,
            prefix: None,
        })
    }

    /// Per message, `(label, probability)` in label order.
    pub fn probabilities(&mut self, messages: &[String]) -> Result<Vec<Vec<(&'static str, f64)>>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let records = unlabelled(messages);
        let prompts = encode_prompts(
            self.task,
            &self.examples,
            &records,
            &self.model.tokenizer,
            &self.model.template,
        )?;
        let prefix = match self.prefix.take() {
            Some((tokens, cache)) if tokens == prompts.prefix => (tokens, cache),
            _ => {
                let cache = encode_prefix(self.model, &prompts.prefix)?;
                (prompts.prefix, cache)
            }
        };
        let scores = score_items(self.model, &prefix.1, &prompts.items, &self.candidates);
        self.prefix = Some(prefix);
        Ok(scores?
            .into_iter()
            .map(|s| self.labels.iter().copied().zip(softmax(&s)).collect())
            .collect())
    }
}

/// What both rules start from: the task's labels, the encoded prompts, the shared prefix run once,
/// and each label as a candidate answer.
struct Setup {
    labels: Vec<&'static str>,
    prompts: Prompts,
    prefix: PrefixCache,
    candidates: Vec<Vec<u32>>,
}

fn setup(model: &Model, records: &[Record], options: &ClassifyOptions) -> Result<Setup> {
    let labels = options.task.labels();
    let prompts = encode_prompts(
        options.task,
        examples(options),
        records,
        &model.tokenizer,
        &model.template,
    )?;
    let prefix = encode_prefix(model, &prompts.prefix)?;
    let candidates = label_candidates(&labels, &model.tokenizer)?;
    Ok(Setup {
        labels,
        prompts,
        prefix,
        candidates,
    })
}

/// The few-shot examples the prompt carries (none for zero-shot and SFT).
fn examples(options: &ClassifyOptions) -> &[Record] {
    if options.method == Method::FewShot {
        &options.examples
    } else {
        &[]
    }
}

fn generate_options(options: &ClassifyOptions) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: options.max_new_tokens,
        ..Default::default()
    }
}

fn prediction(
    task: Task,
    r: &Record,
    prediction: String,
    raw: String,
    confidence: f64,
    extraction: Extraction,
) -> Prediction {
    Prediction {
        id: r.id,
        message: r.instruction.clone(),
        truth: task.label_of(r).to_string(),
        prediction,
        raw,
        confidence,
        extraction,
    }
}

/// The label scores the constrained rule compares: log-likelihoods, divided by the label's token
/// count with `length_normalize`.
fn rule_scores(
    options: &ClassifyOptions,
    candidates: &[Vec<u32>],
    mut scores: Vec<f32>,
) -> Vec<f32> {
    if options.length_normalize {
        scores
            .iter_mut()
            .zip(candidates)
            .for_each(|(s, c)| *s /= c.len() as f32);
    }
    scores
}

/// Records holding only a message, to build prompts from: the prompts read the message alone, so
/// the placeholder labels are never looked at.
fn unlabelled(messages: &[String]) -> Vec<Record> {
    messages
        .iter()
        .enumerate()
        .map(|(id, m)| Record {
            id,
            flags: None,
            instruction: m.clone(),
            category: supportlm_data::Category::ALL[0],
            intent: supportlm_data::Intent::ALL[0],
            response: None,
        })
        .collect()
}

/// `ln` of each label's probability (softmax of the rule's scores) averaged over the content-free
/// messages: the prompt's own bias, which [`Decision::Calibrated`] divides out.
fn content_free_log_probs(
    model: &Model,
    options: &ClassifyOptions,
    prefix_tokens: &[u32],
    prefix: &PrefixCache,
    candidates: &[Vec<u32>],
) -> Result<Vec<f32>> {
    let records = unlabelled(content_free());
    let prompts = encode_prompts(
        options.task,
        examples(options),
        &records,
        &model.tokenizer,
        &model.template,
    )?;
    if prompts.prefix != prefix_tokens {
        return Err(PromptError::Prompt(
            "the content-free prompts do not share the items' prefix".into(),
        ));
    }
    let mut mean = vec![0f64; candidates.len()];
    for scores in score_items(model, prefix, &prompts.items, candidates)? {
        for (m, p) in mean
            .iter_mut()
            .zip(softmax(&rule_scores(options, candidates, scores)))
        {
            *m += p / records.len() as f64;
        }
    }
    Ok(mean
        .iter()
        .map(|&p| p.max(f64::MIN_POSITIVE).ln() as f32)
        .collect())
}

fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = scores.iter().map(|&s| ((s - max) as f64).exp()).collect();
    let z: f64 = exp.iter().sum();
    exp.iter().map(|e| e / z).collect()
}

/// The constrained rule: the best-scoring label (ties to the earlier one), its softmax share as the
/// confidence. With `calibration` (ln of the content-free probabilities), the scores are the
/// log-probabilities minus it: `p(label | message) / p(label | content-free)`, renormalised.
fn scored(
    options: &ClassifyOptions,
    labels: &[&str],
    candidates: &[Vec<u32>],
    r: &Record,
    scores: Vec<f32>,
    calibration: Option<&[f32]>,
) -> Prediction {
    let mut scores = rule_scores(options, candidates, scores);
    if let Some(cal) = calibration {
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = max + scores.iter().map(|&s| (s - max).exp()).sum::<f32>().ln();
        scores
            .iter_mut()
            .zip(cal)
            .for_each(|(s, c)| *s = *s - log_z - c);
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = scores.iter().map(|&s| ((s - max) as f64).exp()).sum();
    let best = scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(j, _)| j);
    let label = labels[best].to_string();
    prediction(
        options.task,
        r,
        label.clone(),
        label,
        1.0 / z,
        Extraction::Scored,
    )
}

/// The generate rule: the label extracted from the generated text.
fn generated(task: Task, labels: &[&str], r: &Record, g: Generation) -> Prediction {
    let (label, how) = extract_label(&g.text, labels);
    let confidence = if label == EXTRACTION_FAILED { 0.0 } else { 1.0 };
    prediction(task, r, label.to_string(), g.text, confidence, how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use supportlm_model::config::Architecture;
    use supportlm_model::{default_device, tiny};

    /// A random tiny model of `arch` made from `seed`, in its own temporary folder.
    fn tiny_model(arch: Architecture, seed: u64) -> Model {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_hf_dir(dir.path(), &tiny::config(arch), seed, 1).unwrap();
        Model::load(dir.path(), &default_device()).unwrap()
    }

    /// Records for `(message, category, intent)` triples, numbered in order.
    fn records(rows: &[(&str, &str, &str)]) -> Vec<Record> {
        rows.iter()
            .enumerate()
            .map(|(id, (message, category, intent))| Record {
                id,
                flags: None,
                instruction: message.to_string(),
                category: category.parse().unwrap(),
                intent: intent.parse().unwrap(),
                response: None,
            })
            .collect()
    }

    #[test]
    fn rules_from_one_pass_equal_each_rule_alone() {
        let model = tiny_model(Architecture::Qwen2, 3);
        let records: Vec<Record> = records(&[
            ("where is my order?", "ORDER", "track_order"),
            ("I want my money back", "REFUND", "get_refund"),
            ("how do I close my account", "ACCOUNT", "delete_account"),
        ])
        .into_iter()
        .map(|r| Record {
            response: Some("Sure.".into()),
            ..r
        })
        .collect();
        let mut options = ClassifyOptions {
            task: Task::Category,
            method: Method::FewShot,
            decision: Decision::Constrained,
            examples: records[..2].to_vec(),
            length_normalize: true,
            max_new_tokens: 4,
            // Two items per pass, so one pass holds several items and the last one is alone.
            batch: 2,
        };
        let rules = [
            Decision::Generate,
            Decision::Constrained,
            Decision::Calibrated,
        ];
        let together = classify_rules(&model, &records, &options, &rules, &mut |_, _| {}).unwrap();
        let mut calibration_moved = false;
        for (i, rule) in rules.into_iter().enumerate() {
            options.decision = rule;
            let alone = classify(&model, &records, &options, &mut |_, _| {}).unwrap();
            let from_one_pass: Vec<Prediction> = together.iter().map(|p| p[i].clone()).collect();
            assert_eq!(from_one_pass, alone, "{}", rule.as_str());
            if rule == Decision::Calibrated {
                calibration_moved = from_one_pass
                    .iter()
                    .zip(&together)
                    .any(|(c, p)| c.confidence != p[1].confidence);
            }
        }
        assert!(together.iter().all(|p| !p[0].raw.is_empty()));
        assert!(
            calibration_moved,
            "the calibrated rule is the constrained one"
        );
        // Scored rules alone (no generation) and one rule in a list.
        let scored_only = [Decision::Calibrated, Decision::Constrained];
        let two = classify_rules(&model, &records, &options, &scored_only, &mut |_, _| {}).unwrap();
        for (a, b) in two.iter().zip(&together) {
            assert_eq!((&a[0], &a[1]), (&b[2], &b[1]));
        }
    }

    #[test]
    fn label_probabilities_agree_with_the_constrained_rule() {
        let model = tiny_model(Architecture::Llama, 5);
        let messages = [
            "where is my order?",
            "I want my money back",
            "close my account",
        ];
        let records = records(&messages.map(|m| (m, "ORDER", "track_order")));
        for task in [Task::Category, Task::Intent] {
            let options = ClassifyOptions {
                task,
                method: Method::ZeroShot,
                decision: Decision::Constrained,
                examples: Vec::new(),
                length_normalize: false,
                max_new_tokens: 8,
                batch: 2,
            };
            let want = classify(&model, &records, &options, &mut |_, _| {}).unwrap();
            let owned: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
            let got = label_probabilities(&model, &owned, task, Method::ZeroShot, &[]).unwrap();
            for (p, dist) in want.iter().zip(&got) {
                assert_eq!(dist.len(), task.labels().len());
                let (best, conf) =
                    dist.iter()
                        .copied()
                        .fold(("", -1.0), |b, s| if s.1 > b.1 { s } else { b });
                assert_eq!(best, p.prediction);
                assert!(
                    (conf - p.confidence).abs() < 1e-5,
                    "{conf} vs {}",
                    p.confidence
                );
                assert!((dist.iter().map(|d| d.1).sum::<f64>() - 1.0).abs() < 1e-9);
            }
        }
        assert!(label_probabilities(&model, &[], Task::Response, Method::ZeroShot, &[]).is_err());
    }

    #[test]
    fn calibration_divides_by_the_content_free_probabilities() {
        let model = tiny_model(Architecture::Llama, 11);
        let messages = [
            "where is my order?",
            "refund please",
            "change my address",
            "hi",
        ];
        let records = records(&messages.map(|m| (m, "ORDER", "track_order")));
        let options = ClassifyOptions {
            task: Task::Category,
            method: Method::ZeroShot,
            decision: Decision::Calibrated,
            examples: Vec::new(),
            length_normalize: false,
            max_new_tokens: 8,
            batch: 3,
        };
        let got = classify(&model, &records, &options, &mut |_, _| {}).unwrap();
        // By hand: the label distribution of each message over the mean distribution of the
        // content-free messages, renormalised.
        let owned: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
        let p = label_probabilities(&model, &owned, Task::Category, Method::ZeroShot, &[]).unwrap();
        let free = content_free().to_vec();
        let cf = label_probabilities(&model, &free, Task::Category, Method::ZeroShot, &[]).unwrap();
        let labels = Task::Category.labels();
        let mean: Vec<f64> = (0..labels.len())
            .map(|j| cf.iter().map(|d| d[j].1).sum::<f64>() / cf.len() as f64)
            .collect();
        let mut differs = false;
        for (pred, dist) in got.iter().zip(&p) {
            let q: Vec<f64> = dist.iter().zip(&mean).map(|(d, m)| d.1 / m).collect();
            let z: f64 = q.iter().sum();
            let (best, top) =
                q.iter()
                    .enumerate()
                    .fold((0, -1.0), |b, (j, &v)| if v > b.1 { (j, v) } else { b });
            assert_eq!(pred.prediction, labels[best]);
            assert!(
                (pred.confidence - top / z).abs() < 1e-4,
                "{} vs {}",
                pred.confidence,
                top / z
            );
            let raw_best = dist
                .iter()
                .copied()
                .fold(("", -1.0), |b, s| if s.1 > b.1 { s } else { b });
            differs |= raw_best.0 != pred.prediction;
        }
        // The content-free bias of this random model is strong enough to move some decision.
        assert!(differs, "calibration changed no decision");
    }

    #[test]
    fn a_scorer_keeps_its_prefix_across_batches_with_the_same_results() {
        let model = tiny_model(Architecture::Llama, 9);
        let examples = records(&[
            ("where is my parcel", "SHIPPING", "delivery_period"),
            ("refund me", "REFUND", "get_refund"),
        ]);
        let batches: Vec<Vec<String>> = [
            vec!["cancel it", "my invoice is wrong"],
            vec!["hello"],
            vec![],
            vec![
                "i forgot my password",
                "change the address",
                "pay with paypal",
            ],
        ]
        .iter()
        .map(|b| b.iter().map(|m| m.to_string()).collect())
        .collect();
        for method in [Method::ZeroShot, Method::FewShot] {
            let mut scorer = LabelScorer::new(&model, Task::Category, method, &examples).unwrap();
            for batch in &batches {
                let kept = scorer.probabilities(batch).unwrap();
                let alone =
                    label_probabilities(&model, batch, Task::Category, method, &examples).unwrap();
                assert_eq!(kept, alone, "{method:?}");
            }
        }
        assert!(LabelScorer::new(&model, Task::Response, Method::ZeroShot, &[]).is_err());
    }
}
