//! The Qwen2 / Qwen2.5 / Qwen3 decoder, written so that one forward runs a ragged batch: many
//! sequences, each with its own number of new tokens at its own position. The tokens of all
//! sequences are packed along one axis for the projections and the MLP (where batching pays);
//! rotary embeddings take per-token positions; attention runs per sequence against that
//! sequence's KV in the [`KvPool`], with its own causal mask. The model holds weights only.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use super::cache::{BlockId, KvPool, KvShape, KvView};
use super::config::{Arch, Config};

/// New tokens of one sequence in a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk<'a> {
    /// The blocks of the sequence's KV, enough for `start + len` positions.
    pub table: &'a [BlockId],
    /// Position of the first new token, i.e. how many tokens of this sequence are cached.
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
}

/// The sequences of one forward with where their KV lives.
struct KvBatch<'a> {
    chunks: &'a [SeqChunk<'a>],
    /// How each chunk's whole KV (cached and new) is read back.
    views: Vec<KvView>,
    cache: &'a KvPool,
}

/// Which logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits<'a> {
    /// One row per new token, in packed order.
    All,
    /// These rows of the packed tokens, in this order (what scoring needs: the LM head runs
    /// on them only).
    Rows(&'a [u32]),
}

/// Rows up to which a projection is computed as `(W·xᵀ)ᵀ` (see [`Proj::forward`]).
const FEW_ROWS: usize = 8;

/// Rows up to which a CPU f32 projection runs [`few_rows_f32`]: measured on the Qwen2.5-0.5B
/// shape (docs/PERFORMANCE.md), it beats gemm up to 3-4 rows and loses from about 6.
const KERNEL_ROWS: usize = 4;

