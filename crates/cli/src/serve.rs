//! `radix-sparse serve`: the OpenAI-compatible HTTP server over one engine.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use radix_engine::EngineHandle;
use radix_server::{Server, ServerConfig};

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
    /// The model name clients send and see (default: the model's, e.g. synthetic:tiny).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds in-flight requests may run after Ctrl-C or SIGTERM before they are aborted.
    #[arg(long, default_value_t = 10.0)]
    grace_period: f64,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 16)]
    max_body_mib: usize,
    /// Engine sequences one request may start (prompts × n); more get 400.
    #[arg(long, default_value_t = radix_server::validate::DEFAULT_MAX_SEQUENCES_PER_REQUEST)]
    max_sequences_per_request: usize,
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
    let config = ServerConfig {
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        grace_period: Duration::from_secs_f64(args.grace_period),
        max_body_bytes: args.max_body_mib.saturating_mul(1 << 20),
        max_sequences_per_request: args.max_sequences_per_request,
    };
    let built = args.model.build_engine()?;
    let name = args.served_model_name.clone().unwrap_or(built.name);
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
