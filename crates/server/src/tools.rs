//! Tool calling: the request's `tools` / `tool_choice` / `parallel_tool_calls`, the
//! grammar that enforces `required` and named choices, and the model's text parsed back
//! into OpenAI `tool_calls`, whole or as a stream.
//!
//! Two output formats, named as vLLM's `--tool-call-parser` names them:
//! - `hermes` (Hermes, Qwen 2.5/3, and our default for ChatML templates):
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call.
//! - `llama3_json` (Llama 3.1/3.2): `{"name": ..., "parameters": {...}}`, optionally after
//!   `<|python_tag|>`, several separated by `;`.
//!
//! Without `--tool-call-parser` the format is read from the chat template's markers.

use radix_engine::ConstraintSpec;
use radix_model::ChatMessage;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::validate::fields::{Fields, type_name};

type Result<T> = std::result::Result<T, ApiError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolParser {
    Llama3Json,
    Hermes,
}

impl ToolParser {
    /// vLLM's names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama3_json" | "llama3" | "llama" => Some(Self::Llama3Json),
            "hermes" | "qwen" => Some(Self::Hermes),
            _ => None,
        }
    }

    /// The format a chat template writes calls in: Llama 3.1's `<|python_tag|>` or its
    /// `"parameters"` instruction, else Hermes (which ChatML templates without tools
    /// are taught by the system message `describe` writes).
    pub fn detect(template: &str) -> Self {
        let llama = template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("parameters"));
        if llama && !template.contains("<tool_call>") { Self::Llama3Json } else { Self::Hermes }
    }

    /// The key the arguments go under.
    fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3Json => "parameters",
            Self::Hermes => "arguments",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools, validated.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The request's list as given (the template's `tools`).
    pub raw: Value,
    /// (name, parameters schema) per function.
    pub functions: Vec<(String, Value)>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

fn bad(msg: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::invalid(msg, param)
}

