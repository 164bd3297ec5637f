//! The model's own chat template, rendered as transformers renders it: Jinja (minijinja) with
//! `trim_blocks` and `lstrip_blocks`, Python's string methods, loop controls, and the
//! variables real templates read: `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, `enable_thinking` (Qwen3), `tools` (none), and the `raise_exception` and
//! `strftime_now` functions.

use minijinja::{Environment, Error, ErrorKind, Value, context};

use crate::error::error_chain;
use crate::request::ChatMessage;

const NAME: &str = "chat_template";

/// A compiled chat template with the special tokens it may name.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are the strings the template may insert.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError(error_chain(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        // Templates that date their system prompt (Llama 3.1) call this; a fixed date keeps
        // prompts, and so prefix caching and replays, the same from one day to the next.
        env.add_function("strftime_now", |_format: String| -> Value {
            Value::from("26 Jul 2024")
        });
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| TemplateError(error_chain(&e)))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The prompt text for `messages`, opening an assistant turn when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String, TemplateError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError(error_chain(&e)))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                enable_thinking => enable_thinking,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
                tools => Value::from(()),
            })
            .map_err(|e| TemplateError(error_chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ChatRole;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: ChatRole::System,
                content: "  Be brief.  ".into(),
            },
            ChatMessage {
                role: ChatRole::User,
                content: "Hi".into(),
            },
        ]
    }

    #[test]
    fn python_methods_blocks_and_variables_render() {
        let source = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'system' %}\n[{{ m.content.strip() }}]\n  {% else %}\n{{ m['role'].upper() }}: {{ m.content }}{{ eos_token }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}{% if enable_thinking is defined and enable_thinking is false %}<no-think>{% endif %}\n";
        let t = ChatTemplate::new(source, "<s>", "</s>").expect("compiles");
        assert_eq!(
            t.render(&msgs(), true, false).expect("renders"),
            "<s>[Be brief.]\nUSER: Hi</s>\nA:<no-think>"
        );
        assert_eq!(
            t.render(&msgs(), false, true).expect("renders"),
            "<s>[Be brief.]\nUSER: Hi</s>\n"
        );
    }

    #[test]
    fn raise_exception_and_bad_templates_are_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}",
            "",
            "",
        )
        .expect("compiles");
        let e = t.render(&msgs(), true, false).expect_err("raises");
        assert!(e.to_string().contains("user first"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
