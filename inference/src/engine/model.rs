//! The Qwen2 / Qwen2.5 / Qwen3 decoder, written so that one forward runs a ragged batch: many
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
    /// Per chunk, the storage rows of a decode token's sequence when its attention runs
    /// straight from the pool ([`super::attention::decode`]).
    rows: Vec<Option<Vec<u32>>>,
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

/// Rows up to which a CPU f32 projection runs [`super::kernel::project`] instead of gemm:
/// measured on the Qwen2.5-0.5B shape (docs/PERFORMANCE.md), the kernel is ahead up to 16 rows
/// (decode at batch 16: 31.3 against 29.7 tok/s) and behind at 32.
const KERNEL_ROWS: usize = 16;

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
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let few = x.dim(0)? <= KERNEL_ROWS;
        let y = match &self.weight {
            Weight::Quantized(w) => super::quant::project(w, x, few)?,
            Weight::Dense(w) => {
                if few && let Some(y) = super::kernel::project(w, x)? {
                    y
                } else {
                    x.matmul(&w.t()?)?
                }
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
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
            Arch::Qwen2 => (None, None),
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

    /// Attention outputs `[heads * head_dim]` of the chunks whose KV rows `kv` holds (decode
    /// tokens on the CPU), computed straight from the pool; `None` where none is, or when the
    /// pool is not f32 in CPU memory.
    fn decode_direct(
        &self,
        q: &Tensor,
        layer: usize,
        kv: &KvBatch,
    ) -> candle_core::Result<Option<Vec<Option<Vec<f32>>>>> {
        if kv.rows.iter().all(Option::is_none) {
            return Ok(None);
        }
        // `[tokens, heads * head_dim]`: each token's query heads side by side.
        let q = q.transpose(0, 1)?.flatten_from(1)?.to_vec2::<f32>()?;
        let mut offset = 0;
        let mut queries = Vec::new();
        let mut which = Vec::new();
        for (i, (chunk, rows)) in kv.chunks.iter().zip(&kv.rows).enumerate() {
            if let Some(rows) = rows {
                queries.push(super::attention::Query {
                    q: &q[offset],
                    rows,
                });
                which.push(i);
            }
            offset += chunk.len;
        }
        let (k, v) = kv.cache.layer(layer);
        let heads = super::attention::Heads {
            kv_heads: self.kv_heads,
            groups: self.heads / self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
        };
        let Some(outs) = super::attention::decode(k, v, heads, &queries)? else {
            return Ok(None);
        };
        let mut direct = vec![None; kv.chunks.len()];
        for (i, out) in which.into_iter().zip(outs) {
            direct[i] = Some(out);
        }
        Ok(Some(direct))
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
        for chunk in kv.chunks {
            let (k_new, v_new) = (
                k.narrow(1, offset, chunk.len)?.contiguous()?,
                v.narrow(1, offset, chunk.len)?.contiguous()?,
            );
            kv.cache
                .write(layer, chunk.table, chunk.start, &k_new, &v_new)?;
            offset += chunk.len;
        }
        let mut direct = self.decode_direct(&q, layer, kv)?;
        let mut offset = 0;
        let mut outputs = Vec::with_capacity(kv.chunks.len());
        for (i, (chunk, view)) in kv.chunks.iter().zip(&kv.views).enumerate() {
            let n = chunk.len;
            if let Some(out) = direct.as_mut().and_then(|d| d[i].take()) {
                outputs.push(Tensor::from_vec(
                    out,
                    (1, self.heads * self.head_dim),
                    x.device(),
                )?);
                offset += n;
                continue;
            }
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
    fn new(cfg: &Config, vb: VarBuilder, q: &QuantizedWeights) -> candle_core::Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(hidden, inter, false, vb.pp("gate_proj"), q)?,
            up_proj: linear(hidden, inter, false, vb.pp("up_proj"), q)?,
            down_proj: linear(inter, hidden, false, vb.pp("down_proj"), q)?,
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
        // Decode tokens attend on the CPU straight from the pool (see `attention`).
        let direct = self.device.is_cpu() && self.dtype == DType::F32;
        let rows = chunks
            .iter()
            .map(|c| match direct && c.len == 1 {
                true => cache.rows(c.table, c.start + 1).map(Some),
                false => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let kv = KvBatch {
            chunks,
            views,
            rows,
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
