//! Typed access to the fields of a request's JSON object: each accessor names the field
//! in its 400 when the value has the wrong type.

use serde_json::{Map, Value};

use crate::error::ApiError;

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Typed access to a JSON object's fields; null counts as absent (as OpenAI treats it).
pub(crate) struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn wrong(key: &'static str, want: &str, got: &Value) -> ApiError {
        ApiError::invalid(format!("{key} must be {want}, got {}", type_name(got)), key)
    }

    pub fn bool(&self, key: &'static str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::wrong(key, "a boolean", v)),
        }
    }

    pub fn string(&self, key: &'static str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::wrong(key, "a string", v)),
        }
    }

    /// A finite number.
    pub fn number(&self, key: &'static str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(x)) => match x.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(ApiError::invalid(format!("{key} must be a finite number"), key)),
            },
            Some(v) => Err(Self::wrong(key, "a number", v)),
        }
    }

    /// An integer (any sign; beyond i64 saturates, so range checks name the value's
    /// sign). JSON has one number type: `2.0` and `1e3` are integers too, as Python's
    /// clients and pydantic see them, and so is 2^64, which serde reads as a float.
    pub fn int(&self, key: &'static str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(x)) => match (x.as_i64(), x.as_u64(), x.as_f64()) {
                (Some(i), _, _) => Ok(Some(i)),
                (None, Some(_), _) => Ok(Some(i64::MAX)),
                // `as` saturates at the i64 range.
                (None, None, Some(f)) if f.is_finite() && f.fract() == 0.0 => Ok(Some(f as i64)),
                _ => Err(ApiError::invalid(format!("{key} must be an integer"), key)),
            },
            Some(v) => Err(Self::wrong(key, "an integer", v)),
        }
    }

    /// `max_tokens`: an integer >= 1.
    pub fn max_tokens(&self, key: &'static str) -> Result<Option<u64>> {
        match self.int(key)? {
            None => Ok(None),
            Some(m) if m >= 1 => self.uint(key),
            Some(m) => Err(ApiError::invalid(format!("{key} must be at least 1, got {m}"), key)),
        }
    }

    /// A non-negative integer (beyond u64 saturates).
    pub fn uint(&self, key: &'static str) -> Result<Option<u64>> {
        match self.int(key)? {
            None => Ok(None),
            Some(i) if i < 0 => {
                Err(ApiError::invalid(format!("{key} must be a non-negative integer"), key))
            }
            Some(i64::MAX) => Ok(Some(self.get(key).and_then(Value::as_u64).unwrap_or(u64::MAX))),
            Some(i) => Ok(Some(i as u64)),
        }
    }
}
