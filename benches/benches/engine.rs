//! Engine throughput on a tiny generated model: prefill of one prompt, decode at batch 1 / 8 /
//! 32, log-prob scoring of ten choices after one prompt (the rubric judge's call), and host-side
//! sampling from a Qwen-sized vocabulary.
//! A regression guard for the engine's own overhead; real-shape figures come from
//! `council dev bench` (docs/PERFORMANCE.md).

use council_inference::engine::sampler::{Sampler, sample_by_sorting};
use council_inference::rng::Rng;
use council_inference::tiny::{TinyArch, TinyModelSpec, write_tiny_model};
use council_inference::{
    Backend, Engine, EngineConfig, GenerateRequest, Prompt, Sampling, ScoreRequest,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 17) % 250 + 3)
        .collect()
}

fn engine_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_model(dir.path(), &TinyModelSpec::new(TinyArch::Qwen2)).expect("tiny model");
    // The prefix cache is off: every iteration repeats its prompt, which it would serve.
    let config = EngineConfig {
        max_batch: 32,
        prefix_cache: false,
        ..EngineConfig::default()
    };
    let engine = Engine::load_dir(dir.path(), config).expect("loads");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut group = c.benchmark_group("tiny_qwen2");
    for len in [64usize, 256] {
        group.throughput(Throughput::Elements(len as u64));
        group.bench_with_input(BenchmarkId::new("prefill", len), &len, |b, &len| {
            b.iter(|| {
                runtime
                    .block_on(engine.generate(GenerateRequest::tokens(prompt(len, 1), 1)))
                    .expect("generates")
            })
        });
    }
    for batch in [1usize, 8, 32] {
        let new_tokens = 32;
        group.throughput(Throughput::Elements((batch * new_tokens) as u64));
        group.bench_with_input(BenchmarkId::new("decode_32", batch), &batch, |b, &batch| {
            b.iter(|| {
                runtime.block_on(async {
                    let futures: Vec<_> = (0..batch)
                        .map(|s| {
                            engine
                                .generate(GenerateRequest::tokens(prompt(16, s as u32), new_tokens))
                        })
                        .collect();
                    for f in futures {
                        f.await.expect("generates");
                    }
                })
            })
        });
    }
    // Scoring ten choices in one request shares the prompt's prefill; ten requests of one
    // choice each compute the prompt once per choice (the baseline of the sharing).
    let choices: Vec<String> = (1..=10).map(|v| v.to_string()).collect();
    group.throughput(Throughput::Elements(choices.len() as u64));
    group.bench_function("score_10_after_256_shared", |b| {
        b.iter(|| {
            let request = ScoreRequest::new(Prompt::Tokens(prompt(256, 2)), choices.clone());
            runtime.block_on(engine.score(request)).expect("scores")
        })
    });
    group.bench_function("score_10_after_256_per_choice", |b| {
        b.iter(|| {
            for choice in &choices {
                let request =
                    ScoreRequest::new(Prompt::Tokens(prompt(256, 2)), vec![choice.clone()]);
                runtime.block_on(engine.score(request)).expect("scores");
            }
        })
    });
    group.finish();
}

/// Choosing one token from a Qwen-sized vocabulary (151,936 logits) with the councils'
/// settings (temperature 0.7, top-p 0.95), by selection (the engine's sampler) and by sorting
/// the vocabulary (the reference), on a flat distribution (a random-weight model's: the
/// nucleus is most of the vocabulary) and a peaked one (a trained model's: a few tokens).
fn sampling_benches(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    let mut group = c.benchmark_group("sample_151936");
    for (name, spread) in [("flat", 1.0f32), ("peaked", 30.0)] {
        let logits: Vec<f32> = (0..151_936)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * spread)
            .collect();
        let sampling = Sampling {
            top_p: 0.95,
            ..Sampling::with_temperature(0.7, 1)
        };
        group.bench_function(BenchmarkId::new("select", name), |b| {
            let mut sampler = Sampler::new(sampling);
            b.iter(|| sampler.sample(&logits, &[]))
        });
        group.bench_function(BenchmarkId::new("sort", name), |b| {
            let mut draws = Rng::new(1);
            b.iter(|| sample_by_sorting(&sampling, &mut draws, &logits))
        });
    }
    group.finish();
}

criterion_group!(benches, engine_benches, sampling_benches);
criterion_main!(benches);
