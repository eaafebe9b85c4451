//! Structured output in requests: which field asks for which grammar, compiled here (on
//! the request's blocking task, never on the engine thread) so that a bad schema, regex
//! or grammar is a 400 naming its field.
//!
//! Accepted, one at a time: OpenAI's `response_format` (`text`, `json_object`,
//! `json_schema` with `json_schema.schema`), vLLM's `structured_outputs` object (`json`,
//! `regex`, `choice`, `grammar`, `json_object`) and its older top-level fields
//! (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`).

use radix_engine::{Constraint, ConstraintSpec, Grammars};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::validate::fields::{Fields, type_name};

type Result<T> = std::result::Result<T, ApiError>;

/// What the request asks its output to match, with the field that asked.
pub fn parse(f: &Fields) -> Result<Option<(ConstraintSpec, &'static str)>> {
    let mut found: Vec<(ConstraintSpec, &'static str)> = Vec::new();
    if let Some(spec) = response_format(f.get("response_format"))? {
        found.push((spec, "response_format"));
    }
    if let Some(v) = f.get("structured_outputs") {
        found.extend(structured_outputs(v)?.map(|s| (s, "structured_outputs")));
    }
    for (key, kind) in [
        ("guided_json", Kind::Json),
        ("guided_regex", Kind::Regex),
        ("guided_choice", Kind::Choice),
        ("guided_grammar", Kind::Grammar),
    ] {
        if let Some(v) = f.get(key).filter(|v| !v.is_null()) {
            found.push((kind.spec(v, key)?, key));
        }
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => {
            let names: Vec<&str> = found.iter().map(|(_, p)| *p).collect();
            Err(ApiError::invalid(
                format!("ask for one structured output at a time (got {})", names.join(", ")),
                found[1].1,
            ))
        }
    }
}

/// Compiles `spec` over the model's vocabulary; the error names `param`.
pub fn compile(
    grammars: &Grammars,
    spec: &ConstraintSpec,
    param: &'static str,
) -> Result<Constraint> {
    grammars.compile(spec).map_err(|e| ApiError::invalid(format!("{param}: {e}"), param))
}

#[derive(Clone, Copy)]
enum Kind {
    Json,
    Regex,
    Choice,
    Grammar,
}

impl Kind {
    fn spec(self, v: &Value, param: &'static str) -> Result<ConstraintSpec> {
        let bad = |what: &str| ApiError::invalid(format!("{param} must be {what}"), param);
        Ok(match self {
            // vLLM takes a schema object or its JSON text.
            Self::Json => match v {
                Value::Object(_) => ConstraintSpec::Json(v.clone()),
                Value::String(s) => ConstraintSpec::Json(serde_json::from_str(s).map_err(|e| {
                    ApiError::invalid(format!("{param} is not valid JSON: {e}"), param)
                })?),
                _ => return Err(bad("a JSON schema (an object or its JSON text)")),
            },
            Self::Regex => ConstraintSpec::Regex(v.as_str().ok_or_else(|| bad("a string"))?.into()),
            Self::Grammar => {
                ConstraintSpec::Grammar(v.as_str().ok_or_else(|| bad("a string"))?.into())
            }
            Self::Choice => {
                let list = v.as_array().ok_or_else(|| bad("a list of strings"))?;
                let choices = list
                    .iter()
                    .map(|c| c.as_str().map(String::from).ok_or_else(|| bad("a list of strings")))
                    .collect::<Result<Vec<_>>>()?;
                if choices.is_empty() {
                    return Err(bad("a non-empty list of strings"));
                }
                ConstraintSpec::Choice(choices)
            }
        })
    }
}

/// `structured_outputs`: an object with exactly one of its kinds set.
fn structured_outputs(v: &Value) -> Result<Option<ConstraintSpec>> {
    const P: &str = "structured_outputs";
    let Value::Object(o) = v else {
        if v.is_null() {
            return Ok(None);
        }
        return Err(ApiError::invalid(format!("{P} must be an object, got {}", type_name(v)), P));
    };
    let mut specs = Vec::new();
    for (key, kind) in [
        ("json", Kind::Json),
        ("regex", Kind::Regex),
        ("choice", Kind::Choice),
        ("grammar", Kind::Grammar),
    ] {
        if let Some(v) = o.get(key).filter(|v| !v.is_null()) {
            specs.push(kind.spec(v, P)?);
        }
    }
    if o.get("json_object").and_then(Value::as_bool) == Some(true) {
        specs.push(ConstraintSpec::JsonObject);
    }
    for key in o.keys() {
        if !matches!(
            key.as_str(),
            "json"
                | "regex"
                | "choice"
                | "grammar"
                | "json_object"
                | "disable_fallback"
                | "disable_any_whitespace"
                | "disable_additional_properties"
        ) {
            return Err(ApiError::invalid(
                format!("{P}.{key} is not supported (json, regex, choice, grammar, json_object)"),
                P,
            ));
        }
    }
    match specs.len() {
        0 => Ok(None),
        1 => Ok(specs.pop()),
        _ => Err(ApiError::invalid(format!("{P} must set exactly one kind"), P)),
    }
}

/// `response_format`: `text` (no constraint), `json_object`, or `json_schema`.
fn response_format(v: Option<&Value>) -> Result<Option<ConstraintSpec>> {
    const P: &str = "response_format";
    let o: &Map<String, Value> = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("{P} must be an object, got {}", type_name(other)),
                P,
            ));
        }
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ConstraintSpec::JsonObject)),
        Some("json_schema") => {
            let Some(Value::Object(js)) = o.get("json_schema") else {
                return Err(ApiError::invalid(
                    format!("{P}.json_schema must be an object with a `schema`"),
                    P,
                ));
            };
            match js.get("schema") {
                Some(schema @ Value::Object(_)) => Ok(Some(ConstraintSpec::Json(schema.clone()))),
                // OpenAI: no schema means any JSON object.
                None | Some(Value::Null) => Ok(Some(ConstraintSpec::JsonObject)),
                Some(other) => Err(ApiError::invalid(
                    format!("{P}.json_schema.schema must be an object, got {}", type_name(other)),
                    P,
                )),
            }
        }
        Some(other) => Err(ApiError::invalid(
            format!("{P}.type must be text, json_object or json_schema, got {other:?}"),
            P,
        )),
        None => Err(ApiError::invalid(format!("{P} needs a `type`"), P)),
    }
}
