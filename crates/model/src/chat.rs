//! Chat templates: the model's Jinja template from `tokenizer_config.json`, rendered with
//! minijinja (with Python string methods, as Hugging Face templates use them), or a plain
//! template for models without one.

use std::path::Path;

use minijinja::{Environment, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A plain template: `role: content` lines, then `assistant: ` to generate.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant: {% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Tokenizer(format!("chat template does not parse: {e}")))?;
        Ok(Self { env, bos_token, eos_token })
    }

    pub fn plain() -> Self {
        Self::new(PLAIN_TEMPLATE, String::new(), String::new()).expect("the plain template parses")
    }

    /// The template in `tokenizer_config.json`, if the folder has one.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let json: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::bad_file(&path, e))?;
        let source = match &json["chat_template"] {
            Value::String(s) => s.clone(),
            // A list of named templates: take "default".
            Value::Array(list) => match list.iter().find(|t| t["name"] == "default") {
                Some(t) => t["template"].as_str().unwrap_or_default().to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let token = |key: &str| match &json[key] {
            Value::String(s) => s.clone(),
            Value::Object(o) => {
                o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string()
            }
            _ => String::new(),
        };
        Self::new(&source, token("bos_token"), token("eos_token")).map(Some)
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::Invalid(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_plain_and_llama3_style_templates() {
        let msgs = vec![
            ChatMessage { role: "system".into(), content: "be brief".into() },
            ChatMessage { role: "user".into(), content: "hi".into() },
        ];
        assert_eq!(
            ChatTemplate::plain().render(&msgs, true).unwrap(),
            "system: be brief\nuser: hi\nassistant: "
        );
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}",
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let out = t.render(&msgs, true).unwrap();
        assert!(
            out.starts_with("<s><|start|>system\nbe brief<|eot|>") && out.ends_with("assistant\n"),
            "{out}"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}", String::new(), String::new()).unwrap();
        let m = |c: &str| ChatMessage { role: "user".into(), content: c.into() };
        assert_eq!(t.render(&[m("  hi ")], false).unwrap(), "HI");
        assert!(
            t.render(&[m("a"), m("b")], false)
                .unwrap_err()
                .to_string()
                .contains("one message only")
        );
    }
}
