//! A GGUF file's tokenizer (`tokenizer.ggml.*`) rebuilt as a `tokenizers` Tokenizer, with the
//! chat template of `tokenizer.chat_template`.
//!
//! gpt2-style byte-level BPE is supported: the vocabulary and merges as stored, control tokens
//! (type 3) as special added tokens, user-defined ones (type 4) as plain added tokens, and the
//! pre-tokenizer that `tokenizer.ggml.pre` names, with llama.cpp's rules for it (candle's
//! `from_gguf` knows a few names and falls back to a byte-level split that adds a leading
//! space, which mis-tokenizes every chat turn of e.g. SmolLM2). An unknown pre-tokenizer or a
//! SentencePiece (`llama`) vocabulary is a typed error, never a silent approximation.

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::GgufFile;
use crate::engine::config::Config;
use crate::engine::tokenizer::{ChatTokenizer, TemplateSource};
use crate::error::LoadError;

/// GPT-2's split: contractions, letter runs, digit runs, punctuation runs, whitespace.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's: case-insensitive contractions, a letter run with one leading non-letter, single
/// digits, punctuation with trailing newlines, newline runs, whitespace.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's: as Qwen2's, with digits in runs of up to three.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes applied in turn, by llama.cpp's `tokenizer.ggml.pre` names.
fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" => vec![GPT2],
        // Each digit alone first, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" => vec![r"\p{N}", GPT2],
        "qwen2" | "deepseek-r1-qwen" => vec![QWEN2],
        "llama3" | "llama-bpe" | "smaug-bpe" => vec![LLAMA3],
        _ => return None,
    })
}

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn strings<'a>(gguf: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, LoadError> {
    let Some(value) = gguf.metadata().get(key) else {
        return Ok(None);
    };
    let bad = || LoadError::Malformed {
        path: gguf.path.clone(),
        reason: format!("{key} is not a list of strings"),
    };
    let Value::Array(items) = value else {
        return Err(bad());
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn token_types(gguf: &GgufFile, count: usize) -> Result<Vec<i32>, LoadError> {
    let key = "tokenizer.ggml.token_type";
    let Some(value) = gguf.metadata().get(key) else {
        return Ok(vec![1; count]);
    };
    let bad = |reason: String| LoadError::Malformed {
        path: gguf.path.clone(),
        reason: format!("{key}: {reason}"),
    };
    let Value::Array(items) = value else {
        return Err(bad("not a list".into()));
    };
    if items.len() != count {
        return Err(bad(format!("{} types for {count} tokens", items.len())));
    }
    items
        .iter()
        .map(|v| match v {
            Value::I32(t) => Ok(*t),
            Value::U32(t) => i32::try_from(*t).map_err(|_| bad(format!("type {t}"))),
            other => Err(bad(format!("{other:?} is not a token type"))),
        })
        .collect()
}

/// The tokenizer of a GGUF file, as a `tokenizers` Tokenizer.
pub fn tokenizer(gguf: &GgufFile) -> Result<Tokenizer, LoadError> {
    let path = &gguf.path;
    let malformed = |reason: String| LoadError::Malformed {
        path: path.clone(),
        reason,
    };
    let unsupported = |reason: String| LoadError::Unsupported {
        path: path.clone(),
        reason,
    };
    match gguf.string("tokenizer.ggml.model") {
        Some("gpt2") => {}
        Some(other) => {
            return Err(unsupported(format!(
                "tokenizer model {other:?} (gpt2-style byte-level BPE is supported)"
            )));
        }
        None => return Err(malformed("metadata tokenizer.ggml.model is missing".into())),
    }
    let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
    let regexes = pre_tokenizer_regexes(pre)
        .ok_or_else(|| unsupported(format!("pre-tokenizer {pre:?} (tokenizer.ggml.pre)")))?;
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?
        .ok_or_else(|| malformed("metadata tokenizer.ggml.tokens is missing".into()))?;
    let merges = strings(gguf, "tokenizer.ggml.merges")?
        .ok_or_else(|| malformed("metadata tokenizer.ggml.merges is missing".into()))?;
    let types = token_types(gguf, tokens.len())?;

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| ((*t).to_owned(), id as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(malformed("tokenizer.ggml.tokens repeats a token".into()));
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| malformed(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| malformed(format!("BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in regexes {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| malformed(format!("pre-tokenizer regex: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    let added = |kind: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == kind)
            .map(|(token, _)| AddedToken::from(*token, special))
            .collect()
    };
    tokenizer
        .add_special_tokens(added(CONTROL, true))
        .map_err(|e| malformed(format!("control tokens: {e}")))?;
    tokenizer
        .add_tokens(added(USER_DEFINED, false))
        .map_err(|e| malformed(format!("user-defined tokens: {e}")))?;
    Ok(tokenizer)
}

/// The tokenizer and chat template of a GGUF file, with its EOS ids and the BOS / EOS strings
/// the template may name.
pub fn chat_tokenizer(gguf: &GgufFile, config: &Config) -> Result<ChatTokenizer, LoadError> {
    let inner = tokenizer(gguf)?;
    let token = |key: &str| -> Result<Option<String>, LoadError> {
        Ok(gguf.uint(key)?.and_then(|id| inner.id_to_token(id as u32)))
    };
    let source = TemplateSource {
        template: gguf.string("tokenizer.chat_template").map(str::to_owned),
        bos_token: token("tokenizer.ggml.bos_token_id")?,
        eos_token: token("tokenizer.ggml.eos_token_id")?,
    };
    ChatTokenizer::new(
        inner,
        &gguf.path,
        config.arch,
        config.vocab_size,
        config.eos_token_ids.iter().copied(),
        source,
    )
}
