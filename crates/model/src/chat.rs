//! Chat templates: the model's Jinja template from `tokenizer_config.json`, rendered with
//! minijinja (with Python string methods, as Hugging Face templates use them), or a plain
//! template for models without one.

use std::path::Path;

use minijinja::{Environment, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// One message as the template sees it. Tool calling adds an assistant's `tool_calls`
/// (OpenAI's list of `{id, type, function: {name, arguments}}`) and a tool result's
/// `tool_call_id` / `name`; absent fields are undefined in the template, as templates
/// test them (`message.tool_calls is defined`).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), ..Default::default() }
    }
}

/// A plain template: `role: content` lines, then `assistant: ` to generate.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant: {% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
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
        Ok(Self { env, source: source.to_string(), bos_token, eos_token })
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

    /// The template's text (tool calling reads its markers to pick an output format).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// Renders with `tools` (OpenAI's list of `{type: "function", function: {...}}`) in
    /// the context, as Hugging Face's `apply_chat_template(tools=...)` does.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&Value>,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => tools,
        })
        .map_err(|e| ModelError::Invalid(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_plain_and_llama3_style_templates() {
        let msgs = vec![ChatMessage::new("system", "be brief"), ChatMessage::new("user", "hi")];
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
    fn tools_and_tool_messages_reach_the_template() {
        let t = ChatTemplate::new(
            "{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}\
             {% for m in messages %}{{ m.role }}:{% if m.tool_calls is defined %}\
             {{ m.tool_calls[0].function.name }}{% endif %}{% if m.tool_call_id is defined %}\
             #{{ m.tool_call_id }}{% endif %}{{ m.content }};{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let call = serde_json::json!([{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]);
        let msgs = vec![
            ChatMessage::new("user", "hi"),
            ChatMessage { tool_calls: Some(call), ..ChatMessage::new("assistant", "") },
            ChatMessage { tool_call_id: Some("c1".into()), ..ChatMessage::new("tool", "42") },
        ];
        assert_eq!(
            t.render_with_tools(&msgs, false, Some(&tools)).unwrap(),
            "[f]user:hi;assistant:f;tool:#c142;"
        );
        assert_eq!(t.render(&msgs[..1], false).unwrap(), "user:hi;");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}", String::new(), String::new()).unwrap();
        let m = |c: &str| ChatMessage::new("user", c);
        assert_eq!(t.render(&[m("  hi ")], false).unwrap(), "HI");
        assert!(
            t.render(&[m("a"), m("b")], false)
                .unwrap_err()
                .to_string()
                .contains("one message only")
        );
    }
}
