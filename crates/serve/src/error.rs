//! What can go wrong serving a request, and the HTTP status each maps to.

/// A request that cannot be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// The body is not the JSON the endpoint takes (the message names the field).
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than `--max-body-bytes`.
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    /// The prompt and the asked tokens do not fit the model's context.
    #[error(
        "the prompt has {prompt_tokens} tokens and {max_tokens} new tokens were asked for; the model's context is {context} tokens"
    )]
    TooLong {
        /// Prompt tokens (or bytes, before tokenizing).
        prompt_tokens: usize,
        /// Tokens asked for.
        max_tokens: usize,
        /// The model's context.
        context: usize,
    },
    /// No adapter or model of that name is loaded.
    #[error("no model or adapter named `{0}` is loaded")]
    UnknownModel(String),
    /// No valid bearer key.
    #[error("this server needs an API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The queue is full.
    #[error("the server is busy (its queue is full); retry shortly")]
    QueueFull,
    /// The request took longer than `--request-timeout-s`.
    #[error("the request took longer than {0} s")]
    Timeout(u64),
    /// The server is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The model refused the input.
    #[error("{0}")]
    Model(String),
    /// A bug in supportlm.
    #[error("internal error (a bug in supportlm): {0}")]
    Internal(String),
}

impl ServeError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            ServeError::BadRequest(_) | ServeError::TooLong { .. } | ServeError::Model(_) => 400,
            ServeError::Unauthorized => 401,
            ServeError::UnknownModel(_) => 404,
            ServeError::TooLarge(_) => 413,
            ServeError::Internal(_) => 500,
            ServeError::QueueFull | ServeError::ShuttingDown => 503,
            ServeError::Timeout(_) => 504,
        }
    }

    /// OpenAI's error `type` for it.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::BadRequest(_) | ServeError::TooLong { .. } | ServeError::Model(_) => {
                "invalid_request_error"
            }
            ServeError::TooLarge(_) => "invalid_request_error",
            ServeError::Unauthorized => "authentication_error",
            ServeError::UnknownModel(_) => "not_found_error",
            ServeError::QueueFull | ServeError::ShuttingDown => "server_busy",
            ServeError::Timeout(_) => "timeout",
            ServeError::Internal(_) => "server_error",
        }
    }
}

impl From<supportlm_model::ModelError> for ServeError {
    fn from(e: supportlm_model::ModelError) -> Self {
        match e {
            supportlm_model::ModelError::Internal(m) => ServeError::Internal(m),
            other => ServeError::Model(other.to_string()),
        }
    }
}

impl From<supportlm_prompting::PromptError> for ServeError {
    fn from(e: supportlm_prompting::PromptError) -> Self {
        ServeError::Model(e.to_string())
    }
}
