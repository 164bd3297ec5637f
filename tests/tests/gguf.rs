//! GGUF files written from the tiny generated models (`tiny_gguf`, laid out as llama.cpp's
//! converter does, Llama's q/k rows permuted) load to the same model: same tokens, same chat
//! prompt, same logits; quantized types load; and broken or unsupported files are typed
//! errors, never panics.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use council_inference::engine::loader::{self, LoadedModel, ModelFiles};
use council_inference::engine::sequence_logits;
use council_inference::tiny::{TinyArch, TinyModelSpec, TinyShape};
use council_inference::tiny_gguf::write_gguf;
use council_inference::{Backend, ChatMessage, EngineConfig, LoadError, Quantization};
use council_tests::{all_at_once, one_by_one, tiny_model, tiny_model_with, varied_requests};

const ARCHS: [TinyArch; 3] = [TinyArch::Qwen2, TinyArch::Qwen3, TinyArch::Llama];

fn load(files: &ModelFiles, quantization: Quantization) -> Result<LoadedModel, LoadError> {
    loader::load_as(files, "t", &Device::Cpu, DType::F32, quantization)
}

fn gguf_of(dir: &Path, dtype: GgmlDType) -> PathBuf {
    let out = dir.join("model.gguf");
    write_gguf(dir, &out, dtype).expect("GGUF written");
    out
}

const TEXTS: [&str; 4] = [
    "The council met at dawn and read the task.",
    "What is 7 + 5 * 3 - 2? Answer: 20.",
    "  spaces\tand\ttabs\n\nand newlines  ",
    "Café 東京 🤖 <|im_start|> <think>",
];

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The model in `dir` loaded from its safetensors (held as `hf_weights` says) and from a GGUF
/// of it in `dtype` (loaded as written).
fn both(dir: &Path, hf_weights: Quantization, dtype: GgmlDType) -> (LoadedModel, LoadedModel) {
    let hf = load(&ModelFiles::from_dir(dir).expect("hf"), hf_weights).expect("hf loads");
    let path = gguf_of(dir, dtype);
    let gguf = load(
        &ModelFiles::from_path(&path).expect("gguf"),
        Quantization::None,
    )
    .expect("gguf loads");
    (hf, gguf)
}

/// How far the two may differ: nothing, but for Llama, whose scaled RoPE a GGUF stores as
/// per-frequency divisors (rounded once more).
fn rope_bound(arch: TinyArch) -> f32 {
    if arch == TinyArch::Llama { 1e-4 } else { 0.0 }
}

#[test]
fn f32_gguf_is_the_same_model_as_its_safetensors() {
    for arch in ARCHS {
        let dir = tiny_model(arch);
        let (hf, gguf) = both(dir.path(), Quantization::None, GgmlDType::F32);
        assert_eq!(hf.model.config().arch, gguf.model.config().arch);
        for text in TEXTS {
            let ids = hf.tokenizer.encode(text).expect("encodes");
            assert_eq!(
                gguf.tokenizer.encode(text).expect("encodes"),
                ids,
                "{arch:?}: {text:?}"
            );
            let (a, b) = (
                sequence_logits(&hf.model, &ids).expect("forward"),
                sequence_logits(&gguf.model, &ids).expect("forward"),
            );
            let diff = max_diff(&a, &b);
            assert!(
                diff <= rope_bound(arch),
                "{arch:?}: max |Δlogit| {diff} on {text:?}"
            );
        }
        let chat = vec![
            ChatMessage::system("You review."),
            ChatMessage::user("Is a bounded queue enough?"),
        ];
        assert_eq!(
            gguf.tokenizer.encode_chat(&chat, false).expect("chat"),
            hf.tokenizer.encode_chat(&chat, false).expect("chat"),
            "{arch:?}: chat prompt"
        );
        assert_eq!(
            gguf.tokenizer.eos_ids(),
            hf.tokenizer.eos_ids(),
            "{arch:?}: EOS ids"
        );
    }
}

