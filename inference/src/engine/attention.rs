//! Attention on the CPU, straight from the KV pool's storage, one token at a time.
//!
//! A token is one query row per head against its sequence's keys and values at positions up
//! to its own. Run through gemm, each sequence pays for gathering its KV out of the pool's
//! blocks and for two small matrix products whose setup costs more than their arithmetic (per
//! decode token and layer most of a millisecond, a third of a Qwen2.5-0.5B step at batch 8 on
//! two cores), and a prompt token's result would depend on the chunk it was computed in. Here
//! each (token, KV head) is one task: the key rows are read where they lie, every query head of
//! the group is scored against each key as it passes, the scores go through an exact softmax,
//! and the value rows are summed with those weights.
//!
//! A token's result depends on its own query and its sequence's KV only: not on what else is
//! in the step, nor on which chunk of its prompt it came in.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

/// The geometry of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heads {
    pub kv_heads: usize,
    /// Query heads per KV head.
    pub groups: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One token's attention: its queries and where its sequence's KV lies.
pub(super) struct Query<'a> {
    /// `[kv_heads * groups, head_dim]`: the token's query heads, after rotary embedding.
    pub q: &'a [f32],
    /// Storage rows of the sequence's positions up to the token's own, the token's last.
    pub rows: &'a [u32],
}

/// Attention output `[kv_heads * groups * head_dim]` of each query, in order. `k` and `v` are
/// one layer of the pool, `[kv_heads, capacity, head_dim]`. `None` when they are not f32 in
/// CPU memory (the caller takes the general path).
pub(super) fn attend(
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
    queries: &[Query],
) -> candle_core::Result<Option<Vec<Vec<f32>>>> {
    if !k.device().is_cpu() || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
        return Ok(None);
    }
    let (kv_heads, capacity, head_dim) = k.dims3()?;
    if kv_heads != heads.kv_heads || head_dim != heads.head_dim || v.dims() != k.dims() {
        candle_core::bail!(
            "KV storage {:?} / {:?} does not match {} KV heads of {}",
            k.dims(),
            v.dims(),
            heads.kv_heads,
            heads.head_dim
        );
    }
    let q_len = kv_heads * heads.groups * head_dim;
    for query in queries {
        if query.q.len() != q_len {
            candle_core::bail!("query of {} values, {q_len} expected", query.q.len());
        }
        if query.rows.is_empty() || query.rows.iter().any(|&r| r as usize >= capacity) {
            candle_core::bail!("KV rows outside the {capacity} of the pool");
        }
    }
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(ks)), Storage::Cpu(CpuStorage::F32(vs))) =
        (&*k_storage, &*v_storage)
    else {
        return Ok(None);
    };
    let (Some((k0, k1)), Some((v0, v1))) =
        (k_layout.contiguous_offsets(), v_layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (ks, vs) = (&ks[k0..k1], &vs[v0..v1]);
    let head_block = heads.groups * head_dim;
    let mut outputs: Vec<Vec<f32>> = queries.iter().map(|_| vec![0f32; q_len]).collect();
    let arch = pulp::Arch::new();
    outputs
        .par_iter_mut()
        .zip(queries)
        .flat_map(|(out, query)| {
            out.par_chunks_mut(head_block)
                .enumerate()
                .map(move |(g, out)| (g, out, query))
        })
        .for_each(|(g, out, query)| {
            let plane = g * capacity * head_dim;
            arch.dispatch(Group {
                q: &query.q[g * head_block..(g + 1) * head_block],
                k: &ks[plane..plane + capacity * head_dim],
                v: &vs[plane..plane + capacity * head_dim],
                rows: query.rows,
                head_dim,
                scale: heads.scale,
                out,
            });
        });
    drop((k_storage, v_storage));
    Ok(Some(outputs))
}

/// The query heads of one KV head against that head's keys and values.
struct Group<'a> {
    /// `[groups, head_dim]`.
    q: &'a [f32],
    /// `[capacity, head_dim]` of this KV head.
    k: &'a [f32],
    v: &'a [f32],
    rows: &'a [u32],
    head_dim: usize,
    scale: f32,
    /// `[groups, head_dim]`.
    out: &'a mut [f32],
}

