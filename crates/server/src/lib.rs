//! radix-sparse's OpenAI-compatible HTTP server (axum over hyper).
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both stream with
//! `"stream": true` as server-sent events; bodies must be JSON), `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text); CORS when
//! origins are allowed.
//!
//! The server talks to the engine only through an `EngineHandle` (channels; no GPU types
//! cross). Each HTTP request becomes one engine request per choice, grouped so the
//! engine shares running slots fairly between HTTP requests; when the client goes away,
//! the response future or SSE stream is dropped and its requests are aborted, which
//! unlocks their prefix-cache nodes and frees their pages. Connections are bounded in
//! time and number (`connections`). Shutdown drains: new requests get 503 (and
//! `/health` says so) while in-flight ones finish, for at most the grace period; then
//! what is left is aborted, and the server returns as soon as nothing is in flight.

mod api;
mod auth;
mod chat;
mod completions;
mod connections;
mod error;
mod generation;
mod handlers;
mod metrics;
mod request_id;
mod sse;
mod structured;
mod tools;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::{HeaderValue, Method};
use axum::middleware;
use axum::routing::{get, post};
use radix_engine::EngineHandle;
use radix_model::ChatTemplate;
use tokio::net::TcpListener;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

pub use api::Usage;
pub use connections::ConnectionLimits;
pub use error::ApiError;
pub use metrics::Metrics;
pub use tools::ToolParser;
use validate::ModelContext;

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
    /// Origins browsers may call from (CORS); empty: none, `*`: any.
    pub allowed_origins: Vec<String>,
    /// Timeouts and the cap on open connections.
    pub connections: ConnectionLimits,
    /// Further names the API answers to besides the engine's model name (vLLM's
    /// `--served-model-name a b`: responses name the first, which is the engine's).
    pub model_aliases: Vec<String>,
    /// The tool-call format (vLLM's `--tool-call-parser`); `None`: read from the chat
    /// template.
    pub tool_call_parser: Option<ToolParser>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            grace_period: Duration::from_secs(10),
            max_body_bytes: 16 << 20,
            max_sequences_per_request: validate::DEFAULT_MAX_SEQUENCES_PER_REQUEST,
            allowed_origins: Vec::new(),
            connections: ConnectionLimits::default(),
            model_aliases: Vec::new(),
            tool_call_parser: None,
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
    tool_parser: ToolParser,
}

impl AppState {
    fn model_context(&self) -> ModelContext<'_> {
        let info = self.handle.info();
        ModelContext {
            model_name: &info.model_name,
            model_aliases: &self.config.model_aliases,
            tokenizer: &info.tokenizer,
            chat_template: &self.chat_template,
            rules: info.rules,
            max_sequences: self.config.max_sequences_per_request,
            grammars: &info.grammars,
            tool_parser: self.tool_parser,
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
        let tool_parser =
            config.tool_call_parser.unwrap_or_else(|| ToolParser::detect(chat_template.source()));
        let state = AppState {
            tool_parser,
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
        use handlers::*;
        let state = self.state.clone();
        let v1 = Router::new()
            .route("/v1/completions", post(completions_handler))
            .route("/v1/chat/completions", post(chat_handler))
            .route("/v1/models", get(models_handler))
            .route("/v1/models/{*id}", get(model_handler))
            .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_api_key));
        let router = Router::new()
            .merge(v1)
            .route("/health", get(health_handler))
            .route("/metrics", get(metrics_handler))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(state.clone(), count_responses))
            .layer(middleware::from_fn(request_id::tag))
            .with_state(state);
        match cors(&self.state.config.allowed_origins) {
            // Outermost: preflights are answered before routing (and need no API key).
            Some(cors) => router.layer(cors),
            None => router,
        }
    }

    /// Serves on `listener` until `shutdown` resolves, then drains (see the module doc).
    /// The engine keeps running: the caller shuts it down.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let connections = connections::Connections::new(state.config.connections.clone());
        let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
        let close_after_response = Arc::new(AtomicBool::new(false));
        let accept = connections.accept_loop(
            listener,
            self.router(),
            close_after_response.clone(),
            accepting,
        );
        let drain = async {
            shutdown.await;
            state.shutting_down.store(true, Ordering::SeqCst);
            close_after_response.store(true, Ordering::SeqCst);
            let grace = state.config.grace_period;
            tracing::info!(
                in_flight = state.metrics.in_flight.load(Ordering::Relaxed),
                grace_s = grace.as_secs_f64(),
                "shutting down: new requests get 503; waiting for in-flight requests"
            );
            if !state.wait_idle(grace).await {
                let left = state.metrics.in_flight.load(Ordering::Relaxed);
                tracing::warn!(left, "grace period over: aborting the requests left");
                state.handle.abort_all();
                // Aborted streams end with an error event; give them a moment to go out.
                if !state.wait_idle(Duration::from_secs(5)).await {
                    tracing::warn!("requests still in flight 5 s after aborting; closing anyway");
                }
            }
            let _ = stop_accepting.send(true);
            connections.close(Duration::from_secs(1)).await;
        };
        // The accept loop ends only when told to (errors are retried), so this returns
        // when the drain is done.
        tokio::join!(accept, drain);
        Ok(())
    }
}

impl AppState {
    /// Waits until no request is in flight, at most `limit`; false if some still are.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let t = Instant::now();
        loop {
            if self.metrics.in_flight.load(Ordering::SeqCst) <= 0 {
                return true;
            }
            if t.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// vLLM's CORS: the allowed origins (`*` for any), every method we serve and whatever
/// headers the preflight asks for (a wildcard would not cover `Authorization`).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let valid = origins.iter().filter_map(|o| match HeaderValue::from_str(o) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(origin = %o, "ignoring an allowed origin that is not a header value");
                None
            }
        });
        AllowOrigin::list(valid)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(Duration::from_secs(600)),
    )
}