/// `tools`, `tool_choice`, `parallel_tool_calls`; None when no tools are declared (and
/// `tool_choice` is absent or `none`).
pub fn parse(f: &Fields) -> Result<Option<Tools>> {
    let list = match f.get("tools") {
        None => Vec::new(),
        Some(Value::Array(l)) => l.clone(),
        Some(other) => {
            return Err(bad(format!("tools must be a list, got {}", type_name(other)), "tools"));
        }
    };
    let mut functions = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let at = |what: &str| bad(format!("tools[{i}]: {what}"), "tools");
        let Value::Object(t) = t else { return Err(at("must be an object")) };
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(at("type must be \"function\""));
        }
        let Some(Value::Object(func)) = t.get("function") else {
            return Err(at("function must be an object"));
        };
        let name = match func.get("name") {
            Some(Value::String(n)) if valid_name(n) => n.clone(),
            _ => {
                return Err(at(
                    "function.name must be 1 to 64 letters, digits, underscores or dashes",
                ));
            }
        };
        if functions.iter().any(|(n, _)| *n == name) {
            return Err(at(&format!("function {name:?} is declared twice")));
        }
        let params = match func.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(other) => {
                return Err(at(&format!(
                    "function.parameters must be a JSON schema object, got {}",
                    type_name(other)
                )));
            }
        };
        functions.push((name, params));
    }
    let choice = match f.get("tool_choice") {
        None if functions.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    format!(
                        "tool_choice must be none, auto, required or a function, got {other:?}"
                    ),
                    "tool_choice",
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) => ToolChoice::Named(n.to_string()),
                _ => {
                    return Err(bad(
                        "tool_choice as an object must be {\"type\": \"function\", \
                         \"function\": {\"name\": ...}}",
                        "tool_choice",
                    ));
                }
            }
        }
        Some(other) => {
            return Err(bad(
                format!("tool_choice must be a string or an object, got {}", type_name(other)),
                "tool_choice",
            ));
        }
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Named(_) if functions.is_empty() => {
            return Err(bad("tool_choice needs tools to choose from", "tool_choice"));
        }
        ToolChoice::Named(n) if !functions.iter().any(|(f, _)| f == n) => {
            return Err(bad(
                format!("tool_choice names {n:?}, which is not in tools"),
                "tool_choice",
            ));
        }
        _ => {}
    }
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    if choice == ToolChoice::None {
        return Ok(None);
    }
    Ok(Some(Tools { raw: Value::Array(list), functions, choice, parallel }))
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    pub fn names(&self) -> Vec<String> {
        self.functions.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The grammar of `required` and named choices (None for `auto`): one call (several
    /// with `parallel_tool_calls`) to the allowed functions, in `parser`'s format, with
    /// arguments that follow the function's parameter schema.
    pub fn grammar(&self, parser: ToolParser) -> Option<ConstraintSpec> {
        let allowed: Vec<&(String, Value)> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Named(n) => self.functions.iter().filter(|(f, _)| f == n).collect(),
        };
        let key = parser.arguments_key();
        let calls: Vec<Value> = allowed
            .iter()
            .map(|(name, params)| {
                // Arguments are the declared parameters: where the schema does not say,
                // no others (else a model goes on inventing keys until max_tokens).
                let mut params = params.clone();
                if let Value::Object(p) = &mut params
                    && p.contains_key("properties")
                {
                    p.entry("additionalProperties").or_insert(Value::Bool(false));
                }
                json!({"type": "object", "properties": {"name": {"const": name}, key: params},
                    "required": ["name", key], "additionalProperties": false})
            })
            .collect();
        let mut schema = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
        schema["x-guidance"] = radix_engine::json_layout();
        let one = format!("%json {schema}");
        let (call, sep) = match parser {
            ToolParser::Hermes => {
                (format!("\"<tool_call>\\n\" {one} \"\\n</tool_call>\""), "\"\\n\"")
            }
            ToolParser::Llama3Json => (one, "\"; \""),
        };
        let start = if self.parallel { format!("call ({sep} call)*") } else { "call".into() };
        Some(ConstraintSpec::Grammar(format!("start: {start}\ncall: {call}\n")))
    }

    /// The messages the template gets: when the template knows nothing of tools, a
    /// system message describes them in `parser`'s format, and earlier calls are written
    /// into their assistant message's text.
    pub fn prepare_messages(
        &self,
        template: &str,
        parser: ToolParser,
        messages: &mut Vec<ChatMessage>,
    ) {
        if !template.contains("tool_calls") {
            for m in messages.iter_mut() {
                if let Some(Value::Array(calls)) = &m.tool_calls {
                    for c in calls {
                        let f = &c["function"];
                        let call =
                            json!({"name": f["name"], parser.arguments_key(): f["arguments"]});
                        m.content.push_str(&format_call(parser, &call));
                    }
                }
            }
        }
        if template.contains("tools") {
            return;
        }
        let text = describe(&self.raw, parser);
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
            _ => messages.insert(0, ChatMessage::new("system", text)),
        }
    }
}

fn format_call(parser: ToolParser, call: &Value) -> String {
    match parser {
        ToolParser::Hermes => format!("<tool_call>\n{call}\n</tool_call>"),
        ToolParser::Llama3Json => call.to_string(),
    }
}

/// Instructions for templates without tool support (Hermes' own wording, shortened).
fn describe(tools: &Value, parser: ToolParser) -> String {
    let sigs: Vec<String> = tools
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t.get("function").unwrap_or(t).to_string())
        .collect();
    match parser {
        ToolParser::Hermes => format!(
            "You may call one or more functions to assist with the user query. The \
             functions are within <tools></tools>:\n<tools>\n{}\n</tools>\nFor each call, \
             return a JSON object with the function name and arguments within \
             <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \
             \"arguments\": <args-json-object>}}\n</tool_call>",
            sigs.join("\n")
        ),
        ToolParser::Llama3Json => format!(
            "You have access to these functions:\n{}\nTo call one, respond only with JSON \
             of the form {{\"name\": function name, \"parameters\": dictionary of argument \
             name and value}}.",
            sigs.join("\n")
        ),
    }
}