/// A Q8_0 GGUF holds exactly the blocks `--quantize q8_0` makes from the same weights (Llama's
/// q/k rows permuted and put back as whole blocks), so the two give the same logits, bit for
/// bit; and the tensors stay Q8_0 in memory.
#[test]
fn q8_0_gguf_stays_q8_0_and_equals_quantizing_the_safetensors() {
    for arch in ARCHS {
        let dir = tiny_model(arch);
        let (hf, gguf) = both(dir.path(), Quantization::Q8_0, GgmlDType::Q8_0);
        assert_eq!(
            gguf.model.weight_bytes(),
            hf.model.weight_bytes(),
            "{arch:?}: bytes"
        );
        let ids = hf.tokenizer.encode(TEXTS[0]).expect("encodes");
        let (a, b) = (
            sequence_logits(&hf.model, &ids).expect("forward"),
            sequence_logits(&gguf.model, &ids).expect("forward"),
        );
        let diff = max_diff(&a, &b);
        assert!(diff <= rope_bound(arch), "{arch:?}: max |Δlogit| {diff}");
    }
}

/// Every other supported type loads (dequantized to f32 on the CPU, or requantized with
/// `--quantize q8_0`) and computes the same model within the type's rounding.
#[test]
fn other_tensor_types_load_and_stay_close_to_f32() {
    let dir = tiny_model(TinyArch::Llama);
    let f32_model = load(
        &ModelFiles::from_dir(dir.path()).expect("hf"),
        Quantization::None,
    )
    .expect("hf loads");
    let ids = f32_model.tokenizer.encode(TEXTS[1]).expect("encodes");
    let reference = sequence_logits(&f32_model.model, &ids).expect("forward");
    let spread = spread(&reference);
    for (dtype, bound) in [
        (GgmlDType::F16, 0.01),
        (GgmlDType::BF16, 0.05),
        (GgmlDType::Q4_0, 0.5),
        (GgmlDType::Q4_1, 0.5),
    ] {
        let path = gguf_of(dir.path(), dtype);
        for quantization in [Quantization::None, Quantization::Q8_0] {
            let model = load(&ModelFiles::from_path(&path).expect("gguf"), quantization)
                .unwrap_or_else(|e| panic!("{dtype:?} ({quantization}) loads: {e}"));
            let logits = sequence_logits(&model.model, &ids).expect("forward");
            let relative = max_diff(&reference, &logits) / spread;
            eprintln!("{dtype:?} ({quantization}): max |Δlogit| {relative:.5} of the spread");
            // Requantized to Q8_0, the weights round once more.
            let bound = match quantization {
                Quantization::Q8_0 => f32::max(bound, 0.05),
                Quantization::None => bound,
            };
            assert!(
                relative > 0.0 && relative <= bound,
                "{dtype:?} ({quantization}): max |Δlogit| is {relative} of the spread"
            );
        }
    }
}

