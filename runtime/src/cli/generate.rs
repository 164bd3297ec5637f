//! `council generate`: one chat completion on the in-process engine.

use anyhow::Context;
use council_inference::{ChatMessage, GenerateRequest, Sampling};

use crate::model_source::ModelArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message.
    pub prompt: String,
    /// An optional system message.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print the whole result (text, tokens, usage, timings) as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The in-process engine, or the vLLM server `--vllm-url` names.
    let (backend, _, _) = args.model.start_backend(&runtime)?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::system(system.clone()));
    }
    messages.push(ChatMessage::user(args.prompt.clone()));
    let mut request =
        GenerateRequest::chat(messages, args.max_new_tokens).with_sampling(Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        });
    request.stop = args.stop.clone();
    let result = runtime
        .block_on(backend.generate(request))
        .context("generation failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!("{}", result.text);
        eprintln!(
            "[{} prompt + {} completion tokens, finish: {:?}, first token {:.0?}, total {:.0?}]",
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.finish_reason,
            result.timings.first_token,
            result.timings.total,
        );
    }
    Ok(())
}
