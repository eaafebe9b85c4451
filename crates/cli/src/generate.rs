//! `radix-sparse generate`: one prompt, streamed to the terminal.

use std::io::Write;

use clap::Args;
use radix_engine::{EngineHandle, Request};
use radix_model::ChatMessage;

use crate::engine_args::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
}

impl GenerateArgs {
    #[cfg(test)]
    pub fn sampling(&self) -> &SamplingArgs {
        &self.sampling
    }

    #[cfg(test)]
    pub fn model_args(&self) -> &ModelArgs {
        &self.model
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.sampling.max_tokens >= 1, "--max-tokens must be at least 1");
    // Checked before the model loads.
    let params = args.sampling.params()?;
    let built = args.model.build_engine()?;
    let (engine, name) = (built.engine, built.name);
    let tokenizer = engine.tokenizer().clone();
    let text = if args.chat {
        let user = ChatMessage::new("user", args.prompt.clone());
        built.chat_template.render(&[user], true)?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text, !args.chat)?;
    let handle = EngineHandle::spawn(engine, name);
    let req = Request::new(prompt, params, args.sampling.stop());
    let started = std::time::Instant::now();
    let mut rx = handle.submit(req)?;
    let mut out = std::io::stdout().lock();
    let mut first_token = None;
    let mut last = None;
    while let Some(o) = rx.blocking_recv() {
        first_token.get_or_insert_with(|| started.elapsed());
        out.write_all(o.text.as_bytes())?;
        out.flush()?;
        let done = o.finish.is_some();
        last = Some(o);
        if done {
            break;
        }
    }
    writeln!(out)?;
    handle.shutdown();
    if let Some(o) = last {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {}, first token {:.0} ms, {:.1} tokens/s]",
            o.prompt_tokens,
            o.completion_tokens,
            o.finish.as_ref().map_or("?", |f| f.as_openai()),
            first_token.unwrap_or_default().as_secs_f64() * 1e3,
            o.completion_tokens as f64 / secs
        );
        if let Some(radix_engine::FinishReason::Error(e)) = o.finish {
            anyhow::bail!("generation failed: {e}");
        }
    }
    Ok(())
}