/// A projection `y = x·Wᵀ + b` over packed rows, `W` being `[out, in]` as checkpoints store it.
#[derive(Debug)]
struct Proj {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Proj {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let y = if rows <= KERNEL_ROWS
            && let Some(y) = few_rows_f32(&self.weight, x)?
        {
            y
        } else if rows <= FEW_ROWS {
            // Decode steps have a handful of rows: with the weight as the left operand the
            // CPU gemm streams it instead of repacking all of it for every call.
            self.weight.matmul(&x.t()?)?.t()?.contiguous()?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x·Wᵀ` for a few rows of `x` on the CPU in f32: each weight row is read once and multiplied
/// with every row of `x` (a decode step is bound by reading the weights, so B rows cost about
/// what one does), output rows split over rayon's threads. Each product is accumulated the same
/// way whatever the number of rows, so a sequence's decode does not depend on its batch.
/// `None` when the tensors are not contiguous f32 on the CPU (the caller falls back to gemm).
fn few_rows_f32(weight: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;

    if !weight.device().is_cpu() || weight.dtype() != DType::F32 || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (out_dim, k) = weight.dims2()?;
    let n = x.dim(0)?;
    if n == 0 {
        // A step whose sequences are all mid-prompt asks for no logits.
        return Ok(Some(Tensor::zeros(
            (0, out_dim),
            DType::F32,
            weight.device(),
        )?));
    }
    if x.dim(1)? != k {
        candle_core::bail!("projection of {} inputs given rows of {}", k, x.dim(1)?);
    }
    let (w_storage, w_layout) = weight.storage_and_layout();
    let (x_storage, x_layout) = x.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(w)), Storage::Cpu(CpuStorage::F32(xs))) =
        (&*w_storage, &*x_storage)
    else {
        return Ok(None);
    };
    let (Some((w0, w1)), Some((x0, x1))) =
        (w_layout.contiguous_offsets(), x_layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (w, xs) = (&w[w0..w1], &xs[x0..x1]);
    // `[out, n]`: output row o holds the n products of weight row o. A weight row (at most a
    // few KiB) stays in the core's cache while it meets each row of x.
    let x_rows: Vec<&[f32]> = xs.chunks_exact(k).collect();
    let mut out = vec![0f32; out_dim * n];
    const BLOCK: usize = 64;
    out.par_chunks_mut(n * BLOCK)
        .enumerate()
        .for_each(|(block, dst)| {
            let rows = dst.len() / n;
            let first = block * BLOCK;
            products(&w[first * k..(first + rows) * k], &x_rows, dst);
        });
    drop((w_storage, x_storage));
    let y = Tensor::from_vec(out, (out_dim, n), weight.device())?;
    Ok(Some(y.t()?.contiguous()?))
}

/// `dst[r * n + j]` = weight row r (of `w`, rows of `x_rows[0].len()`) · `x_rows[j]`. Compiled
/// for AVX2 + FMA as well as the baseline, picked at run time.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn products(w: &[f32], x_rows: &[&[f32]], dst: &mut [f32]) {
    let n = x_rows.len();
    let k = x_rows.first().map_or(0, |x| x.len());
    if k == 0 {
        return;
    }
    for (w_row, dst) in w.chunks_exact(k).zip(dst.chunks_mut(n)) {
        for (d, x_row) in dst.iter_mut().zip(x_rows) {
            *d = dot(w_row, x_row);
        }
    }
}

/// Dot product with eight independent accumulators (so the compiler vectorizes it), summed
/// in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ac, bc) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            acc[l] += ac[l] * bc[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Proj> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Proj::new(weight, bias))
}

#[derive(Debug)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Tables of shape `[max_positions, head_dim / 2]`, computed in f32 the way transformers does.
    fn new(cfg: &Config, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        let base = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let positions = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?,
        })
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, kvh, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let bias = cfg.attention_bias;
        let (q_norm, k_norm) = match cfg.arch {
            Arch::Qwen3 => (
                Some(candle_nn::rms_norm(d, cfg.rms_norm_eps, vb.pp("q_norm"))?),
                Some(candle_nn::rms_norm(d, cfg.rms_norm_eps, vb.pp("k_norm"))?),
            ),
            Arch::Qwen2 => (None, None),
        };
        Ok(Self {
            q_proj: linear(cfg.hidden_size, h * d, bias, vb.pp("q_proj"))?,
            k_proj: linear(cfg.hidden_size, kvh * d, bias, vb.pp("k_proj"))?,
            v_proj: linear(cfg.hidden_size, kvh * d, bias, vb.pp("v_proj"))?,
            o_proj: linear(h * d, cfg.hidden_size, false, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
        })
    }

    /// `x` is `[tokens, hidden]` packed over `chunks`; `cos`/`sin` are `[tokens, head_dim/2]`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layer: usize,
        kv: &KvBatch,
    ) -> candle_core::Result<Tensor> {
        let tokens = x.dim(0)?;
        let heads_first = |t: Tensor, heads: usize, norm: &Option<RmsNorm>| {
            let t = t.reshape((tokens, heads, self.head_dim))?;
            let t = match norm {
                Some(n) => n.forward(&t)?,
                None => t,
            };
            t.transpose(0, 1)?.unsqueeze(0)?.contiguous()
        };
        let q = heads_first(self.q_proj.forward(x)?, self.heads, &self.q_norm)?;
        let k = heads_first(self.k_proj.forward(x)?, self.kv_heads, &self.k_norm)?;
        let v = heads_first(self.v_proj.forward(x)?, self.kv_heads, &None)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?;
        let v = v.squeeze(0)?;

        let groups = self.heads / self.kv_heads;
        let mut offset = 0;
        let mut outputs = Vec::with_capacity(kv.chunks.len());
        for (chunk, view) in kv.chunks.iter().zip(&kv.views) {
            let n = chunk.len;
            let k_new = k.narrow(1, offset, n)?.contiguous()?;
            let v_new = v.narrow(1, offset, n)?.contiguous()?;
            kv.cache
                .write(layer, chunk.table, chunk.start, &k_new, &v_new)?;
            let (k_all, v_all) = kv.cache.read(layer, view)?;
            // Query heads of one KV group are adjacent, so grouping is a reshape, not a copy
            // of K and V per query head.
            let q_chunk = q.narrow(1, offset, n)?.contiguous()?.reshape((
                self.kv_heads,
                groups * n,
                self.head_dim,
            ))?;
            let scores = (q_chunk.matmul(&k_all.t()?)? * self.scale)?;
            let scores = if n > 1 {
                let mask = causal_mask(n, chunk.start, groups, x.device())?;
                scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            // A sliced view is strided only in its batch dim, which matmul takes as it is.
            let out = probs.matmul(&v_all)?; // [kv_heads, groups * n, head_dim]
            let out = out
                .reshape((self.heads, n, self.head_dim))?
                .transpose(0, 1)?
                .reshape((n, self.heads * self.head_dim))?;
            outputs.push(out);
            offset += n;
        }
        let out = Tensor::cat(&outputs, 0)?;
        self.o_proj.forward(&out)
    }
}

/// Additive mask `[groups * n, start + n]`: new token `i` sees positions `0..=start + i`.
fn causal_mask(
    n: usize,
    start: usize,
    groups: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = start + n;
    let mut mask = Vec::with_capacity(groups * n * total);
    for _ in 0..groups {
        for i in 0..n {
            mask.extend((0..total).map(|j| {
                if j <= start + i {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Tensor::from_vec(mask, (groups * n, total), device)
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            gate_proj: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                false,
                vb.pp("gate_proj"),
            )?,
            up_proj: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                false,
                vb.pp("up_proj"),
            )?,
            down_proj: linear(
                cfg.intermediate_size,
                cfg.hidden_size,
                false,
                vb.pp("down_proj"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Qwen causal language model: weights and rotary tables, no KV state.
#[derive(Debug)]
pub struct QwenModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    config: Config,
    device: Device,
    dtype: DType,
}

impl QwenModel {
    /// Builds the model from weights named as transformers names them (`model.layers.N...`).
    pub fn new(config: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let _span = tracing::info_span!("qwen_load", arch = config.arch.as_str()).entered();
        let m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(config.vocab_size, config.hidden_size, m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            layers.push(DecoderLayer {
                input_layernorm: candle_nn::rms_norm(
                    config.hidden_size,
                    config.rms_norm_eps,
                    l.pp("input_layernorm"),
                )?,
                self_attn: Attention::new(config, l.pp("self_attn"))?,
                post_attention_layernorm: candle_nn::rms_norm(
                    config.hidden_size,
                    config.rms_norm_eps,
                    l.pp("post_attention_layernorm"),
                )?,
                mlp: Mlp::new(config, l.pp("mlp"))?,
            });
        }
        let norm = candle_nn::rms_norm(config.hidden_size, config.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if config.tie_word_embeddings {
            Proj::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear(
                config.hidden_size,
                config.vocab_size,
                false,
                vb.pp("lm_head"),
            )?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(config, vb.dtype(), vb.device())?,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.config.num_hidden_layers,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs `tokens` (packed in the order of `chunks`) through the model, writing their KV into
    /// `cache`, and returns f32 logits as `logits` asks.
    pub fn forward(
        &self,
        tokens: &[u32],
        chunks: &[SeqChunk],
        logits: Logits,
        cache: &KvPool,
    ) -> candle_core::Result<Tensor> {
        let _span =
            tracing::debug_span!("qwen_forward", tokens = tokens.len(), seqs = chunks.len())
                .entered();
        let packed: usize = chunks.iter().map(|c| c.len).sum();
        if packed != tokens.len() || chunks.iter().any(|c| c.len == 0) {
            candle_core::bail!("chunks cover {packed} tokens, {} were given", tokens.len());
        }
        let mut positions = Vec::with_capacity(tokens.len());
        let mut views = Vec::with_capacity(chunks.len());
        for c in chunks {
            if c.start + c.len > self.config.max_position_embeddings {
                candle_core::bail!(
                    "sequence position {} is past the context window",
                    c.start + c.len
                );
            }
            positions.extend((c.start..c.start + c.len).map(|p| p as u32));
            views.push(cache.view(c.table, c.start + c.len)?);
        }
        let kv = KvBatch {
            chunks,
            views,
            cache,
        };
        let positions = Tensor::new(positions, &self.device)?;
        let cos = self.rotary.cos.index_select(&positions, 0)?;
        let sin = self.rotary.sin.index_select(&positions, 0)?;

        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer.self_attn.forward(&h, &cos, &sin, i, &kv)?;
            x = (x + h)?;
            let h = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x)?)?;
            x = (x + h)?;
        }
        let x = match logits {
            Logits::All => x,
            Logits::Rows([]) => {
                // A step whose sequences are all mid-prompt samples nothing: no LM head.
                return Tensor::zeros((0, self.config.vocab_size), DType::F32, &self.device);
            }
            Logits::Rows(rows) => x.index_select(&Tensor::new(rows, &self.device)?, 0)?,
        };
        let x = self.norm.forward(&x)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }
}

/// The logits of row `i` as a host vector.
pub fn logits_row(logits: &Tensor, i: usize) -> candle_core::Result<Vec<f32>> {
    logits.i(i)?.to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    }

    #[test]
    fn few_rows_kernel_matches_gemm_and_does_not_depend_on_the_batch() -> candle_core::Result<()> {
        let device = Device::Cpu;
        // 37 inputs: four whole chunks of eight and a tail of five.
        let (out_dim, k) = (150, 37);
        let weight = Tensor::randn(0f32, 1.0, (out_dim, k), &device)?;
        let x = Tensor::randn(0f32, 1.0, (KERNEL_ROWS, k), &device)?;
        let all = few_rows_f32(&weight, &x)?.expect("contiguous f32 on the CPU");
        let gemm = x.matmul(&weight.t()?)?;
        for (a, b) in values(&all).iter().zip(values(&gemm)) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        // Each row alone gives bit for bit what it gives in the batch.
        for j in 0..KERNEL_ROWS {
            let alone = few_rows_f32(&weight, &x.narrow(0, j, 1)?)?.expect("kernel");
            assert_eq!(values(&alone), values(&all.narrow(0, j, 1)?), "row {j}");
        }
        // No rows (a step that samples nothing): no products.
        let none = few_rows_f32(&weight, &x.narrow(0, 0, 0)?)?.expect("kernel");
        assert_eq!(none.dims(), &[0, out_dim]);
        // Not f32: the caller falls back to gemm.
        assert!(few_rows_f32(&weight.to_dtype(DType::BF16)?, &x)?.is_none());
        Ok(())
    }
}