/// One call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A call object (`{"name", "arguments" | "parameters"}`) to a declared function.
fn call_of(v: &Value, names: &[String]) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?;
    if !names.iter().any(|n| n == name) {
        return None;
    }
    let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(json!({}));
    // Some models write the arguments as JSON text already.
    let args = match args {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        a => a,
    };
    Some(ParsedCall { name: name.to_string(), arguments: args.to_string() })
}

/// The model's whole output split into content and calls. Text that does not parse as
/// calls to declared functions stays content.
pub fn parse_output(
    parser: ToolParser,
    text: &str,
    names: &[String],
) -> (Option<String>, Vec<ParsedCall>) {
    let content = |s: &str| (!s.trim().is_empty()).then(|| s.to_string());
    match parser {
        ToolParser::Hermes => {
            let mut calls = Vec::new();
            let mut rest = String::new();
            let mut s = text;
            while let Some(start) = s.find("<tool_call>") {
                rest.push_str(&s[..start]);
                let body = &s[start + "<tool_call>".len()..];
                let (inner, after) = match body.find("</tool_call>") {
                    Some(end) => (&body[..end], &body[end + "</tool_call>".len()..]),
                    None => (body, ""),
                };
                match serde_json::from_str::<Value>(inner.trim())
                    .ok()
                    .and_then(|v| call_of(&v, names))
                {
                    Some(c) => calls.push(c),
                    None => rest.push_str(&s[start..s.len() - after.len()]),
                }
                s = after;
            }
            rest.push_str(s);
            (content(&rest), calls)
        }
        ToolParser::Llama3Json => {
            let body = text.trim_start();
            let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
            if !body.starts_with('{') {
                return (content(text), Vec::new());
            }
            let mut calls = Vec::new();
            for part in split_calls(body) {
                match serde_json::from_str::<Value>(part).ok().and_then(|v| call_of(&v, names)) {
                    Some(c) => calls.push(c),
                    None => return (content(text), Vec::new()),
                }
            }
            (None, calls)
        }
    }
}

