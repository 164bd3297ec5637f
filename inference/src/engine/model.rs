//! The Qwen2 / Qwen2.5 / Qwen3 / Llama decoder, written so that one forward runs a ragged batch: many
//! sequences, each with its own number of new tokens at its own position. The tokens of all
//! sequences are packed along one axis for the projections and the MLP (where batching pays);
//! rotary embeddings take per-token positions; attention runs per sequence against that
//! sequence's KV in the [`KvPool`], with its own causal mask. The model holds weights only.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use super::cache::{BlockId, KvPool, KvShape, KvView};
use super::config::{Arch, Config};
use super::quant::Quantization;
use super::tokenizer::ChatTokenizer;

/// New tokens of one sequence in a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk<'a> {
    /// The blocks of the sequence's KV, enough for `start + len` positions.
    pub table: &'a [BlockId],
    /// Position of the first new token, i.e. how many tokens of this sequence are cached.
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
    /// The chunk is the token the sequence sampled last (a decode step, `len` 1), not part of
    /// a prompt. Decode chunks come first in a forward.
    pub decode: bool,
}

/// The sequences of one forward with where their KV lives.
struct KvBatch<'a> {
    chunks: &'a [SeqChunk<'a>],
    reads: KvReads,
    /// Packed rows of the leading decode chunks (see [`Proj::forward`]).
    lead: usize,
    cache: &'a KvPool,
}

/// How attention reads each chunk's whole KV (cached and new).
enum KvReads {
    /// On the CPU in f32: per chunk, the storage rows of its positions `0..start + len`; every
    /// token attends straight from the pool ([`super::attention::attend`]).
    Rows(Vec<Vec<u32>>),
    /// Elsewhere: per chunk, its KV gathered for candle's matrix products.
    Views(Vec<KvView>),
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

/// Rows a product through gemm needs on the CPU for each row's products not to depend on the
/// rows beside it, for `out` outputs. gemm computes one row as a matrix-vector product, and
/// products of at most 256 outputs in all by small kernels of their own, each rounding
/// otherwise than its general path; on the general path a product is one chain of multiply-
/// adds per block of 512 inputs (at least; the block depends on the inputs and the cache
/// sizes only) whatever the rows, which `gemm_rows_do_not_depend_on_their_neighbours`
/// checks on the Qwen2.5-0.5B shapes. Fewer rows are padded.
fn gemm_min_rows(out: usize) -> usize {
    (256 / out.max(1) + 1).max(2)
}

/// A projection `y = x·Wᵀ + b`, `W` being `[out, in]` as checkpoints store it.
#[derive(Debug)]
struct Proj {
    weight: Weight,
    bias: Option<Tensor>,
}

/// The weight of a projection: as loaded, or quantized ([`super::quant`]).
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Proj {
    /// `x·Wᵀ + b` for the rows of `x`, whose first `lead` rows are decode tokens.
    ///
    /// On the CPU (f32 or Q8_0 weights) each row's products are the same whatever else the
    /// step holds, to the bit: decode rows always go through the few-rows kernel
    /// ([`super::kernel`]), which reads every weight row once for all of them and whose
    /// products do not depend on the rows beside them; prompt rows always go through gemm,
    /// padded to [`gemm_min_rows`]. Elsewhere (a GPU) everything goes through the device's
    /// matrix product.
    fn forward(&self, x: &Tensor, lead: usize) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let y = if !self.has_kernel() {
            self.gemm(x)?
        } else if lead >= n {
            self.kernel(x)?
        } else if lead == 0 {
            self.gemm_padded(x)?
        } else {
            let head = self.kernel(&x.narrow(0, 0, lead)?)?;
            let tail = self.gemm_padded(&x.narrow(0, lead, n - lead)?)?;
            Tensor::cat(&[head, tail], 0)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Whether this projection has the few-rows kernel (weights in CPU memory, f32 or Q8_0).
    fn has_kernel(&self) -> bool {
        match &self.weight {
            Weight::Quantized(_) => true,
            Weight::Dense(w) => w.device().is_cpu() && w.dtype() == DType::F32,
        }
    }

    /// `x·Wᵀ` by the few-rows kernel.
    fn kernel(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Quantized(w) => super::quant::project(w, x, true),
            Weight::Dense(w) => match super::kernel::project(w, x)? {
                Some(y) => Ok(y),
                None => candle_core::bail!("the projection kernel takes f32 weights on the CPU"),
            },
        }
    }

    /// `x·Wᵀ` by gemm.
    fn gemm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Quantized(w) => super::quant::project(w, x, false),
            Weight::Dense(w) => x.matmul(&w.t()?),
        }
    }

    /// `x·Wᵀ` by gemm, with zero rows added below `x` up to [`gemm_min_rows`] and their
    /// products dropped.
    fn gemm_padded(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let out = match &self.weight {
            Weight::Dense(w) => w.dim(0)?,
            Weight::Quantized(w) => w.shape().dims()[0],
        };
        let min = gemm_min_rows(out);
        if n >= min {
            return self.gemm(x);
        }
        let pad = Tensor::zeros((min - n, x.dim(1)?), x.dtype(), x.device())?;
        self.gemm(&Tensor::cat(&[x, &pad], 0)?)?.narrow(0, 0, n)
    }
}

