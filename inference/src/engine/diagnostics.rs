//! Diagnostics that run a model directly, beside the engine thread: a sequence's logits at
//! every position (parity checks, scoring tools) and a quantized model measured against its
//! f32 self (`council dev quant-error`).

use candle_core::DType;

use super::cache::KvPool;
use super::loader::{DeviceChoice, ModelFiles, load_as};
use super::model::{Logits, QwenModel, SeqChunk};
use super::quant::Quantization;
use super::sampler::argmax;
use crate::error::LoadError;

/// Full-sequence logits `[tokens, vocab]` of one token sequence, computed directly on a model
/// with a private cache (no engine thread). For parity checks and scoring tools.
pub fn sequence_logits(model: &QwenModel, tokens: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let block_size = 16;
    let mut pool = KvPool::new(
        model.kv_shape(),
        tokens.len().div_ceil(block_size).max(1),
        block_size,
        model.dtype(),
        model.device().clone(),
        false,
    )?;
    let table: Vec<_> = (0..pool.total_blocks())
        .filter_map(|_| pool.allocate())
        .collect();
    let chunk = SeqChunk {
        table: &table,
        start: 0,
        len: tokens.len(),
        decode: false,
    };
    model
        .forward(tokens, &[chunk], Logits::All, &pool)?
        .to_vec2::<f32>()
}

/// The logits at every position of each of `prompts`, one row per position, prompt after
/// prompt, of the model of `files` loaded as the engine loads it on `device` (bf16 on a GPU,
/// f32 on the CPU) with `quantization` (`council dev gpu-check` compares devices with it).
pub fn logits_on(
    files: &ModelFiles,
    device: DeviceChoice,
    quantization: Quantization,
    prompts: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>, LoadError> {
    let device = device.open()?;
    let loaded = load_as(
        files,
        "compared",
        &device,
        super::dtype_on(&device),
        quantization,
    )?;
    let mut rows = Vec::new();
    for prompt in prompts {
        rows.extend(
            sequence_logits(&loaded.model, prompt)
                .map_err(|e| LoadError::Device(format!("forward on {device:?}: {e}")))?,
        );
    }
    Ok(rows)
}

/// A quantized model measured against its f32 self: see [`compare_with_f32`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantReport {
    pub drift: LogitDrift,
    /// [`QwenModel::weight_bytes`] of each.
    pub f32_bytes: usize,
    pub quantized_bytes: usize,
    pub f32_load: std::time::Duration,
    pub quantized_load: std::time::Duration,
}

/// Loads the model of `files` on the CPU in f32 and then quantized as `quantization` says
/// (one at a time, so peak memory is the larger of the two), runs `tokens` through each and
/// compares their logits at every position.
pub fn compare_with_f32(
    files: &ModelFiles,
    quantization: Quantization,
    tokens: &[u32],
) -> Result<QuantReport, LoadError> {
    if quantization == Quantization::None {
        return Err(LoadError::InvalidConfig {
            field: "quantization",
            reason: format!(
                "none compares f32 with itself; name a quantization ({})",
                Quantization::CHOICES
            ),
        });
    }
    if tokens.is_empty() {
        return Err(LoadError::InvalidConfig {
            field: "prompt_tokens",
            reason: "must be at least 1".into(),
        });
    }
    let run = |q: Quantization| -> Result<_, LoadError> {
        let start = std::time::Instant::now();
        let loaded = load_as(files, "compared", &candle_core::Device::Cpu, DType::F32, q)?;
        let load = start.elapsed();
        let rows = sequence_logits(&loaded.model, tokens)
            .map_err(|e| LoadError::Device(format!("forward with {q} weights: {e}")))?;
        Ok((rows, loaded.model.weight_bytes(), load))
    };
    let (exact, f32_bytes, f32_load) = run(Quantization::None)?;
    let (approx, quantized_bytes, quantized_load) = run(quantization)?;
    let drift = logit_drift(&exact, &approx).map_err(LoadError::Device)?;
    Ok(QuantReport {
        drift,
        f32_bytes,
        quantized_bytes,
        f32_load,
        quantized_load,
    })
}