impl WithSimd for Group<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            q,
            k,
            v,
            rows,
            head_dim,
            scale,
            out,
        } = self;
        let groups = q.len() / head_dim;
        let len = rows.len();
        // scores[h * len + p]: query head h against position p.
        let mut scores = vec![0f32; groups * len];
        for (p, &row) in rows.iter().enumerate() {
            let key = &k[row as usize * head_dim..(row as usize + 1) * head_dim];
            for (h, q) in q.chunks_exact(head_dim).enumerate() {
                scores[h * len + p] = dot(simd, q, key) * scale;
            }
        }
        for weights in scores.chunks_exact_mut(len) {
            let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for w in weights.iter_mut() {
                *w = (*w - max).exp();
                sum += *w;
            }
            for w in weights.iter_mut() {
                *w /= sum;
            }
        }
        out.fill(0.0);
        for (p, &row) in rows.iter().enumerate() {
            let value = &v[row as usize * head_dim..(row as usize + 1) * head_dim];
            for (h, out) in out.chunks_exact_mut(head_dim).enumerate() {
                axpy(simd, scores[h * len + p], value, out);
            }
        }
    }
}

#[inline(always)]
fn dot<S: Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let (a_head, a_tail) = S::as_simd_f32s(a);
    let (b_head, b_tail) = S::as_simd_f32s(b);
    let mut acc = simd.splat_f32s(0.0);
    for (a, b) in a_head.iter().zip(b_head) {
        acc = simd.mul_add_f32s(*a, *b, acc);
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    simd.reduce_sum_f32s(acc) + tail
}

/// `out += w · x`.
#[inline(always)]
fn axpy<S: Simd>(simd: S, w: f32, x: &[f32], out: &mut [f32]) {
    let (x_head, x_tail) = S::as_simd_f32s(x);
    let (out_head, out_tail) = S::as_mut_simd_f32s(out);
    let w_v = simd.splat_f32s(w);
    for (o, x) in out_head.iter_mut().zip(x_head) {
        *o = simd.mul_add_f32s(w_v, *x, *o);
    }
    for (o, x) in out_tail.iter_mut().zip(x_tail) {
        *o += w * x;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// The same attention through candle's ops: gather, matmul, softmax, matmul.
    fn reference(
        k: &Tensor,
        v: &Tensor,
        heads: Heads,
        q: &Tensor,
        rows: &[u32],
    ) -> candle_core::Result<Vec<f32>> {
        let index = Tensor::new(rows, &Device::Cpu)?;
        let (k, v) = (k.index_select(&index, 1)?, v.index_select(&index, 1)?);
        let q = q.reshape((heads.kv_heads, heads.groups, heads.head_dim))?;
        let scores = (q.matmul(&k.t()?)? * f64::from(heads.scale))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v)?.flatten_all()?.to_vec1()
    }

    #[test]
    fn direct_attention_matches_the_general_path() -> candle_core::Result<()> {
        let device = Device::Cpu;
        // Two KV heads of three query heads each; head_dim 20 = two vectors of eight and a
        // tail of four.
        let heads = Heads {
            kv_heads: 2,
            groups: 3,
            head_dim: 20,
            scale: 1.0 / 20f32.sqrt(),
        };
        let capacity = 64;
        let k = Tensor::randn(0f32, 1.0, (2, capacity, 20), &device)?;
        let v = Tensor::randn(0f32, 1.0, (2, capacity, 20), &device)?;
        let q = Tensor::randn(0f32, 1.0, (3, 120), &device)?;
        let q_rows: Vec<Vec<f32>> = (0..3)
            .map(|i| q.i(i).and_then(|r| r.to_vec1()))
            .collect::<candle_core::Result<_>>()?;
        // Scattered blocks, one position only, and consecutive rows.
        let rows: [Vec<u32>; 3] = [
            (48..56).chain(0..8).chain(20..23).collect(),
            vec![5],
            (0..40).collect(),
        ];
        let queries: Vec<Query> = q_rows
            .iter()
            .zip(&rows)
            .map(|(q, rows)| Query { q, rows })
            .collect();
        let all = attend(&k, &v, heads, &queries)?.expect("f32 on the CPU");
        for (i, out) in all.iter().enumerate() {
            let want = reference(&k, &v, heads, &q.i(i)?, &rows[i])?;
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{i}: {a} vs {b}");
            }
            // The same alone as in the batch.
            let alone = attend(&k, &v, heads, &queries[i..=i])?.expect("kernel");
            assert_eq!(&alone[0], out, "query {i}");
        }
        // Bad input: an error, not a panic.
        let outside = [Query {
            q: &q_rows[0],
            rows: &[capacity as u32],
        }];
        assert!(attend(&k, &v, heads, &outside).is_err());
        let short = [Query {
            q: &q_rows[0][..100],
            rows: &rows[1],
        }];
        assert!(attend(&k, &v, heads, &short).is_err());
        let none = [Query {
            q: &q_rows[0],
            rows: &[],
        }];
        assert!(attend(&k, &v, heads, &none).is_err());
        // Not f32: the general path.
        let (k16, v16) = (k.to_dtype(DType::BF16)?, v.to_dtype(DType::BF16)?);
        assert!(attend(&k16, &v16, heads, &queries)?.is_none());
        Ok(())
    }
}
