//! API keys: with a key set, `/v1/*` needs `Authorization: Bearer <key>` (401 otherwise).
//! `/health` and `/metrics` stay open, as in vLLM.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a request's `Authorization` header against `key`.
pub fn check(key: &str, authorization: Option<&[u8]>) -> Result<(), ApiError> {
    let Some(value) = authorization else {
        return Err(ApiError::Unauthorized(
            "missing API key: send it as `Authorization: Bearer <key>`",
        ));
    };
    // Auth schemes are case-insensitive (RFC 9110, 11.1): `BEARER k` is `Bearer k`.
    let value = value.trim_ascii();
    let token = match value.iter().position(|&b| b == b' ') {
        Some(at) if value[..at].eq_ignore_ascii_case(b"bearer") => &value[at + 1..],
        _ => return Err(ApiError::Unauthorized("invalid API key")),
    };
    if same(token.trim_ascii(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("invalid API key"))
    }
}

pub async fn require_api_key(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &app.config.api_key {
        let header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if let Err(e) = check(key, header) {
            return e.into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        assert!(check("k1", Some(b"Bearer k1")).is_ok());
        assert!(check("k1", Some(b"bearer k1 ")).is_ok());
        assert!(check("k1", Some(b"BEARER k1")).is_ok());
        assert!(check("k1", Some(b"bEaReR  k1")).is_ok());
        assert!(check("k1", Some(b"Basic k1")).is_err());
        assert!(check("k1", Some(b"Bearerk1")).is_err());
        assert!(check("k1", Some(b"Bearer k2")).is_err());
        assert!(check("k1", Some(b"Bearer k1x")).is_err());
        assert!(check("k1", Some(b"k1")).is_err());
        assert!(check("k1", None).is_err());
    }
}
