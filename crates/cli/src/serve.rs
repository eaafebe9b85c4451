//! `radix-sparse serve`: the OpenAI-compatible HTTP server over one engine.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use radix_engine::EngineHandle;
use radix_server::{ConnectionLimits, Server, ServerConfig, ToolParser};

use crate::engine_args::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (/health and /metrics stay open).
    #[arg(long, env = "RADIX_SPARSE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model names clients may send (default: the model's, e.g. synthetic:tiny);
    /// responses carry the first, as vLLM's do. Several: `--served-model-name a b`.
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    /// Seconds in-flight requests may run after Ctrl-C or SIGTERM before they are aborted.
    #[arg(long, default_value_t = 10.0)]
    grace_period: f64,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 16)]
    max_body_mib: usize,
    /// Engine sequences one request may start (prompts × n); more get 400.
    #[arg(long, default_value_t = radix_server::validate::DEFAULT_MAX_SEQUENCES_PER_REQUEST)]
    max_sequences_per_request: usize,
    /// Origins browsers may call the API from (CORS): repeat the flag, separate with
    /// commas, or give vLLM's JSON list ('["https://a.example"]'); `*` allows any.
    /// Default: none (no CORS headers; preflights are not answered).
    #[arg(long, value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Seconds a connection may take to send its first request head.
    #[arg(long, default_value_t = 10.0)]
    header_read_timeout: f64,
    /// Seconds a request body may take to arrive (408 after).
    #[arg(long, default_value_t = 60.0)]
    body_read_timeout: f64,
    /// Seconds an idle connection is kept open after a response (uvicorn's name).
    #[arg(long, default_value_t = 5.0)]
    timeout_keep_alive: f64,
    /// Open connections at most (lowered to fit the open-file limit). At the cap, the
    /// oldest idle connection is closed for a new one.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections)]
    max_connections: usize,
    /// The format tool calls are written and parsed in (vLLM's names): `hermes`
    /// (`<tool_call>{...}</tool_call>`, Qwen, ChatML models) or `llama3_json` (Llama 3.1's
    /// `{"name": ..., "parameters": ...}`). Default: read from the chat template.
    #[arg(long, value_parser = ["hermes", "llama3_json"])]
    tool_call_parser: Option<String>,
    /// Accepted for vLLM compatibility: `tool_choice: "auto"` is always served (the
    /// output is parsed for calls whenever tools are given).
    #[arg(long)]
    enable_auto_tool_choice: bool,
}

/// `--allowed-origins`, each item either an origin or vLLM's JSON list of them.
fn parse_origins(items: &[String]) -> anyhow::Result<Vec<String>> {
    let mut origins = Vec::new();
    // A JSON list was split at its commas by clap: join it back first.
    let joined = items.join(",");
    if joined.trim_start().starts_with('[') {
        let list: Vec<String> = serde_json::from_str(&joined)
            .context("--allowed-origins: not a JSON list of strings")?;
        origins.extend(list);
    } else {
        origins.extend(items.iter().map(|o| o.trim().to_string()).filter(|o| !o.is_empty()));
    }
    for o in &origins {
        anyhow::ensure!(
            o == "*" || looks_like_origin(o),
            "--allowed-origins: {o:?} is not an origin (e.g. https://example.com)"
        );
    }
    Ok(origins)
}

fn looks_like_origin(origin: &str) -> bool {
    origin.contains("://") && origin.bytes().all(|b| b.is_ascii_graphic())
}

/// Seconds from a flag, checked.
fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        value.is_finite() && value > 0.0,
        "--{flag} must be a positive number of seconds"
    );
    Ok(Duration::from_secs_f64(value))
}

/// Raises the soft open-file limit to the hard one, as Go and nginx do: every client
/// connection is a descriptor, and distributions default the soft limit to 1024.
fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit read and write one `rlimit` through a pointer to a
        // live local.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                let old = lim.rlim_cur;
                lim.rlim_cur = lim.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                    tracing::debug!(from = old, to = lim.rlim_max, "raised the open-file limit");
                }
            }
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.grace_period.is_finite() && args.grace_period >= 0.0,
        "--grace-period must be a non-negative number of seconds"
    );
    anyhow::ensure!(
        args.max_sequences_per_request >= 1,
        "--max-sequences-per-request must be at least 1"
    );
    anyhow::ensure!(args.max_connections >= 1, "--max-connections must be at least 1");
    anyhow::ensure!(
        args.served_model_name.iter().all(|n| !n.trim().is_empty()),
        "--served-model-name: names must not be empty"
    );
    let config = ServerConfig {
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        grace_period: Duration::from_secs_f64(args.grace_period),
        max_body_bytes: args.max_body_mib.saturating_mul(1 << 20),
        max_sequences_per_request: args.max_sequences_per_request,
        allowed_origins: parse_origins(&args.allowed_origins)?,
        connections: ConnectionLimits {
            header_read_timeout: seconds("header-read-timeout", args.header_read_timeout)?,
            body_read_timeout: seconds("body-read-timeout", args.body_read_timeout)?,
            keep_alive_timeout: seconds("timeout-keep-alive", args.timeout_keep_alive)?,
            max_connections: args.max_connections,
        },
        model_aliases: args.served_model_name.iter().skip(1).cloned().collect(),
        tool_call_parser: args.tool_call_parser.as_deref().and_then(ToolParser::from_name),
    };
    raise_open_files_limit();
    let built = args.model.build_engine()?;
    let name = args.served_model_name.first().cloned().unwrap_or(built.name);
    let handle = EngineHandle::spawn(built.engine, name.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("radix-server")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            model = %name,
            api_key = config.api_key.is_some(),
            max_connections = config.connections.effective_max_connections(),
            "serving the OpenAI API on http://{addr}/v1 (health: /health, metrics: /metrics)"
        );
        Server::new(handle.clone(), built.chat_template, config)
            .serve(listener, shutdown_signal())
            .await
            .context("serving")
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    handle.shutdown();
    tracing::info!("stopped");
    result
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("listening for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("listening for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ServeArgs {
        pub fn served_model_names(&self) -> &[String] {
            &self.served_model_name
        }
    }

    #[test]
    fn allowed_origins_in_every_form() {
        let list = |items: &[&str]| {
            parse_origins(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let want = vec!["https://a.example".to_string(), "http://b.example:8080".to_string()];
        // Repeated flags, commas, and vLLM's JSON list (which clap split at its comma).
        assert_eq!(list(&["https://a.example", "http://b.example:8080"]).unwrap(), want);
        assert_eq!(list(&["[\"https://a.example\"", " \"http://b.example:8080\"]"]).unwrap(), want);
        assert_eq!(list(&["*"]).unwrap(), vec!["*".to_string()]);
        assert!(list(&[]).unwrap().is_empty());
        assert!(list(&["not an origin"]).is_err());
    }
}