/// Weights the loader hands over already quantized, by checkpoint name.
pub type QuantizedWeights = HashMap<String, Arc<QTensor>>;

/// The weight `{vb's prefix}.weight` of shape `[out_dim, in_dim]`: the quantized one when the
/// loader quantized it, else the dense one.
fn weight(
    in_dim: usize,
    out_dim: usize,
    vb: &VarBuilder,
    quantized: &QuantizedWeights,
) -> candle_core::Result<Weight> {
    let name = format!("{}.weight", vb.prefix());
    match quantized.get(&name) {
        Some(q) => {
            if q.shape().dims() != [out_dim, in_dim] {
                candle_core::bail!(
                    "{name} has shape {:?}, expected [{out_dim}, {in_dim}]",
                    q.shape().dims()
                );
            }
            Ok(Weight::Quantized(q.clone()))
        }
        None => Ok(Weight::Dense(vb.get((out_dim, in_dim), "weight")?)),
    }
}

fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    quantized: &QuantizedWeights,
) -> candle_core::Result<Proj> {
    let weight = weight(in_dim, out_dim, &vb, quantized)?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Proj { weight, bias })
}

/// The token embedding: a dense table, or the quantized one (dequantized row by row).
#[derive(Debug)]
enum Embed {
    Dense(Embedding),
    Quantized(Arc<QTensor>),
}

