//! The model worker: one thread owns the base model and the adapters attached to it and runs every
//! job; requests reach it through a bounded queue and get their answers back through channels, so no
//! model work ever runs on the async runtime.
//!
//! Batching: the worker takes the oldest job and, from what is queued behind it, up to
//! [`MAX_BATCH`] − 1 more that can share its forward passes: classifications with the same adapter and
//! task are scored in one pass (one prompt prefix, every message after it); greedy generations with the
//! same adapter are prefilled together and decoded step by step together, each with its own token limit,
//! stop strings and stream. Sampled generations run alone (a seed must give the same text whatever else
//! is queued).

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use serde::Serialize;
use supportlm_data::{Category, Intent, Record, Task};
use supportlm_model::generate::{generate_controlled, GenerateOptions};
use supportlm_model::sampling::SamplingConfig;
use supportlm_model::Model;
use supportlm_prompting::guard::Guard;
use supportlm_prompting::{label_probabilities, Method};
use tokio::sync::{mpsc, oneshot};

use crate::error::ServeError;

/// Jobs that share one forward pass at most.
pub const MAX_BATCH: usize = 8;

/// The base and its attached adapters, by name.
pub struct Models {
    /// The id the base is served under (its file or folder name).
    pub base_id: String,
    /// The base, without adapter.
    pub base: Model,
    /// Each adapter attached (unmerged) to `base`.
    pub adapters: BTreeMap<String, Model>,
    /// With `--guard`: the off-topic threshold of each classifier (`None`: the base, 0-shot).
    pub guards: Option<BTreeMap<Option<String>, Guard>>,
    /// What a reply must not contain (the guard's output check).
    pub leak_markers: Vec<String>,
}

impl Models {
    /// The model for `adapter` (`None` or the base's id: the base).
    pub fn get(&self, adapter: Option<&str>) -> Result<&Model, ServeError> {
        match adapter {
            None => Ok(&self.base),
            Some(name) if name == self.base_id => Ok(&self.base),
            Some(name) => self
                .adapters
                .get(name)
                .ok_or_else(|| ServeError::UnknownModel(name.to_string())),
        }
    }
}

/// One label's probability.
pub type LabelScores = Vec<(&'static str, f64)>;

/// What a generation answers.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Task 2's prompt: the support reply to `message`, told its category.
    Respond {
        /// The customer message.
        message: String,
        /// Its category (given or predicted).
        category: Category,
    },
    /// A chat, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// One chat message (OpenAI's `{role, content}`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// End of turn, or a stop string.
    Stop,
    /// The token limit.
    Length,
}

/// What a generation job sends back, in order: `Started`, any number of `Text`, then `Done` (or
/// `Failed` at any point).
#[derive(Debug, Clone)]
pub enum GenEvent {
    /// The prompt was accepted.
    Started {
        /// Its tokens.
        prompt_tokens: usize,
    },
    /// Newly generated text.
    Text(String),
    /// The end.
    Done {
        /// Tokens generated.
        completion_tokens: usize,
        /// Why it ended.
        finish: Finish,
    },
    /// The job could not run.
    Failed(ServeError),
}

/// A classification job: one message.
pub struct ClassifyJob {
    /// The customer message.
    pub message: String,
    /// The adapter (`None`: the base with the 0-shot prompt).
    pub adapter: Option<String>,
    /// Category or intent.
    pub task: Task,
    /// Where the label distribution goes.
    pub reply: oneshot::Sender<Result<LabelScores, ServeError>>,
}

/// A generation job: one prompt, streamed.
pub struct GenerateJob {
    /// What to answer.
    pub prompt: Prompt,
    /// The adapter (`None`: the base).
    pub adapter: Option<String>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Greedy (temperature 0) or seeded sampling.
    pub sampling: SamplingConfig,
    /// The text ends before the first of these.
    pub stop: Vec<String>,
    /// Where the events go; when the receiver is dropped (the client left) the job stops.
    pub events: mpsc::UnboundedSender<GenEvent>,
}

/// Work for the model thread.
pub enum Job {
    /// Constrained scoring over a task's labels.
    Classify(ClassifyJob),
    /// Text generation.
    Generate(GenerateJob),
}

