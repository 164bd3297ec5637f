//! Attention on the CPU, straight from the KV pool's storage, one token at a time.
//!
//! A token is one query row per head against its sequence's keys and values at positions up
//! to its own. Run through gemm, each sequence pays for gathering its KV out of the pool's
//! blocks and for two small matrix products whose setup costs more than their arithmetic (per
//! decode token and layer most of a millisecond, a third of a Qwen2.5-0.5B step at batch 8 on
//! two cores), and a prompt token's result would depend on the chunk it was computed in. Here
//! each (token, KV head) is one task: the key rows are read where they lie, every query head of
//! the group is scored against each key as it passes (up to four products at once, sharing the
//! key's loads), the scores go through a softmax with a vectorized `exp` (within 2 ulp), and
//! the value rows are summed with those weights into accumulators held in vector registers.
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
        // scores[h * len + p]: query head h against position p. Each key is read once for all
        // the group's query heads, up to four products at a time.
        let mut scores = vec![0f32; groups * len];
        for (p, &row) in rows.iter().enumerate() {
            let key = &k[row as usize * head_dim..(row as usize + 1) * head_dim];
            let mut h = 0;
            while h < groups {
                let qs = &q[h * head_dim..];
                let n = match groups - h {
                    1 => score::<S, 1>(simd, qs, key, &mut scores[h * len + p..], len),
                    2 | 3 => score::<S, 2>(simd, qs, key, &mut scores[h * len + p..], len),
                    _ => score::<S, 4>(simd, qs, key, &mut scores[h * len + p..], len),
                };
                h += n;
            }
        }
        for weights in scores.chunks_exact_mut(len) {
            for w in weights.iter_mut() {
                *w *= scale;
            }
            softmax(simd, weights);
        }
        for (weights, out) in scores.chunks_exact(len).zip(out.chunks_exact_mut(head_dim)) {
            weighted_sum(simd, weights, rows, v, out);
        }
    }
}

/// The first `N` query heads of `qs` (`[heads, head_dim]`) against one key, into
/// `scores[h * stride]` for head `h`; returns `N`. Each product is summed as it would be alone,
/// bit for bit (see [`dots`]): the `N` products share each load of the key and hide each other's latency.
#[inline(always)]
fn score<S: Simd, const N: usize>(
    simd: S,
    qs: &[f32],
    key: &[f32],
    scores: &mut [f32],
    stride: usize,
) -> usize {
    let head_dim = key.len();
    let q: [&[f32]; N] = std::array::from_fn(|h| &qs[h * head_dim..(h + 1) * head_dim]);
    for (h, product) in dots::<S, N>(simd, q, key).into_iter().enumerate() {
        scores[h * stride] = product;
    }
    N
}

/// `N` dot products against one vector `b`. Each is accumulated the same way whatever `N`
/// (lane `l` sums the `l`-th element of every vector's worth, in order; then the lanes are
/// reduced and the tail added), so a product does not depend on the products beside it.
#[inline(always)]
fn dots<S: Simd, const N: usize>(simd: S, a: [&[f32]; N], b: &[f32]) -> [f32; N] {
    let (b_head, b_tail) = S::as_simd_f32s(b);
    let heads: [(&[S::f32s], &[f32]); N] = std::array::from_fn(|i| S::as_simd_f32s(a[i]));
    let mut acc = [simd.splat_f32s(0.0); N];
    for (c, b) in b_head.iter().enumerate() {
        for i in 0..N {
            acc[i] = simd.mul_add_f32s(heads[i].0[c], *b, acc[i]);
        }
    }
    std::array::from_fn(|i| {
        let tail: f32 = heads[i].1.iter().zip(b_tail).map(|(a, b)| a * b).sum();
        simd.reduce_sum_f32s(acc[i]) + tail
    })
}