/// How far one set of logits rows (say a quantized model's) is from reference rows over the
/// same positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitDrift {
    pub positions: usize,
    /// Largest |Δ| over every position and token.
    pub max_abs: f64,
    /// Mean |Δ| over every position and token.
    pub mean_abs: f64,
    /// Mean over positions of the reference logits' standard deviation (their scale).
    pub mean_spread: f64,
    /// Positions where both pick the same most likely token.
    pub same_top: usize,
    /// Mean over positions of KL(reference ‖ other) of the softmax distributions, in nats.
    pub mean_kl: f64,
}

/// Compares `other` against `reference`, row by row (one row per position).
pub fn logit_drift(reference: &[Vec<f32>], other: &[Vec<f32>]) -> Result<LogitDrift, String> {
    if reference.len() != other.len() || reference.is_empty() {
        return Err(format!(
            "{} reference rows against {} others",
            reference.len(),
            other.len()
        ));
    }
    let mut drift = LogitDrift {
        positions: reference.len(),
        max_abs: 0.0,
        mean_abs: 0.0,
        mean_spread: 0.0,
        same_top: 0,
        mean_kl: 0.0,
    };
    for (r, o) in reference.iter().zip(other) {
        if r.len() != o.len() || r.is_empty() {
            return Err(format!("rows of {} and {} logits", r.len(), o.len()));
        }
        let n = r.len() as f64;
        let mean = r.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let variance = r
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        drift.mean_spread += variance.sqrt();
        let mut abs = 0.0;
        for (&x, &y) in r.iter().zip(o) {
            let d = f64::from((x - y).abs());
            drift.max_abs = drift.max_abs.max(d);
            abs += d;
        }
        drift.mean_abs += abs / n;
        drift.same_top += usize::from(argmax(r) == argmax(o));
        let (lr, lo) = (log_softmax(r), log_softmax(o));
        drift.mean_kl += lr
            .iter()
            .zip(&lo)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
    }
    let positions = drift.positions as f64;
    drift.mean_abs /= positions;
    drift.mean_spread /= positions;
    drift.mean_kl /= positions;
    Ok(drift)
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let log_sum = row
        .iter()
        .map(|&x| (f64::from(x) - max).exp())
        .sum::<f64>()
        .ln();
    row.iter().map(|&x| f64::from(x) - max - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_of_known_rows() {
        let reference = vec![vec![0.0f32, 1.0, 2.0, 3.0], vec![1.0, 1.0, 1.0, 1.0]];
        assert_eq!(
            logit_drift(&reference, &reference),
            Ok(LogitDrift {
                positions: 2,
                max_abs: 0.0,
                mean_abs: 0.0,
                mean_spread: (1.25f64.sqrt() + 0.0) / 2.0,
                same_top: 2,
                mean_kl: 0.0,
            })
        );
        // A constant shift changes no probability; swapping the top two changes the top.
        let other = vec![vec![5.0f32, 6.0, 7.0, 8.0], vec![1.0, 1.0, 1.0, 1.0]];
        let d = logit_drift(&reference, &other).expect("same shapes");
        assert_eq!((d.max_abs, d.mean_abs), (5.0, 2.5));
        assert!(d.mean_kl.abs() < 1e-12, "{}", d.mean_kl);
        let other = vec![vec![0.0f32, 1.0, 3.0, 2.0], vec![1.0, 1.0, 1.0, 1.0]];
        let d = logit_drift(&reference, &other).expect("same shapes");
        assert_eq!(d.same_top, 1);
        assert!(d.mean_kl > 0.1, "{}", d.mean_kl);
        assert!(logit_drift(&reference, &reference[..1]).is_err());
        assert!(logit_drift(&[vec![1.0]], &[vec![1.0, 2.0]]).is_err());
    }
}