impl Job {
    /// Whether `other` can run in the same forward passes as `self`.
    fn batches_with(&self, other: &Job) -> bool {
        match (self, other) {
            (Job::Classify(a), Job::Classify(b)) => a.adapter == b.adapter && a.task == b.task,
            (Job::Generate(a), Job::Generate(b)) => {
                a.adapter == b.adapter && greedy(&a.sampling) && greedy(&b.sampling)
            }
            _ => false,
        }
    }
}

fn greedy(s: &SamplingConfig) -> bool {
    s.temperature <= 0.0
}

/// The handle the HTTP side holds: submit jobs, read the queue depth.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    max_queue: usize,
}

impl Engine {
    /// Starts the model thread over `models`; at most `max_queue` jobs wait. The thread ends when every
    /// handle is dropped and the queue is empty.
    pub fn start(models: Models, max_queue: usize) -> (Engine, std::thread::JoinHandle<()>) {
        let max_queue = max_queue.max(1);
        let (tx, rx) = std_mpsc::sync_channel(max_queue);
        let depth = Arc::new(AtomicUsize::new(0));
        let worker_depth = depth.clone();
        let handle = std::thread::Builder::new()
            .name("supportlm-model".into())
            .spawn(move || worker(models, rx, worker_depth))
            .expect("spawning the model thread");
        (
            Engine {
                tx,
                depth,
                max_queue,
            },
            handle,
        )
    }

    /// Queues a job; a full queue is [`ServeError::QueueFull`] (the job is handed back failed).
    pub fn submit(&self, job: Job) -> Result<(), ServeError> {
        let queued = self.depth.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queue {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(ServeError::QueueFull);
        }
        self.tx.try_send(job).map_err(|e| {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            match e {
                std_mpsc::TrySendError::Full(_) => ServeError::QueueFull,
                std_mpsc::TrySendError::Disconnected(_) => ServeError::ShuttingDown,
            }
        })
    }

    /// Jobs waiting for the model thread.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

fn worker(models: Models, rx: std_mpsc::Receiver<Job>, depth: Arc<AtomicUsize>) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match pending.pop_front() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => break,
            },
        };
        while let Ok(j) = rx.try_recv() {
            pending.push_back(j);
        }
        let mut batch = vec![first];
        let mut i = 0;
        while i < pending.len() && batch.len() < MAX_BATCH {
            if batch[0].batches_with(&pending[i]) {
                batch.extend(pending.remove(i));
            } else {
                i += 1;
            }
        }
        depth.fetch_sub(batch.len(), Ordering::SeqCst);
        run_batch(&models, batch);
    }
}

fn run_batch(models: &Models, batch: Vec<Job>) {
    let mut classify = Vec::new();
    let mut generate = Vec::new();
    for job in batch {
        match job {
            Job::Classify(j) => classify.push(j),
            Job::Generate(j) => generate.push(j),
        }
    }
    // A panic in model code is a bug; it must not take the server down or leave a client waiting.
    if !classify.is_empty() {
        let (replies, jobs): (Vec<_>, Vec<_>) = classify
            .into_iter()
            .map(|j| (j.reply, (j.message, j.adapter, j.task)))
            .unzip();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_classify(models, &jobs)))
            .unwrap_or_else(|_| Err(ServeError::Internal("the model thread panicked".into())));
        match result {
            Ok(all) => {
                for (reply, scores) in replies.into_iter().zip(all) {
                    let _ = reply.send(Ok(scores));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
    if !generate.is_empty() {
        let events: Vec<_> = generate.iter().map(|j| j.events.clone()).collect();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_generate(models, generate)));
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(ServeError::Internal("the model thread panicked".into())),
        };
        if let Some(e) = error {
            for tx in events {
                let _ = tx.send(GenEvent::Failed(e.clone()));
            }
        }
    }
}

fn run_classify(
    models: &Models,
    jobs: &[(String, Option<String>, Task)],
) -> Result<Vec<LabelScores>, ServeError> {
    let (_, adapter, task) = &jobs[0];
    let model = models.get(adapter.as_deref())?;
    let method = if adapter.is_some() {
        Method::Sft
    } else {
        Method::ZeroShot
    };
    let messages: Vec<String> = jobs.iter().map(|(m, _, _)| m.clone()).collect();
    for m in &messages {
        check_context(model, m.len(), 0)?;
    }
    Ok(label_probabilities(model, &messages, *task, method, &[])?)
}