/// `weights ← softmax(weights)`, exactly normalized: the largest score is subtracted before
/// exponentiating ([`exp`]), and every weight divided by their sum.
#[inline(always)]
fn softmax<S: Simd>(simd: S, weights: &mut [f32]) {
    let (head, tail) = S::as_mut_simd_f32s(weights);
    let mut max = simd.splat_f32s(f32::NEG_INFINITY);
    for w in head.iter() {
        max = simd.max_f32s(max, *w);
    }
    let max = tail
        .iter()
        .fold(simd.reduce_max_f32s(max), |m, &w| m.max(w));
    let max_v = simd.splat_f32s(max);
    let mut sum = simd.splat_f32s(0.0);
    for w in head.iter_mut() {
        *w = exp(simd, simd.sub_f32s(*w, max_v));
        sum = simd.add_f32s(sum, *w);
    }
    let mut tail_sum = 0f32;
    if !tail.is_empty() {
        let e = exp(simd, simd.sub_f32s(simd.partial_load_f32s(tail), max_v));
        simd.partial_store_f32s(tail, e);
        tail_sum = tail.iter().sum();
    }
    let inv = simd.splat_f32s(1.0 / (simd.reduce_sum_f32s(sum) + tail_sum));
    for w in head.iter_mut() {
        *w = simd.mul_f32s(*w, inv);
    }
    if !tail.is_empty() {
        let scaled = simd.mul_f32s(simd.partial_load_f32s(tail), inv);
        simd.partial_store_f32s(tail, scaled);
    }
}

/// `eˣ` per lane, within 2 ulp of the exact value for `x` in `[-87, 88]`; clamped to that
/// range (below it `eˣ` leaves f32's normal range: a softmax weight of `e⁻⁸⁷` relative to the
/// largest is as good as 0). Cody–Waite reduction `x = n·ln2 + r`, `|r| ≤ ln2/2`, then a
/// degree-7 Taylor polynomial of `eʳ` (truncation below 1e-8 relative) times `2ⁿ` built in the
/// exponent bits.
#[inline(always)]
fn exp<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = simd.min_f32s(
        simd.max_f32s(x, simd.splat_f32s(-87.0)),
        simd.splat_f32s(88.0),
    );
    let shifted = simd.mul_add_f32s(
        x,
        simd.splat_f32s(std::f32::consts::LOG2_E),
        simd.splat_f32s(ROUND),
    );
    let n = simd.sub_f32s(shifted, simd.splat_f32s(ROUND));
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-LN2_HI), x);
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-LN2_LO), r);
    let mut p = simd.splat_f32s(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = simd.mul_add_f32s(p, r, simd.splat_f32s(c));
    }
    // 2ⁿ: n + 127 in the exponent field (the low bits of `shifted` are n, modulo 2²³).
    let biased = simd.add_u32s(simd.transmute_u32s_f32s(shifted), simd.splat_u32s(127));
    let two_n = simd.wrapping_dyn_shl_u32s(biased, simd.splat_u32s(23));
    simd.mul_f32s(p, simd.transmute_f32s_u32s(two_n))
}

/// `out = Σₚ weights[p] · v[rows[p]]`, summed in order of position per element (a block of
/// vectors at a time in registers).
#[inline(always)]
fn weighted_sum<S: Simd>(simd: S, weights: &[f32], rows: &[u32], v: &[f32], out: &mut [f32]) {
    let head_dim = out.len();
    let (out_head, out_tail) = S::as_mut_simd_f32s(out);
    let vectors = out_head.len();
    let mut c = 0;
    while c < vectors {
        let block = &mut out_head[c..];
        c += match vectors - c {
            1 => accumulate::<S, 1>(simd, weights, rows, v, head_dim, c, block),
            2 | 3 => accumulate::<S, 2>(simd, weights, rows, v, head_dim, c, block),
            4..=7 => accumulate::<S, 4>(simd, weights, rows, v, head_dim, c, block),
            _ => accumulate::<S, 8>(simd, weights, rows, v, head_dim, c, block),
        };
    }
    let done = head_dim - out_tail.len();
    for (i, o) in out_tail.iter_mut().enumerate() {
        *o = 0.0;
        for (w, &row) in weights.iter().zip(rows) {
            *o += w * v[row as usize * head_dim + done + i];
        }
    }
}

