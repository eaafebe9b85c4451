//! The route handlers: completions and chat (JSON bodies only, read under the body-read
//! timeout), the model list and card, health, metrics, and the fallbacks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::validate::{self, Endpoint};
use crate::{AppState, api, chat, completions, generation, sse};

pub async fn completions_handler(State(app): State<Arc<AppState>>, req: Request) -> Response {
    generate(app, Endpoint::Completions, req).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn chat_handler(State(app): State<Arc<AppState>>, req: Request) -> Response {
    generate(app, Endpoint::Chat, req).await.unwrap_or_else(IntoResponse::into_response)
}

/// Refuses bodies that are not JSON by their Content-Type. A browser may send a
/// cross-site "simple" POST (text/plain, form-encoded) without asking first; serving it
/// would let any web page start generations on an unauthenticated local server.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
    let mime = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match mime.as_deref() {
        Some("application/json") => Ok(()),
        Some(m) if m.starts_with("application/") && m.ends_with("+json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType(format!(
            "the request body must be JSON, sent with `Content-Type: application/json` (got {})",
            content_type.map_or_else(|| "no Content-Type".to_string(), |c| format!("`{c}`"))
        ))),
    }
}

/// Reads a whole body within the body-read timeout and the size limit.
async fn read_body(app: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = app.config.max_body_bytes;
    let timeout = app.config.connections.body_read_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::Timeout(format!(
            "the request body did not arrive within {} s",
            timeout.as_secs_f64()
        ))),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let too_large =
                std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                    .any(|e| e.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                ApiError::TooLarge(format!("at most {limit} bytes"))
            } else {
                ApiError::invalid_no_param(format!("reading the request body: {e}"))
            })
        }
    }
}

/// Parses, submits, and answers (streaming or not).
async fn generate(
    app: Arc<AppState>,
    endpoint: Endpoint,
    req: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    if app.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable("the server is shutting down".into()));
    }
    require_json(req.headers())?;
    let body = read_body(&app, req.into_body()).await?;
    // Tokenizing and the engine's acknowledgement block: off the async workers.
    let state = app.clone();
    let generation = tokio::task::spawn_blocking(move || {
        let ctx = state.model_context();
        let parsed = match endpoint {
            Endpoint::Completions => validate::parse_completion(&body, &ctx)?,
            Endpoint::Chat => validate::parse_chat(&body, &ctx)?,
        };
        generation::Generation::submit(&state.handle, &state.metrics, parsed, started)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("request task failed: {e}")))??;
    let tokenizer = app.handle.info().tokenizer.clone();
    if generation.meta.shape.stream {
        return Ok(sse::respond(generation, tokenizer));
    }
    let collected = generation.collect().await?;
    Ok(match endpoint {
        Endpoint::Completions => {
            axum::Json(completions::response(collected, &tokenizer)).into_response()
        }
        Endpoint::Chat => axum::Json(chat::response(collected, &tokenizer)).into_response(),
    })
}

fn model_card(app: &AppState, id: &str) -> api::ModelCard {
    api::ModelCard {
        id: id.to_string(),
        object: "model",
        created: app.created,
        owned_by: "radix-sparse",
        max_model_len: app.handle.info().rules.max_model_len,
    }
}

/// The served model's names: the engine's first, then the aliases.
fn model_names(app: &AppState) -> impl Iterator<Item = &str> {
    std::iter::once(app.handle.info().model_name.as_str())
        .chain(app.config.model_aliases.iter().map(String::as_str))
}

pub async fn models_handler(State(app): State<Arc<AppState>>) -> Response {
    let data = model_names(&app).map(|name| model_card(&app, name)).collect();
    axum::Json(api::ModelList { object: "list", data }).into_response()
}

/// `GET /v1/models/{id}` (the client's `models.retrieve`); ids may hold slashes.
pub async fn model_handler(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if !model_names(&app).any(|name| name == id) {
        return ApiError::NoSuchModel(id).into_response();
    }
    axum::Json(model_card(&app, &id)).into_response()
}

pub async fn health_handler(State(app): State<Arc<AppState>>) -> Response {
    if app.shutting_down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

pub async fn metrics_handler(State(app): State<Arc<AppState>>) -> Response {
    let text = app.metrics.render(&app.handle.stats(), &app.handle.info().model_name);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

pub async fn not_found(req: Request) -> Response {
    ApiError::NotFound(format!("no route for {} {}", req.method(), req.uri().path()))
        .into_response()
}

pub async fn method_not_allowed(req: Request) -> Response {
    ApiError::MethodNotAllowed(format!("{} is not allowed on {}", req.method(), req.uri().path()))
        .into_response()
}

/// Counts responses by route and status for `/metrics`.
pub async fn count_responses(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    const ROUTES: [&str; 6] = [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{*id}",
        "/health",
        "/metrics",
    ];
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let resp = next.run(req).await;
    let route = path.and_then(|p| ROUTES.into_iter().find(|r| *r == p)).unwrap_or("other");
    app.metrics.count_response(route, resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_bodies_are_read() {
        let with = |ct: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            }
            require_json(&h).map_err(|e| e.status().as_u16())
        };
        assert_eq!(with(Some("application/json")), Ok(()));
        assert_eq!(with(Some("Application/JSON; charset=utf-8")), Ok(()));
        assert_eq!(with(Some("application/vnd.api+json")), Ok(()));
        for ct in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
            assert_eq!(with(ct), Err(415), "{ct:?}");
        }
        assert_eq!(with(Some("multipart/form-data; boundary=x")), Err(415));
    }
}
