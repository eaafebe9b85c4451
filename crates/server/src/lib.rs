//! radix-sparse's OpenAI-compatible HTTP server (axum).
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both stream with
//! `"stream": true` as server-sent events), `GET /v1/models`, `GET /health`,
//! `GET /metrics` (Prometheus text).
//!
//! The server talks to the engine only through an `EngineHandle` (channels; no GPU types
//! cross). Each HTTP request becomes one engine request per choice; when the client goes
//! away, the response future or SSE stream is dropped and its requests are aborted, which
//! unlocks their prefix-cache nodes and frees their pages. Shutdown: stop accepting, give
//! in-flight requests a grace period, then abort what is left.

mod api;
mod auth;
mod chat;
mod completions;
mod error;
mod generation;
mod metrics;
mod sse;
pub mod validate;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use radix_engine::EngineHandle;
use radix_model::ChatTemplate;
use tokio::net::TcpListener;

pub use api::Usage;
pub use error::ApiError;
pub use metrics::Metrics;
use validate::{Endpoint, ModelContext};

/// Server options (the engine's are the engine's).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// With a key, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// How long in-flight requests may run after a shutdown signal before they are aborted.
    pub grace_period: Duration,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Engine sequences (prompts × n) one request may start (400 beyond).
    pub max_sequences_per_request: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            grace_period: Duration::from_secs(10),
            max_body_bytes: 16 << 20,
            max_sequences_per_request: validate::DEFAULT_MAX_SEQUENCES_PER_REQUEST,
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    handle: EngineHandle,
    chat_template: ChatTemplate,
    metrics: Arc<Metrics>,
    config: ServerConfig,
    shutting_down: AtomicBool,
    /// Unix seconds at start (the model card's `created`).
    created: u64,
}

impl AppState {
    fn model_context(&self) -> ModelContext<'_> {
        let info = self.handle.info();
        ModelContext {
            model_name: &info.model_name,
            tokenizer: &info.tokenizer,
            chat_template: &self.chat_template,
            rules: info.rules,
            max_sequences: self.config.max_sequences_per_request,
        }
    }
}

/// The HTTP server over one engine.
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    pub fn new(handle: EngineHandle, chat_template: ChatTemplate, config: ServerConfig) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let state = AppState {
            handle,
            chat_template,
            metrics: Arc::new(Metrics::default()),
            config,
            shutting_down: AtomicBool::new(false),
            created,
        };
        Self { state: Arc::new(state) }
    }

    pub fn handle(&self) -> &EngineHandle {
        &self.state.handle
    }

    pub fn router(&self) -> Router {
        let state = self.state.clone();
        let v1 = Router::new()
            .route("/v1/completions", post(completions_handler))
            .route("/v1/chat/completions", post(chat_handler))
            .route("/v1/models", get(models_handler))
            .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_api_key));
        Router::new()
            .merge(v1)
            .route("/health", get(health_handler))
            .route("/metrics", get(metrics_handler))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(state.clone(), count_responses))
            .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
            .with_state(state)
    }

    /// Serves on `listener` until `shutdown` resolves; then stops accepting, lets in-flight
    /// requests run for the grace period and aborts what is left. The engine keeps
    /// running: the caller shuts it down.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let (signalled_tx, mut signalled) = tokio::sync::watch::channel(false);
        let signal = {
            let state = state.clone();
            async move {
                shutdown.await;
                state.shutting_down.store(true, Ordering::SeqCst);
                let _ = signalled_tx.send(true);
            }
        };
        let server =
            axum::serve(listener, self.router()).with_graceful_shutdown(signal).into_future();
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => return r,
            _ = signalled.wait_for(|&s| s) => {}
        }
        let in_flight = state.metrics.in_flight.load(Ordering::Relaxed);
        tracing::info!(
            in_flight,
            grace_s = state.config.grace_period.as_secs_f64(),
            "shutting down: no new connections; waiting for in-flight requests"
        );
        if let Ok(r) = tokio::time::timeout(state.config.grace_period, &mut server).await {
            return r;
        }
        let left = state.metrics.in_flight.load(Ordering::Relaxed);
        tracing::warn!(left, "grace period over: aborting the requests left");
        state.handle.abort_all();
        match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections still open 5 s after aborting; closing anyway");
                Ok(())
            }
        }
    }
}

async fn completions_handler(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(app, Endpoint::Completions, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_handler(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(app, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Parses, submits, and answers (streaming or not).
async fn generate(
    app: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("at most {} bytes", app.config.max_body_bytes))
        } else {
            ApiError::invalid_no_param(format!("reading the request body: {r}"))
        }
    })?;
    if app.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable("the server is shutting down".into()));
    }
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

async fn models_handler(State(app): State<Arc<AppState>>) -> Response {
    let info = app.handle.info();
    axum::Json(api::ModelList {
        object: "list",
        data: vec![api::ModelCard {
            id: info.model_name.clone(),
            object: "model",
            created: app.created,
            owned_by: "radix-sparse",
            max_model_len: info.rules.max_model_len,
        }],
    })
    .into_response()
}

async fn health_handler(State(app): State<Arc<AppState>>) -> Response {
    if app.shutting_down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn metrics_handler(State(app): State<Arc<AppState>>) -> Response {
    let text = app.metrics.render(&app.handle.stats(), &app.handle.info().model_name);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::NotFound(format!("no route for {} {}", req.method(), req.uri().path()))
        .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::MethodNotAllowed(format!("{} is not allowed on {}", req.method(), req.uri().path()))
        .into_response()
}

/// Counts responses by route and status for `/metrics`.
async fn count_responses(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    const ROUTES: [&str; 5] =
        ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"];
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let resp = next.run(req).await;
    let route = path.and_then(|p| ROUTES.into_iter().find(|r| *r == p)).unwrap_or("other");
    app.metrics.count_response(route, resp.status().as_u16());
    resp
}