/// Splits `{..}; {..}` at the top-level semicolons (outside strings and brackets).
fn split_calls(s: &str) -> Vec<&str> {
    let (mut depth, mut in_str, mut escaped, mut start) = (0i32, false, false, 0);
    let mut parts = Vec::new();
    for (i, c) in s.char_indices() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ';' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(s[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

/// What a streamed piece of output becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Content(String),
    Call(ParsedCall),
}

/// Streaming: text that cannot be part of a call goes out as content at once; a call is
/// held until it is complete (a Hermes block closed, or the end of a Llama output), then
/// goes out as OpenAI tool-call deltas.
#[derive(Clone, Debug)]
pub struct ToolStream {
    parser: ToolParser,
    names: Vec<String>,
    held: String,
    /// Llama format: the output did not start as a call, so all of it is content.
    plain: bool,
    pub calls_sent: usize,
}

impl ToolStream {
    pub fn new(parser: ToolParser, names: Vec<String>) -> Self {
        Self { parser, names, held: String::new(), plain: false, calls_sent: 0 }
    }

    pub fn push(&mut self, text: &str, finished: bool) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        match self.parser {
            ToolParser::Hermes => loop {
                if let Some(start) = self.held.find("<tool_call>") {
                    if start > 0 {
                        out.push(Piece::Content(self.held[..start].to_string()));
                        self.held.drain(..start);
                    }
                    let Some(end) = self.held.find("</tool_call>") else { break };
                    let block: String = self.held.drain(..end + "</tool_call>".len()).collect();
                    self.emit(&block, &mut out);
                } else {
                    // Hold back what could be the start of "<tool_call>".
                    let keep = partial_suffix(&self.held, "<tool_call>");
                    let cut = self.held.len() - keep;
                    if cut > 0 {
                        out.push(Piece::Content(self.held[..cut].to_string()));
                        self.held.drain(..cut);
                    }
                    break;
                }
            },
            ToolParser::Llama3Json => {
                if !self.plain {
                    let t = self.held.trim_start();
                    let could_be_call = t.is_empty()
                        || t.starts_with('{')
                        || t.starts_with("<|python_tag|>")
                        || "<|python_tag|>".starts_with(t);
                    if !could_be_call {
                        self.plain = true;
                    }
                }
                if self.plain {
                    out.push(Piece::Content(std::mem::take(&mut self.held)));
                }
            }
        }
        if finished && !self.held.is_empty() {
            let rest = std::mem::take(&mut self.held);
            self.emit(&rest, &mut out);
        }
        out.retain(|p| !matches!(p, Piece::Content(c) if c.is_empty()));
        out
    }

    fn emit(&mut self, text: &str, out: &mut Vec<Piece>) {
        let (content, calls) = parse_output(self.parser, text, &self.names);
        if calls.is_empty() {
            out.push(Piece::Content(text.to_string()));
            return;
        }
        if let Some(c) = content {
            out.push(Piece::Content(c));
        }
        self.calls_sent += calls.len();
        out.extend(calls.into_iter().map(Piece::Call));
    }
}

/// The longest suffix of `s` that is a proper prefix of `marker` (bytes to hold back).
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "add".into()]
    }

    #[test]
    fn parses_both_formats_and_leaves_other_text_alone() {
        let text = "Sure.<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        let (content, calls) = parse_output(ToolParser::Hermes, text, &names());
        assert_eq!(content.as_deref(), Some("Sure."));
        assert_eq!(calls, vec![ParsedCall { name: "add".into(), arguments: "{\"a\":1}".into() }]);
        let text = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; \
                    {\"name\": \"add\", \"parameters\": {}}";
        let (content, calls) = parse_output(ToolParser::Llama3Json, text, &names());
        assert_eq!(content, None);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, "{\"city\":\"Oslo\"}");
        // Unknown functions and broken JSON stay text.
        let (content, calls) = parse_output(
            ToolParser::Llama3Json,
            "{\"name\": \"rm\", \"parameters\": {}}",
            &names(),
        );
        assert!(calls.is_empty() && content.is_some());
        assert!(
            parse_output(ToolParser::Hermes, "<tool_call>{oops</tool_call>", &names()).1.is_empty()
        );
    }

    #[test]
    fn streams_content_at_once_and_calls_when_complete() {
        let mut s = ToolStream::new(ToolParser::Hermes, names());
        assert_eq!(s.push("Hi <tool", false), vec![Piece::Content("Hi ".into())]);
        assert_eq!(s.push("_call>{\"name\": \"add\", ", false), vec![]);
        let out = s.push("\"arguments\": {}}</tool_call>", false);
        assert_eq!(
            out,
            vec![Piece::Call(ParsedCall { name: "add".into(), arguments: "{}".into() })]
        );
        assert_eq!(s.push("", true), vec![]);
        let mut s = ToolStream::new(ToolParser::Llama3Json, names());
        assert_eq!(s.push(" {\"name\": \"add\",", false), vec![]);
        assert_eq!(s.push(" \"parameters\": {}}", true).len(), 1);
        let mut s = ToolStream::new(ToolParser::Llama3Json, names());
        assert_eq!(s.push("Hello", false), vec![Piece::Content("Hello".into())]);
    }

    #[test]
    fn detects_the_format_from_the_template() {
        assert_eq!(ToolParser::detect("{{ '<|python_tag|>' }}"), ToolParser::Llama3Json);
        assert_eq!(ToolParser::detect("<tool_call>\n{{ t }}"), ToolParser::Hermes);
        assert_eq!(ToolParser::detect("<|im_start|>"), ToolParser::Hermes);
    }
}
