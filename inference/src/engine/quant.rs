//! Quantized weights for the CPU engine: `--quantize q8_0` keeps every linear layer (and the
//! token embedding, which the LM head shares in tied checkpoints) as Q8_0 blocks, 32 weights
//! with one f16 scale each: 8.5 bits a weight instead of 32, so a decode step, which is bound
//! by reading the weights, reads about a quarter of the bytes.
//!
//! Weights are quantized as they are read from the checkpoint ([`super::loader`]), one tensor
//! at a time, so the f32 model is never whole in memory. Products dequantize the weights
//! (exactly) and multiply in f32 ([`project`]): the activations keep full precision, and a
//! row's products are the same whatever else shares the call, so a sequence's logits do not
//! depend on its batch (tested below and in the engine's tests).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::kernel::{Q8_0_BLOCK as BLOCK, Q8_0_BLOCK_BYTES as BLOCK_BYTES, dequantize_q8_0};
use crate::error::LoadError;

/// How the engine holds the weights of its linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// As loaded: f32 on the CPU, bf16 on a GPU.
    #[default]
    None,
    /// Q8_0 blocks (CPU only).
    Q8_0,
}

impl Quantization {
    /// The accepted spellings, for error messages and help.
    pub const CHOICES: &'static str = "none, q8_0";

    /// Parses `none` or `q8_0` (any case).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!(
                "unknown quantization {other:?} (choose one of: {})",
                Self::CHOICES
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Q8_0 => "q8_0",
        }
    }

    fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::None => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Quantizes the 2-D weight `name` (`[out, in]`, on the CPU) as `quantization` says; `None`
/// when it says to keep weights as they are.
pub fn quantize_weight(
    name: &str,
    weight: &Tensor,
    quantization: Quantization,
) -> Result<Option<Arc<QTensor>>, LoadError> {
    let Some(ggml) = quantization.ggml() else {
        return Ok(None);
    };
    let invalid = |reason: String| LoadError::InvalidConfig {
        field: "quantization",
        reason,
    };
    let (rows, cols) = weight
        .dims2()
        .map_err(|_| invalid(format!("{name} is not a matrix: {:?}", weight.dims())))?;
    if !cols.is_multiple_of(BLOCK) {
        return Err(invalid(format!(
            "cannot hold {name} ({rows}×{cols}) as {quantization}: its rows of {cols} weights \
             are not a whole number of {BLOCK}-weight blocks"
        )));
    }
    let weight = weight
        .to_dtype(DType::F32)
        .map_err(|e| invalid(format!("{name}: {e}")))?;
    QTensor::quantize(&weight, ggml)
        .map(|q| Some(Arc::new(q)))
        .map_err(|e| invalid(format!("{name}: {e}")))
}

