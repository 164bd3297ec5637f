//! The engine against Hugging Face transformers: full-sequence logits and greedy tokens on the
//! tiny generated models, compared with fixtures that `scripts/parity/hf_reference.py` wrote.

use council_inference::engine::loader::{self, ModelFiles};
use council_inference::engine::sequence_logits;
use council_inference::tiny::TinyArch;
use council_inference::{Backend, ChatMessage, ChatRole, EngineConfig, GenerateRequest};
use council_tests::{engine, tiny_model};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    greedy_new_tokens: usize,
    cases: Vec<Case>,
    chat: Chat,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    ids: Vec<u32>,
}

fn fixture(arch: &str) -> Fixture {
    let path = format!("{}/fixtures/parity/{arch}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("parity fixture present");
    serde_json::from_str(&text).expect("parity fixture parses")
}

async fn check(arch: TinyArch, name: &str) {
    let fixture = fixture(name);
    let dir = tiny_model(arch);
    let files = ModelFiles::from_dir(dir.path()).expect("complete model dir");
    let loaded = loader::load(
        &files,
        name,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .expect("loads");
    let handle = engine(dir.path(), EngineConfig::default());

    for case in &fixture.cases {
        assert_eq!(
            loaded.tokenizer.encode(&case.text).expect("encodes"),
            case.input_ids,
            "{name}: tokenization of {:?}",
            case.text
        );
        let logits = sequence_logits(&loaded.model, &case.input_ids).expect("forward");
        assert_eq!(logits.len(), case.logits.len());
        let mut max_diff = 0f32;
        for (ours, theirs) in logits.iter().zip(&case.logits) {
            assert_eq!(ours.len(), theirs.len(), "{name}: vocab size");
            for (a, b) in ours.iter().zip(theirs) {
                max_diff = max_diff.max((a - b).abs());
            }
        }
        assert!(
            max_diff <= 1e-4,
            "{name}: max |logit diff| vs transformers = {max_diff}"
        );

        let request = GenerateRequest::tokens(case.input_ids.clone(), fixture.greedy_new_tokens);
        let result = handle.generate(request).await.expect("generates");
        assert_eq!(
            result.token_ids, case.greedy_ids,
            "{name}: greedy tokens of {:?}",
            case.text
        );
    }

    assert!(
        fixture
            .chat
            .messages
            .iter()
            .any(|m| m.role == ChatRole::System)
    );
    let chat = loaded
        .tokenizer
        .encode_chat(&fixture.chat.messages, false)
        .expect("renders chat");
    assert_eq!(
        chat, fixture.chat.ids,
        "{name}: chat template disagrees with the model's Jinja template"
    );
}

#[tokio::test]
async fn qwen2_matches_transformers() {
    check(TinyArch::Qwen2, "qwen2").await;
}

#[tokio::test]
async fn qwen3_matches_transformers() {
    check(TinyArch::Qwen3, "qwen3").await;
}