/// The k-quants need rows of 256 columns, which the tiny models do not have: a wide tiny model
/// (every matrix 256 or 512 columns) is written with every weight matrix in Q4_K, Q5_K or Q6_K,
/// loads through the same reader (Llama's permuted rows moved back as whole k-quant rows) and
/// stays close to its f32 safetensors; with `--quantize q8_0` too.
#[test]
fn k_quant_files_load_and_stay_close_to_f32() {
    for arch in ARCHS {
        let dir = tiny_model_with(TinyModelSpec {
            shape: TinyShape::Wide,
            ..TinyModelSpec::new(arch)
        });
        let f32_model = load(
            &ModelFiles::from_dir(dir.path()).expect("hf"),
            Quantization::None,
        )
        .expect("hf loads");
        let ids = f32_model.tokenizer.encode(TEXTS[0]).expect("encodes");
        let reference = sequence_logits(&f32_model.model, &ids).expect("forward");
        let spread = spread(&reference);
        for (dtype, bound) in [
            (GgmlDType::Q4K, 0.5),
            (GgmlDType::Q5K, 0.25),
            (GgmlDType::Q6K, 0.1),
        ] {
            let out = dir.path().join("model.gguf");
            let summary = write_gguf(dir.path(), &out, dtype).expect("GGUF written");
            // Every matrix (embedding and projections) is in the k-quant; only vectors are F32.
            let matrices = summary
                .types
                .get(&format!("{dtype:?}"))
                .copied()
                .unwrap_or(0);
            assert!(
                matrices > 2 * 7,
                "{arch:?} {dtype:?}: only {matrices} tensors in the k-quant: {:?}",
                summary.types
            );
            for quantization in [Quantization::None, Quantization::Q8_0] {
                let model = load(&ModelFiles::from_path(&out).expect("gguf"), quantization)
                    .unwrap_or_else(|e| panic!("{arch:?} {dtype:?} ({quantization}) loads: {e}"));
                let logits = sequence_logits(&model.model, &ids).expect("forward");
                let relative = max_diff(&reference, &logits) / spread;
                eprintln!(
                    "{arch:?} {dtype:?} ({quantization}): max |Δlogit| {relative:.5} of the spread"
                );
                assert!(
                    relative > 0.0 && relative <= bound,
                    "{arch:?} {dtype:?} ({quantization}): max |Δlogit| is {relative} of the spread"
                );
            }
        }
    }
}

fn spread(logits: &[Vec<f32>]) -> f32 {
    logits
        .iter()
        .flatten()
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v))
        - logits
            .iter()
            .flatten()
            .fold(f32::INFINITY, |m, v| m.min(*v))
}

#[tokio::test]
async fn the_engine_runs_a_gguf_batched_as_unbatched() {
    let dir = tiny_model_with(TinyModelSpec::new(TinyArch::Llama));
    let path = gguf_of(dir.path(), GgmlDType::Q8_0);
    let files = ModelFiles::from_path(&path).expect("gguf");
    let handle = council_inference::Engine::load(&files, "tiny-gguf", EngineConfig::default())
        .expect("engine starts");
    assert_eq!(handle.model_info().model_type, "llama");
    let requests = varied_requests(|i| council_inference::Sampling {
        temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
        seed: i as u64,
        ..council_inference::Sampling::greedy()
    });
    let alone = one_by_one(&handle, &requests).await;
    let together = all_at_once(&handle, &requests).await;
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!(a.token_ids, b.token_ids);
    }
}