/// Refuses a prompt that cannot fit: `prompt_tokens` (or, before tokenizing, a byte count, which bounds
/// the tokens from above for byte-level tokenizers) plus `max_tokens` beyond the context.
fn check_context(model: &Model, prompt_tokens: usize, max_tokens: usize) -> Result<(), ServeError> {
    let context = model.llama.config.max_position_embeddings;
    if prompt_tokens + max_tokens > context {
        return Err(ServeError::TooLong {
            prompt_tokens,
            max_tokens,
            context,
        });
    }
    Ok(())
}

/// The prompt's token ids.
fn encode(model: &Model, prompt: &Prompt) -> Result<Vec<u32>, ServeError> {
    Ok(match prompt {
        Prompt::Respond { message, category } => {
            let record = Record {
                id: 0,
                flags: None,
                instruction: message.clone(),
                category: *category,
                intent: Intent::ALL[0], // not part of the response prompt
                response: None,
            };
            let conv = Task::Response
                .conversation(&[], &record, false)
                .ok_or_else(|| ServeError::Internal("no response conversation".into()))?;
            model.encode_chat(&conv.messages, true)?
        }
        Prompt::Chat(messages) => model.encode_chat(messages, true)?,
    })
}

/// One row's progress: text held back while it could still become a stop string.
struct RowState {
    sent: usize,
    text: String,
    tokens: usize,
    finish: Option<Finish>,
}

fn run_generate(models: &Models, jobs: Vec<GenerateJob>) -> Result<(), ServeError> {
    let model = models.get(jobs[0].adapter.as_deref())?;
    // Prompts that cannot run are answered now; the others run together.
    let mut live = Vec::new();
    let mut prompts = Vec::new();
    for job in jobs {
        let encoded = encode(model, &job.prompt)
            .and_then(|ids| check_context(model, ids.len(), job.max_tokens).map(|_| ids));
        match encoded {
            Ok(ids) => {
                let _ = job.events.send(GenEvent::Started {
                    prompt_tokens: ids.len(),
                });
                prompts.push(ids);
                live.push(job);
            }
            Err(e) => {
                let _ = job.events.send(GenEvent::Failed(e));
            }
        }
    }
    if live.is_empty() {
        return Ok(());
    }
    let options = GenerateOptions {
        max_new_tokens: live.iter().map(|j| j.max_tokens).max().unwrap_or(1).max(1),
        sampling: live[0].sampling.clone(),
        stop_strings: Vec::new(),
    };
    let mut rows: Vec<RowState> = live
        .iter()
        .map(|_| RowState {
            sent: 0,
            text: String::new(),
            tokens: 0,
            finish: None,
        })
        .collect();
    let generations = generate_controlled(model, &prompts, &options, &mut |row, _, piece| {
        let (job, st) = (&live[row], &mut rows[row]);
        st.tokens += 1;
        st.text.push_str(piece);
        if let Some(cut) = job
            .stop
            .iter()
            .filter_map(|s| st.text.find(s.as_str()))
            .min()
        {
            st.text.truncate(cut);
            st.finish = Some(Finish::Stop);
        }
        // Send what can no longer turn into a stop string.
        let hold = if st.finish.is_some() {
            0
        } else {
            job.stop
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0)
        };
        let mut upto = st.text.len().saturating_sub(hold).max(st.sent);
        while !st.text.is_char_boundary(upto) {
            upto -= 1;
        }
        if upto > st.sent {
            let chunk = st.text[st.sent..upto].to_string();
            st.sent = upto;
            if job.events.send(GenEvent::Text(chunk)).is_err() {
                return false; // the client went away
            }
        }
        if st.finish.is_none() && st.tokens >= job.max_tokens {
            st.finish = Some(Finish::Length);
        }
        st.finish.is_none()
    })?;
    for ((job, st), g) in live.iter().zip(&mut rows).zip(&generations) {
        if st.sent < st.text.len() {
            let _ = job
                .events
                .send(GenEvent::Text(st.text[st.sent..].to_string()));
        }
        let finish = st.finish.unwrap_or(match g.stop {
            supportlm_model::generate::StopReason::MaxTokens => Finish::Length,
            _ => Finish::Stop,
        });
        let _ = job.events.send(GenEvent::Done {
            completion_tokens: g.tokens.len(),
            finish,
        });
    }
    Ok(())
}
