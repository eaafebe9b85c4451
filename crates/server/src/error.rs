//! API errors: an HTTP status and OpenAI's JSON error body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use radix_engine::EngineError;
use serde::Serialize;

/// Seconds a client is asked to wait when the queue is full.
pub const RETRY_AFTER_SECS: u32 = 1;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong: 400.
    #[error("{message}")]
    Invalid { message: String, param: Option<&'static str>, code: Option<&'static str> },
    /// The model named is not served: 400 (the issue asks 400; OpenAI itself answers 404).
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    /// `GET /v1/models/{id}` of a model not served: 404, as OpenAI answers.
    #[error("the model `{0}` does not exist")]
    NoSuchModel(String),
    /// Missing or wrong API key: 401.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// No such route: 404.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not for this method: 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body did not arrive within the body-read timeout: 408.
    #[error("{0}")]
    Timeout(String),
    /// The body is larger than the server accepts: 413.
    #[error("the request body is too large ({0})")]
    TooLarge(String),
    /// The body is not JSON (by its Content-Type): 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A request the HTTP layer refused before any route saw it (malformed, headers too
    /// large): its own status.
    #[error("{message}")]
    Http { status: StatusCode, message: String },
    /// The engine's queue is full: 429 with Retry-After.
    #[error("the server is busy ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The engine stopped or is stopping: 503 with Retry-After.
    #[error("{0}")]
    Unavailable(String),
    /// The engine failed the request: 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        Self::Invalid { message: message.into(), param: Some(param), code: None }
    }

    pub fn invalid_no_param(message: impl Into<String>) -> Self {
        Self::Invalid { message: message.into(), param: None, code: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) | Self::NoSuchModel(_) | Self::UnknownModel(_) => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Http { status, .. } => *status,
            Self::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body, as OpenAI writes it.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::Invalid { param, code, .. } => ("invalid_request_error", *param, *code),
            Self::UnknownModel(_) | Self::NoSuchModel(_) => {
                ("invalid_request_error", Some("model"), Some("model_not_found"))
            }
            Self::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            Self::MethodNotAllowed(_) => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            Self::Timeout(_) => ("invalid_request_error", None, Some("request_timeout")),
            Self::TooLarge(_) => ("invalid_request_error", None, Some("request_too_large")),
            Self::UnsupportedMediaType(_) => {
                ("invalid_request_error", None, Some("unsupported_media_type"))
            }
            Self::Http { .. } => ("invalid_request_error", None, None),
            Self::QueueFull(_) => ("rate_limit_exceeded", None, Some("queue_full")),
            Self::Unavailable(_) => ("server_error", None, Some("unavailable")),
            Self::Internal(_) => ("server_error", None, None),
        };
        ErrorBody { error: ErrorDetail { message: self.to_string(), kind, param, code } }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(e) => Self::invalid_no_param(e.to_string()),
            EngineError::QueueFull(n) => Self::QueueFull(n),
            EngineError::Config(m) => Self::Unavailable(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, axum::Json(self.body())).into_response();
        if matches!(self, Self::QueueFull(_) | Self::Unavailable(_)) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if matches!(self, Self::Timeout(_)) {
            // The rest of the body may still come: nothing more is read from this client.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Self::Unauthorized(_)) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
