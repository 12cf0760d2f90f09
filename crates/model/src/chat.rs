//! Chat templates: the checkpoint's own Jinja template rendered with minijinja, configured as Hugging Face
//! renders them (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`). ChatML is the
//! fallback only for a checkpoint without a template.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// ChatML, used only when a checkpoint ships no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template's source.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("the template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The tokenizer's template, or ChatML when it has none.
    pub fn for_tokenizer(tok: &Tokenizer) -> Result<Self> {
        Self::new(
            tok.chat_template.as_deref().unwrap_or(CHATML),
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )
    }

    /// Renders messages (anything serialising to `{"role": …, "content": …}`); with
    /// `add_generation_prompt` the text ends where the assistant's answer begins.
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| ModelError::Template(format!("rendering failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t
            .render(&[json!({"role": "user", "content": "hi"})], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[json!({"role": "user", "content": " a "})], false)
                .unwrap(),
            "A"
        );
        let e = t
            .render(&[json!({"role": "system", "content": "x"})], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("first must be user"), "{e}");
    }

    #[test]
    fn broken_template_is_an_error() {
        let e = ChatTemplate::new("{% for %}", None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not compile"), "{e}");
    }
}
