//! The tasks and their chat conversations. Prompting baselines and fine-tuning both build their text
//! from here, so a 0-shot prompt, a few-shot prompt and an SFT example differ only in what the study
//! varies (the examples before the question, the weights), never in the task wording.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::labels::{Category, Intent};
use crate::load::Record;

/// What the model is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Task 1: customer message → one of 11 categories.
    Category,
    /// Task 1, harder variant: customer message → one of 27 intents.
    Intent,
    /// Task 2: customer message (+ its category) → a support response.
    Response,
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 3] = [Task::Category, Task::Intent, Task::Response];

    /// The task's name (`category`, `intent`, `response`).
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Category => "category",
            Task::Intent => "intent",
            Task::Response => "response",
        }
    }

    /// The allowed labels of a classification task (empty for the response task).
    pub fn labels(self) -> Vec<&'static str> {
        match self {
            Task::Category => Category::ALL.iter().map(|c| c.as_str()).collect(),
            Task::Intent => Intent::ALL.iter().map(|i| i.as_str()).collect(),
            Task::Response => Vec::new(),
        }
    }

    /// The label a record has under this task: its category, its intent, or (for the response task,
    /// which is stratified by category) its category.
    pub fn label_of(self, record: &Record) -> &'static str {
        match self {
            Task::Category | Task::Response => record.category.as_str(),
            Task::Intent => record.intent.as_str(),
        }
    }

    /// Whether a record can serve as an example of this task (the response task needs a known response).
    pub fn accepts(self, record: &Record) -> bool {
        self != Task::Response || record.response.is_some()
    }

    /// The system prompt: the role, and for classification the allowed labels and the answer format.
    pub fn system_prompt(self) -> String {
        let p = crate::prompts::get();
        match self {
            Task::Category | Task::Intent => {
                let what = if self == Task::Category {
                    "category"
                } else {
                    "intent"
                };
                crate::prompts::fill(
                    &p.classify.system,
                    &[("what", what), ("labels", &self.labels().join(", "))],
                )
            }
            Task::Response => p.respond.system.clone(),
        }
    }

    /// The user turn for a record.
    pub fn user_message(self, record: &Record) -> String {
        let p = crate::prompts::get();
        match self {
            Task::Category | Task::Intent => {
                crate::prompts::fill(&p.classify.user, &[("message", &record.instruction)])
            }
            Task::Response => crate::prompts::fill(
                &p.respond.user,
                &[
                    ("category", &record.category.to_string()),
                    ("message", &record.instruction),
                ],
            ),
        }
    }

    /// The assistant turn that answers a record correctly, when it is known.
    pub fn target(self, record: &Record) -> Option<String> {
        match self {
            Task::Category | Task::Intent => Some(self.label_of(record).to_string()),
            Task::Response => record.response.clone(),
        }
    }

    /// The conversation for one record: system prompt, then `examples` as earlier user/assistant turns
    /// (few-shot), then the record's user turn; with `with_answer` the target assistant turn is appended
    /// (an SFT example). Returns `None` when an answer is asked for but unknown.
    pub fn conversation(
        self,
        examples: &[Record],
        record: &Record,
        with_answer: bool,
    ) -> Option<Conversation> {
        let mut messages = vec![Message::new(Role::System, self.system_prompt())];
        for ex in examples {
            messages.push(Message::new(Role::User, self.user_message(ex)));
            messages.push(Message::new(Role::Assistant, self.target(ex)?));
        }
        messages.push(Message::new(Role::User, self.user_message(record)));
        if with_answer {
            messages.push(Message::new(Role::Assistant, self.target(record)?));
        }
        Some(Conversation { messages })
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "category" => Ok(Task::Category),
            "intent" => Ok(Task::Intent),
            "response" => Ok(Task::Response),
            other => Err(format!(
                "unknown task `{other}` (expected category, intent or response)"
            )),
        }
    }
}

/// Who says a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The system prompt.
    System,
    /// The customer.
    User,
    /// The model's answer.
    Assistant,
}

/// One chat message, in the shape chat templates expect (`{"role": …, "content": …}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What they say.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// An ordered list of messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The messages in order.
    pub messages: Vec<Message>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(response: Option<&str>) -> Record {
        Record {
            id: 7,
            flags: None,
            instruction: "where is my refund".into(),
            category: Category::Refund,
            intent: Intent::TrackRefund,
            response: response.map(str::to_string),
        }
    }

    #[test]
    fn system_prompt_names_every_allowed_label() {
        for task in [Task::Category, Task::Intent] {
            let prompt = task.system_prompt();
            for label in task.labels() {
                assert!(prompt.contains(label), "{task}: {label}");
            }
        }
        assert_eq!(Task::Category.labels().len(), 11);
        assert_eq!(Task::Intent.labels().len(), 27);
    }

    #[test]
    fn few_shot_conversation_has_examples_as_earlier_turns() {
        let r = record(Some("I can help."));
        let conv = Task::Intent
            .conversation(&[r.clone(), r.clone()], &r, true)
            .unwrap();
        let roles: Vec<Role> = conv.messages.iter().map(|m| m.role).collect();
        use Role::*;
        assert_eq!(
            roles,
            [System, User, Assistant, User, Assistant, User, Assistant]
        );
        assert_eq!(conv.messages[2].content, "track_refund");
        assert_eq!(conv.messages[6].content, "track_refund");
    }

    #[test]
    fn response_task_needs_a_known_response() {
        let unknown = record(None);
        assert!(!Task::Response.accepts(&unknown));
        assert!(Task::Response.conversation(&[], &unknown, true).is_none());
        let conv = Task::Response.conversation(&[], &unknown, false).unwrap();
        assert!(conv.messages[1].content.starts_with("Category: REFUND\n"));
    }
}