impl Embed {
    fn forward(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Embed::Dense(e) => e.forward(&Tensor::new(ids, device)?),
            Embed::Quantized(q) => super::quant::embed(q, ids),
        }
    }
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
        let inv_freq = cfg.rope_scaling.inv_freq(cfg.rope_theta, cfg.head_dim);
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
    fn new(cfg: &Config, vb: VarBuilder, q: &QuantizedWeights) -> candle_core::Result<Self> {
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
            Arch::Qwen2 | Arch::Llama => (None, None),
        };
        Ok(Self {
            q_proj: linear(cfg.hidden_size, h * d, bias, vb.pp("q_proj"), q)?,
            k_proj: linear(cfg.hidden_size, kvh * d, bias, vb.pp("k_proj"), q)?,
            v_proj: linear(cfg.hidden_size, kvh * d, bias, vb.pp("v_proj"), q)?,
            o_proj: linear(h * d, cfg.hidden_size, false, vb.pp("o_proj"), q)?,
            q_norm,
            k_norm,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
        })
    }

    /// Attention outputs `[tokens, heads * head_dim]`, in packed order, each token against
    /// its own positions straight from the pool; `rows` are the chunks' storage rows.
    fn direct(
        &self,
        q: &Tensor,
        layer: usize,
        kv: &KvBatch,
        rows: &[Vec<u32>],
    ) -> candle_core::Result<Tensor> {
        let device = q.device().clone();
        // `[tokens, heads * head_dim]`: each token's query heads side by side.
        let q = q.transpose(0, 1)?.flatten_from(1)?.to_vec2::<f32>()?;
        let mut tokens = q.iter();
        let mut queries = Vec::with_capacity(q.len());
        for (chunk, rows) in kv.chunks.iter().zip(rows) {
            for (t, q) in tokens.by_ref().take(chunk.len).enumerate() {
                queries.push(super::attention::Query {
                    q,
                    rows: &rows[..chunk.start + t + 1],
                });
            }
        }
        let (k, v) = kv.cache.layer(layer);
        let heads = super::attention::Heads {
            kv_heads: self.kv_heads,
            groups: self.heads / self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
        };
        let Some(outs) = super::attention::attend(k, v, heads, &queries)? else {
            candle_core::bail!("the KV pool is not f32 in CPU memory");
        };
        let out: Vec<f32> = outs.into_iter().flatten().collect();
        Tensor::from_vec(out, (q.len(), self.heads * self.head_dim), &device)
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
        let lead = kv.lead;
        let heads_first = |t: Tensor, heads: usize, norm: &Option<RmsNorm>| {
            let t = t.reshape((tokens, heads, self.head_dim))?;
            let t = match norm {
                Some(n) => n.forward(&t)?,
                None => t,
            };
            t.transpose(0, 1)?.unsqueeze(0)?.contiguous()
        };
        let q = heads_first(self.q_proj.forward(x, lead)?, self.heads, &self.q_norm)?;
        let k = heads_first(self.k_proj.forward(x, lead)?, self.kv_heads, &self.k_norm)?;
        let v = heads_first(self.v_proj.forward(x, lead)?, self.kv_heads, &None)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?;
        let v = v.squeeze(0)?;

        let groups = self.heads / self.kv_heads;
        let mut offset = 0;
        for chunk in kv.chunks {
            let (k_new, v_new) = (
                k.narrow(1, offset, chunk.len)?.contiguous()?,
                v.narrow(1, offset, chunk.len)?.contiguous()?,
            );
            kv.cache
                .write(layer, chunk.table, chunk.start, &k_new, &v_new)?;
            offset += chunk.len;
        }
        let views = match &kv.reads {
            KvReads::Rows(rows) => {
                let out = self.direct(&q, layer, kv, rows)?;
                return self.o_proj.forward(&out, lead);
            }
            KvReads::Views(views) => views,
        };
        let mut offset = 0;
        let mut outputs = Vec::with_capacity(kv.chunks.len());
        for (chunk, view) in kv.chunks.iter().zip(views) {
            let n = chunk.len;
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
        self.o_proj.forward(&out, lead)
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
    fn new(cfg: &Config, vb: VarBuilder, q: &QuantizedWeights) -> candle_core::Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(hidden, inter, false, vb.pp("gate_proj"), q)?,
            up_proj: linear(hidden, inter, false, vb.pp("up_proj"), q)?,
            down_proj: linear(inter, hidden, false, vb.pp("down_proj"), q)?,
        })
    }

    /// `lead` as for [`Proj::forward`].
    fn forward(&self, x: &Tensor, lead: usize) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x, lead)?)?;
        self.down_proj
            .forward(&(gate * self.up_proj.forward(x, lead)?)?, lead)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A model ready to run: weights on the device and its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: QwenModel,
    pub tokenizer: ChatTokenizer,
    pub name: String,
}

/// A Qwen causal language model: weights and rotary tables, no KV state.
#[derive(Debug)]
pub struct QwenModel {
    embed_tokens: Embed,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    config: Config,
    device: Device,
    dtype: DType,
    quantization: Quantization,
}