/// `x·Wᵀ` for the rows of `x` (`[n, in]`, f32 on the CPU) against quantized `W`
/// (`[out, in]`). A few rows (`few`: decode steps) go through the projection kernel, which
/// dequantizes a panel of weight rows at a time in cache; many (prefill) through gemm on the
/// whole weight dequantized. Both multiply the same f32 values (dequantizing is exact), as the
/// f32 engine's two paths do, and the activations are never rounded.
pub fn project(weight: &QTensor, x: &Tensor, few: bool) -> candle_core::Result<Tensor> {
    let (out_dim, k) = weight.shape().dims2()?;
    if few {
        let data = weight.data()?;
        return super::kernel::project_q8_0(&data, out_dim, k, x);
    }
    x.matmul(&weight.dequantize(x.device())?.t()?)
}
/// The rows `ids` of a quantized `[vocab, hidden]` embedding, dequantized to f32 `[ids, hidden]`.
pub fn embed(weight: &QTensor, ids: &[u32]) -> candle_core::Result<Tensor> {
    if weight.dtype() != GgmlDType::Q8_0 {
        candle_core::bail!("embedding lookup of {:?} weights", weight.dtype());
    }
    let (vocab, hidden) = weight.shape().dims2()?;
    let data = weight.data()?;
    let row_bytes = hidden / BLOCK * BLOCK_BYTES;
    if data.len() != vocab * row_bytes {
        candle_core::bail!(
            "embedding holds {} bytes, not {vocab} rows of {row_bytes}",
            data.len()
        );
    }
    let mut out = vec![0f32; ids.len() * hidden];
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
        let id = id as usize;
        if id >= vocab {
            candle_core::bail!("token id {id} is outside the embedding of {vocab} rows");
        }
        dequantize_q8_0(&data[id * row_bytes..(id + 1) * row_bytes], row);
    }
    Tensor::from_vec(out, (ids.len(), hidden), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// Seeded standard-normal values, so a failure reproduces.
    fn randn(seed: u64, shape: (usize, usize)) -> candle_core::Result<Tensor> {
        let mut rng = crate::rng::Rng::new(seed);
        let data = (0..shape.0 * shape.1)
            .map(|_| rng.next_normal() as f32)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    }

    #[test]
    fn parses_the_choices_and_refuses_others_with_the_list() {
        assert_eq!(Quantization::parse("q8_0"), Ok(Quantization::Q8_0));
        assert_eq!(Quantization::parse(" Q8_0 "), Ok(Quantization::Q8_0));
        assert_eq!(Quantization::parse("none"), Ok(Quantization::None));
        let err = Quantization::parse("q4_k").expect_err("unknown");
        assert!(err.contains("q4_k") && err.contains("none, q8_0"), "{err}");
        assert_eq!(Quantization::Q8_0.to_string(), "q8_0");
    }

    #[test]
    fn embedding_rows_are_the_dequantized_rows() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let weight = randn(1, (50, 64))?;
        let q = quantize_weight("embed", &weight, Quantization::Q8_0)
            .expect("quantizes")
            .expect("q8_0");
        let all = q.dequantize(&device)?;
        let ids = [7u32, 0, 49, 7];
        let rows = embed(&q, &ids)?;
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(
                values(&rows.i(i)?),
                values(&all.i(id as usize)?),
                "row {id}"
            );
        }
        // Within a block's rounding of the original: half a step (scale = max |w| / 127), and
        // the scale's own rounding to f16 (2^-11 relative) on up to 127 steps.
        let original = values(&weight.i(7)?);
        let row = values(&rows.i(0)?);
        for (block, back) in original.chunks(BLOCK).zip(row.chunks(BLOCK)) {
            let step = block.iter().fold(0f32, |m, w| m.max(w.abs())) / 127.0;
            for (x, y) in block.iter().zip(back) {
                assert!((x - y).abs() <= step * (0.5 + 127.0 / 2048.0), "{x} vs {y}");
            }
        }
        let err = embed(&q, &[50])
            .expect_err("past the vocabulary")
            .to_string();
        assert!(err.contains("token id 50"), "{err}");
        Ok(())
    }

    #[test]
    fn products_are_close_to_f32_and_do_not_depend_on_the_batch() -> candle_core::Result<()> {
        // 37 blocks of inputs (no multiple of the kernel's vector width or panel) and 150
        // outputs (panels of 16 and blocks of 64 with remainders).
        let (out_dim, k) = (150, 37 * BLOCK);
        let weight = randn(2, (out_dim, k))?;
        let q = quantize_weight("w", &weight, Quantization::Q8_0)
            .expect("quantizes")
            .expect("q8_0");
        let x = randn(3, (11, k))?;
        let kernel = project(&q, &x, true)?;
        let gemm = project(&q, &x, false)?;
        assert_eq!(kernel.dims(), [11, out_dim]);
        // Both paths multiply the dequantized weights, in f32.
        let dequantized = x.matmul(&q.dequantize(&Device::Cpu)?.t()?)?;
        for (path, y) in [("kernel", &kernel), ("gemm", &gemm)] {
            for (a, b) in values(y).iter().zip(values(&dequantized)) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{path}: {a} vs {b}"
                );
            }
        }
        // Against the unrounded weights: products of 1184 unit-variance terms have a spread
        // of ~34; rounding the weights to steps of ~2.2/127 in blocks of 32 moves them by
        // ~0.17 (standard deviation). A wrong block layout or scale would move them by their
        // own size.
        let errors: Vec<f32> = values(&kernel)
            .iter()
            .zip(values(&x.matmul(&weight.t()?)?))
            .map(|(a, b)| (a - b).abs())
            .collect();
        let worst = errors.iter().fold(0f32, |m, e| m.max(*e));
        let mean = errors.iter().sum::<f32>() / (errors.len() as f32);
        assert!(
            worst < 1.0 && mean < 0.3,
            "worst error {worst}, mean {mean}"
        );
        // A row's products are the same alone or in any batch.
        for j in 0..11 {
            let alone = project(&q, &x.narrow(0, j, 1)?, true)?;
            assert_eq!(values(&alone), values(&kernel.narrow(0, j, 1)?), "row {j}");
        }
        for n in [2, 3, 4, 5, 8] {
            let some = project(&q, &x.narrow(0, 0, n)?, true)?;
            assert_eq!(values(&some), values(&kernel.narrow(0, 0, n)?), "{n} rows");
        }
        Ok(())
    }

    #[test]
    fn refuses_rows_that_are_not_whole_blocks_and_keeps_weights_when_off() {
        let weight = Tensor::zeros((4, 40), DType::F32, &Device::Cpu).expect("zeros");
        let err = quantize_weight(
            "model.layers.0.mlp.up_proj.weight",
            &weight,
            Quantization::Q8_0,
        )
        .expect_err("40 is not whole blocks")
        .to_string();
        assert!(
            err.contains("up_proj") && err.contains("40") && err.contains("32-weight"),
            "{err}"
        );
        assert!(
            quantize_weight("w", &weight, Quantization::None)
                .expect("no-op")
                .is_none()
        );
    }
}