#[test]
fn a_directory_with_one_gguf_loads_and_with_two_is_refused_by_name() {
    let dir = tiny_model(TinyArch::Qwen2);
    let only = tempfile::tempdir().expect("dir");
    write_gguf(dir.path(), &only.path().join("a.gguf"), GgmlDType::F32).expect("written");
    assert_eq!(
        ModelFiles::from_dir(only.path()).expect("one GGUF"),
        ModelFiles::Gguf(only.path().join("a.gguf"))
    );
    load(
        &ModelFiles::from_dir(only.path()).expect("one"),
        Quantization::None,
    )
    .expect("loads");
    std::fs::copy(only.path().join("a.gguf"), only.path().join("b.gguf")).expect("copy");
    match ModelFiles::from_dir(only.path()) {
        Err(LoadError::Malformed { reason, .. }) => {
            assert!(
                reason.contains("a.gguf") && reason.contains("b.gguf"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal naming both files, got {other:?}"),
    }
    match ModelFiles::from_path(&dir.path().join("config.json")) {
        Err(LoadError::Malformed { reason, .. }) => assert!(reason.contains(".gguf"), "{reason}"),
        other => panic!("a JSON file is not a model file: {other:?}"),
    }
}

/// Cut anywhere, or with bytes flipped, a GGUF file is an error that names the file, never a
/// panic and never a model.
#[test]
fn truncated_and_corrupt_files_are_clear_errors() {
    let dir = tiny_model(TinyArch::Qwen3);
    let path = gguf_of(dir.path(), GgmlDType::Q8_0);
    let bytes = std::fs::read(&path).expect("read");
    let broken = tempfile::tempdir().expect("dir");
    let target = broken.path().join("broken.gguf");
    let len = bytes.len();
    let mut cuts: Vec<usize> = (0..64).chain((1..40).map(|i| i * len / 40)).collect();
    cuts.push(len - 1);
    for cut in cuts {
        std::fs::write(&target, &bytes[..cut]).expect("write");
        match load(&ModelFiles::Gguf(target.clone()), Quantization::None) {
            Err(LoadError::Malformed { path, .. }) => assert_eq!(path, target, "cut at {cut}"),
            Err(other) => panic!("cut at {cut}: unexpected error {other}"),
            Ok(_) => panic!("a file cut at {cut} of {len} bytes loaded"),
        }
    }
    let mut bad_magic = bytes.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    std::fs::write(&target, &bad_magic).expect("write");
    let e = load(&ModelFiles::Gguf(target.clone()), Quantization::None).expect_err("bad magic");
    assert!(e.to_string().contains("broken.gguf"), "{e}");
    // Flipped bytes in the header: an error or, if the flip hit a value that still parses, a
    // model; never a panic.
    for at in (8..4096.min(len)).step_by(37) {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0xA5;
        std::fs::write(&target, &flipped).expect("write");
        let _ = load(&ModelFiles::Gguf(target.clone()), Quantization::None);
    }
}

/// Replaces the first occurrence of `from` in `bytes` by `to` (same length).
fn patch(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    bytes[at..at + to.len()].copy_from_slice(to);
}

#[test]
fn unsupported_architectures_and_tensor_types_are_typed_errors() {
    let dir = tiny_model(TinyArch::Qwen2);
    let path = gguf_of(dir.path(), GgmlDType::F32);
    let bytes = std::fs::read(&path).expect("read");
    let out = tempfile::tempdir().expect("dir");
    let target = out.path().join("m.gguf");

    // general.architecture = "qwen2" → "gemma": same length, every `qwen2.*` key left behind.
    let mut gemma = bytes.clone();
    patch(
        &mut gemma,
        b"\x05\0\0\0\0\0\0\0qwen2",
        b"\x05\0\0\0\0\0\0\0gemma",
    );
    std::fs::write(&target, &gemma).expect("write");
    match load(&ModelFiles::Gguf(target.clone()), Quantization::None) {
        Err(LoadError::UnsupportedArchitecture { arch, .. }) => assert_eq!(arch, "gemma"),
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }

    // A tensor type candle reads but the engine does not take: Q5_1 (ggml type 7).
    let q51 = tiny_model(TinyArch::Qwen2);
    let q51_path = gguf_of(q51.path(), GgmlDType::Q5_1);
    match load(&ModelFiles::Gguf(q51_path), Quantization::None) {
        Err(LoadError::UnsupportedTensorType { tensor, dtype, .. }) => {
            assert_eq!(dtype, "Q5_1");
            assert!(
                tensor.starts_with("blk.") || tensor == "token_embd.weight",
                "{tensor}"
            );
        }
        other => panic!("expected UnsupportedTensorType, got {other:?}"),
    }

    // A type candle does not know (IQ4_NL, ggml type 20): the first tensor record's type id.
    let mut iq = bytes.clone();
    let name = b"token_embd.weight";
    let at = iq
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor record");
    // name, n_dims (u32), dims (u64 each), type (u32)
    let dims_at = at + name.len();
    let n_dims = u32::from_le_bytes(iq[dims_at..dims_at + 4].try_into().expect("4 bytes"));
    let type_at = dims_at + 4 + 8 * n_dims as usize;
    iq[type_at..type_at + 4].copy_from_slice(&20u32.to_le_bytes());
    std::fs::write(&target, &iq).expect("write");
    match load(&ModelFiles::Gguf(target.clone()), Quantization::None) {
        Err(LoadError::UnsupportedTensorType { dtype, .. }) => assert_eq!(dtype, "IQ4_NL"),
        other => panic!("expected UnsupportedTensorType, got {other:?}"),
    }
}