/// Vectors `first..first + B` of the weighted sum into `out[..B]`; returns `B`.
#[inline(always)]
fn accumulate<S: Simd, const B: usize>(
    simd: S,
    weights: &[f32],
    rows: &[u32],
    v: &[f32],
    head_dim: usize,
    first: usize,
    out: &mut [S::f32s],
) -> usize {
    let mut acc = [simd.splat_f32s(0.0); B];
    for (&w, &row) in weights.iter().zip(rows) {
        let value = &v[row as usize * head_dim..(row as usize + 1) * head_dim];
        let (value, _) = S::as_simd_f32s(value);
        let w = simd.splat_f32s(w);
        for i in 0..B {
            acc[i] = simd.mul_add_f32s(w, value[first + i], acc[i]);
        }
    }
    out[..B].copy_from_slice(&acc);
    B
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

    /// The building blocks at one vector width against f64 references.
    fn check_kernels<S: Simd>(simd: S, name: &str) {
        // e^x within 2 ulp over the whole range, clamped outside it.
        let lanes = std::mem::size_of::<S::f32s>() / 4;
        let xs: Vec<f32> = (0..=20_000)
            .map(|i| -87.0 + 175.0 * i as f32 / 20_000.0)
            .chain([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, -0.346_573_6, 0.346_573_6])
            .collect();
        for x in &xs {
            let got = simd.reduce_max_f32s(exp(simd, simd.splat_f32s(*x)));
            let want = f64::from(*x).exp();
            let ulp = f64::from(want as f32) * f64::from(f32::EPSILON);
            assert!(
                (f64::from(got) - want).abs() <= 2.0 * ulp,
                "{name}: e^{x} = {got}, want {want}"
            );
        }
        let at = |x: f32| simd.reduce_max_f32s(exp(simd, simd.splat_f32s(x)));
        assert_eq!(at(-1000.0), at(-87.0), "{name}: clamped below");
        assert_eq!(at(f32::NEG_INFINITY), at(-87.0), "{name}: clamped below");
        assert_eq!(at(1000.0), at(88.0), "{name}: clamped above");

        // Products by blocks of 4, 2 and 1 query heads are bitwise the products alone.
        let value = |i: usize| ((i * 7919) % 211) as f32 / 211.0 - 0.5;
        for dim in [(lanes - 1).max(1), 2 * lanes, 2 * lanes + 3, 64] {
            let qs: Vec<f32> = (0..4 * dim).map(value).collect();
            let key: Vec<f32> = (0..dim).map(|i| value(i + 5_000)).collect();
            let q: [&[f32]; 4] = std::array::from_fn(|h| &qs[h * dim..(h + 1) * dim]);
            let four = dots::<S, 4>(simd, q, &key);
            let two = dots::<S, 2>(simd, [q[2], q[3]], &key);
            for h in 0..4 {
                let [alone] = dots::<S, 1>(simd, [q[h]], &key);
                assert_eq!(
                    four[h].to_bits(),
                    alone.to_bits(),
                    "{name}: head {h} of {dim}"
                );
                let exact: f64 = q[h]
                    .iter()
                    .zip(&key)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                assert!(
                    (f64::from(alone) - exact).abs() < 1e-5,
                    "{name}: {alone} vs {exact}"
                );
            }
            assert_eq!(two[1].to_bits(), four[3].to_bits(), "{name}");
        }

        // Softmax over lengths with and without a tail.
        for len in [1, (lanes - 1).max(1), lanes, 3 * lanes + 2, 1000] {
            let scores: Vec<f32> = (0..len).map(|i| 30.0 * value(i * 3)).collect();
            let mut weights = scores.clone();
            softmax(simd, &mut weights);
            let max = scores
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |m, s| m.max(f64::from(s)));
            let total: f64 = scores.iter().map(|s| (f64::from(*s) - max).exp()).sum();
            for (w, s) in weights.iter().zip(&scores) {
                let want = (f64::from(*s) - max).exp() / total;
                // The f32 sum of `len` terms: at most about `len` roundings of the total.
                let bound = (4 + len) as f64 * f64::from(f32::EPSILON) * want;
                assert!(
                    (f64::from(*w) - want).abs() <= bound + 1e-30,
                    "{name}: len {len}: {w} vs {want}"
                );
            }
        }
    }

    #[test]
    fn exp_products_and_softmax_at_every_vector_width_the_cpu_has() {
        check_kernels(pulp::Scalar::new(), "scalar");
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(simd) = pulp::x86::V3::try_new() {
                check_kernels(simd, "AVX2");
            }
            if let Some(simd) = pulp::x86::V4::try_new() {
                check_kernels(simd, "AVX-512");
            }
        }
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