/// The projections of one decoder layer, as checkpoints name them under `model.layers.N`.
const LAYER_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl QwenModel {
    /// Builds the model from weights named as transformers names them (`model.layers.N...`).
    pub fn new(config: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_quantized(config, vb, &QuantizedWeights::new(), Quantization::None)
    }

    /// Checkpoint names of the weights a quantized model holds quantized: every linear layer,
    /// the token embedding and, in untied checkpoints, the LM head.
    pub fn quantizable_weights(config: &Config) -> Vec<String> {
        let mut names = vec!["model.embed_tokens.weight".to_owned()];
        if !config.tie_word_embeddings {
            names.push("lm_head.weight".to_owned());
        }
        for layer in 0..config.num_hidden_layers {
            for proj in LAYER_PROJECTIONS {
                names.push(format!("model.layers.{layer}.{proj}.weight"));
            }
        }
        names
    }

    /// Builds the model taking the weights in `quantized` (all of
    /// [`Self::quantizable_weights`] when `quantization` is not `None`) from there, the rest
    /// from `vb`.
    pub fn with_quantized(
        config: &Config,
        vb: VarBuilder,
        quantized: &QuantizedWeights,
        quantization: Quantization,
    ) -> candle_core::Result<Self> {
        let _span = tracing::info_span!("qwen_load", arch = config.arch.as_str()).entered();
        if quantization != Quantization::None
            && let Some(missing) = Self::quantizable_weights(config)
                .into_iter()
                .find(|name| !quantized.contains_key(name))
        {
            candle_core::bail!("{missing} was not quantized to {quantization}");
        }
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let m = vb.pp("model");
        let embedding = weight(hidden, vocab, &m.pp("embed_tokens"), quantized)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            layers.push(DecoderLayer {
                input_layernorm: candle_nn::rms_norm(
                    hidden,
                    config.rms_norm_eps,
                    l.pp("input_layernorm"),
                )?,
                self_attn: Attention::new(config, l.pp("self_attn"), quantized)?,
                post_attention_layernorm: candle_nn::rms_norm(
                    hidden,
                    config.rms_norm_eps,
                    l.pp("post_attention_layernorm"),
                )?,
                mlp: Mlp::new(config, l.pp("mlp"), quantized)?,
            });
        }
        let norm = candle_nn::rms_norm(hidden, config.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if config.tie_word_embeddings {
            Proj {
                weight: embedding.clone(),
                bias: None,
            }
        } else {
            linear(hidden, vocab, false, vb.pp("lm_head"), quantized)?
        };
        let embed_tokens = match embedding {
            Weight::Dense(table) => Embed::Dense(Embedding::new(table, hidden)),
            Weight::Quantized(table) => Embed::Quantized(table),
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
            quantization,
        })
    }

    /// How the linear layers' weights are held.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Bytes held by the token embedding and the linear layers (the norms and biases, a few
    /// thousandths of the model, are left out); a tied LM head counts once.
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let bytes = |w: &Weight| match w {
            Weight::Dense(t) => dense(t),
            Weight::Quantized(q) => q.storage_size_in_bytes(),
        };
        let mut total = match &self.embed_tokens {
            Embed::Dense(e) => dense(e.embeddings()),
            Embed::Quantized(q) => q.storage_size_in_bytes(),
        };
        if !self.config.tie_word_embeddings {
            total += bytes(&self.lm_head.weight);
        }
        for layer in &self.layers {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for p in [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ] {
                total += bytes(&p.weight);
            }
        }
        total
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
    ///
    /// On the CPU every token is computed as it would be alone, to the bit: its projections
    /// take the same path whatever else the step holds (see [`Proj::forward`]), and it attends
    /// to its own positions straight from the pool. So a sequence's logits depend neither on
    /// its batch nor on how its prompt was chunked or whether the prefix cache served it. (A
    /// token generated as a decode step and later recomputed as part of a prompt, after a
    /// preemption, goes through gemm the second time and may differ in the last bits.)
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
        for c in chunks {
            if c.start + c.len > self.config.max_position_embeddings {
                candle_core::bail!(
                    "sequence position {} is past the context window",
                    c.start + c.len
                );
            }
            positions.extend((c.start..c.start + c.len).map(|p| p as u32));
        }
        let lead = chunks.iter().take_while(|c| c.decode).count();
        if chunks[lead..].iter().any(|c| c.decode) || chunks[..lead].iter().any(|c| c.len != 1) {
            candle_core::bail!("decode chunks are single tokens and come first");
        }
        // On the CPU every token attends straight from the pool (see `attention`).
        let reads = if self.device.is_cpu() && self.dtype == DType::F32 {
            KvReads::Rows(
                chunks
                    .iter()
                    .map(|c| cache.rows(c.table, c.start + c.len))
                    .collect::<candle_core::Result<_>>()?,
            )
        } else {
            KvReads::Views(
                chunks
                    .iter()
                    .map(|c| cache.view(c.table, c.start + c.len))
                    .collect::<candle_core::Result<_>>()?,
            )
        };
        let kv = KvBatch {
            chunks,
            reads,
            lead,
            cache,
        };
        let positions = Tensor::new(positions, &self.device)?;
        let cos = self.rotary.cos.index_select(&positions, 0)?;
        let sin = self.rotary.sin.index_select(&positions, 0)?;

        let mut x = self.embed_tokens.forward(tokens, &self.device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer.self_attn.forward(&h, &cos, &sin, i, &kv)?;
            x = (x + h)?;
            let h = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x)?, kv.lead)?;
            x = (x + h)?;
        }
        // The LM head's rows: all the step's (scoring), or one per sampled sequence, each
        // through the kernel where it runs.
        let (x, lead) = match logits {
            Logits::All => (x, kv.lead),
            Logits::Rows([]) => {
                // A step whose sequences are all mid-prompt samples nothing: no LM head.
                return Tensor::zeros((0, self.config.vocab_size), DType::F32, &self.device);
            }
            Logits::Rows(rows) => (
                x.index_select(&Tensor::new(rows, &self.device)?, 0)?,
                rows.len(),
            ),
        };
        let x = self.norm.forward(&x)?;
        self.lm_head.forward(&x, lead)?.to_dtype(DType::F32)
    }
}

/// The logits of row `i` as a host vector.
pub fn logits_row(logits: &Tensor, i: usize) -> candle_core::Result<Vec<f32>> {
    logits.i(i)?.to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What batch invariance of prompt rows rests on (see [`gemm_min_rows`]): through candle's
    /// matmul, a row's products are the same, bit for bit, whatever rows are beside it and
    /// however many, from the padded minimum on; on the Qwen2.5-0.5B projection shapes (and
    /// the LM head's inputs) and on the tiny models' narrow ones.
    #[test]
    fn gemm_rows_do_not_depend_on_their_neighbours() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let shapes = [
            (896, 896),
            (128, 896),
            (4864, 896),
            (896, 4864),
            (160, 64),
            (64, 64),
            (32, 64),
        ];
        for (out, k) in shapes {
            let w = Tensor::randn(0f32, 1.0, (out, k), &device)?;
            let probe = Tensor::randn(0f32, 1.0, (1, k), &device)?;
            let product = |m: usize, at: usize| -> candle_core::Result<Vec<f32>> {
                let others = Tensor::randn(0f32, 1.0, (m, k), &device)?;
                let x = Tensor::cat(
                    &[
                        others.narrow(0, 0, at)?,
                        probe.clone(),
                        others.narrow(0, at + 1, m - at - 1)?,
                    ],
                    0,
                )?;
                x.matmul(&w.t()?)?.i(at)?.to_vec1()
            };
            let min = gemm_min_rows(out);
            let reference = product(min, 0)?;
            for m in [min, min + 1, 17, 40, 64, 65, 130] {
                for at in [0, m / 2, m - 1] {
                    assert!(
                        product(m, at)? == reference,
                        "{out}×{k}: row {at} of {m} differs from row 0 of {min}"
                    );
                }
            }
        }
        Ok(())
    }
}
