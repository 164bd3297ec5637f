//! The CPU f32 projection kernel of decode steps: `x·Wᵀ` for a few rows of `x`.
//!
//! A decode step is bound by reading the weights, so every weight row is read from memory once
//! and multiplied with every row of `x` while it sits in the core's cache. The products are
//! register-blocked: a tile of two weight rows by up to four rows of `x` keeps its accumulators
//! in vector registers, loading six vectors per eight fused multiply-adds, where one dot product
//! at a time would load two per one and wait on a single chain of additions. The vector width
//! is the widest the CPU has ([`pulp`] picks it at run time: AVX2 + FMA on x86-64, NEON on
//! aarch64, scalar elsewhere).
//!
//! Each product is accumulated the same way whatever the tile it falls in (lane `l` sums the
//! `l`-th element of every vector's worth of inputs, in order; then the lanes are reduced and
//! the tail added), so a row's result does not depend on how many rows share the call: a
//! sequence's decode does not depend on its batch.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

/// Weight rows per task of the thread pool (a task reads `BLOCK × in` floats of the weight).
const BLOCK: usize = 64;
/// Weight rows every group of `x` rows meets before the next panel: small enough that a panel
/// of the widest projection (`in` = 4864 for Qwen2.5-0.5B) stays in the core's L2 cache.
const PANEL: usize = 16;
/// Rows of `x` one tile multiplies at once.
const GROUP: usize = 4;

/// `x·Wᵀ` for the rows of `x` (`[n, in]`) and `W` (`[out, in]`), as `[n, out]`. `None` when the
/// tensors are not f32 in CPU memory (the caller falls back to gemm).
pub(super) fn project(weight: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !weight.device().is_cpu() || weight.dtype() != DType::F32 || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (out_dim, k) = weight.dims2()?;
    let n = x.dim(0)?;
    if x.dim(1)? != k {
        candle_core::bail!("projection of {} inputs given rows of {}", k, x.dim(1)?);
    }
    if n == 0 {
        // A step whose sequences are all mid-prompt asks for no logits.
        return Ok(Some(Tensor::zeros(
            (0, out_dim),
            DType::F32,
            weight.device(),
        )?));
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
    // `[out, n]`: output row o holds the n products of weight row o.
    let mut out = vec![0f32; out_dim * n];
    if k > 0 {
        let rows: Vec<&[f32]> = xs.chunks_exact(k).collect();
        let arch = pulp::Arch::new();
        out.par_chunks_mut(n * BLOCK)
            .enumerate()
            .for_each(|(block, dst)| {
                let first = block * BLOCK;
                let count = dst.len() / n;
                arch.dispatch(Products {
                    w: &w[first * k..(first + count) * k],
                    rows: &rows,
                    dst,
                });
            });
    }
    drop((w_storage, x_storage));
    let y = Tensor::from_vec(out, (out_dim, n), weight.device())?;
    Ok(Some(y.t()?.contiguous()?))
}

/// `dst[r * n + j]` = weight row r of `w` · `rows[j]`, for every row of `w`.
struct Products<'a> {
    w: &'a [f32],
    rows: &'a [&'a [f32]],
    dst: &'a mut [f32],
}

impl WithSimd for Products<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { w, rows, dst } = self;
        let (n, k) = (rows.len(), rows[0].len());
        // Each group of rows of `x` packed once, its vectors side by side.
        let groups: Vec<Packed<S>> = rows.chunks(GROUP).map(Packed::new).collect();
        let count = w.len() / k;
        let mut r0 = 0;
        while r0 < count {
            let r1 = (r0 + PANEL).min(count);
            let (w, dst) = (&w[r0 * k..r1 * k], &mut dst[r0 * n..r1 * n]);
            for (g, group) in groups.iter().enumerate() {
                let at = Tile {
                    rows: &rows[g * GROUP..],
                    k,
                    stride: n,
                };
                let dst = &mut dst[g * GROUP..];
                match group {
                    Packed::Four(x) => at.panel(simd, w, x, dst),
                    Packed::Three(x) => at.panel(simd, w, x, dst),
                    Packed::Two(x) => at.panel(simd, w, x, dst),
                    Packed::One(x) => at.panel(simd, w, x, dst),
                }
            }
            r0 = r1;
        }
    }
}

/// A group of up to four rows of `x`: element i holds the i-th vector of each row.
enum Packed<S: Simd> {
    Four(Vec<[S::f32s; 4]>),
    Three(Vec<[S::f32s; 3]>),
    Two(Vec<[S::f32s; 2]>),
    One(Vec<[S::f32s; 1]>),
}

impl<S: Simd> Packed<S> {
    #[inline(always)]
    fn new(rows: &[&[f32]]) -> Self {
        match rows.len() {
            4 => Self::Four(pack::<S, 4>(rows)),
            3 => Self::Three(pack::<S, 3>(rows)),
            2 => Self::Two(pack::<S, 2>(rows)),
            _ => Self::One(pack::<S, 1>(rows)),
        }
    }
}

#[inline(always)]
fn pack<S: Simd, const C: usize>(rows: &[&[f32]]) -> Vec<[S::f32s; C]> {
    let heads: [&[S::f32s]; C] = std::array::from_fn(|c| S::as_simd_f32s(rows[c]).0);
    (0..heads[0].len())
        .map(|i| std::array::from_fn(|c| heads[c][i]))
        .collect()
}

/// Where a tile's rows of `x` come from and its products go.
struct Tile<'a> {
    /// The tile's rows of `x` (the first `C` of them), for their tails.
    rows: &'a [&'a [f32]],
    k: usize,
    /// Products per output row (all rows of `x`).
    stride: usize,
}

impl Tile<'_> {
    /// Every weight row of `w` against the `C` rows packed in `x`, two weight rows at a time.
    #[inline(always)]
    fn panel<S: Simd, const C: usize>(
        &self,
        simd: S,
        w: &[f32],
        x: &[[S::f32s; C]],
        dst: &mut [f32],
    ) {
        let (k, n) = (self.k, self.stride);
        let count = w.len() / k;
        let mut r = 0;
        while r + 2 <= count {
            let (w0, w1) = (&w[r * k..(r + 1) * k], &w[(r + 1) * k..(r + 2) * k]);
            let (h0, h1) = (S::as_simd_f32s(w0).0, S::as_simd_f32s(w1).0);
            let zero = simd.splat_f32s(0.0);
            let (mut a0, mut a1) = ([zero; C], [zero; C]);
            for ((w0, w1), x) in h0.iter().zip(h1).zip(x) {
                for c in 0..C {
                    a0[c] = simd.mul_add_f32s(*w0, x[c], a0[c]);
                    a1[c] = simd.mul_add_f32s(*w1, x[c], a1[c]);
                }
            }
            self.finish(simd, w0, &a0, &mut dst[r * n..]);
            self.finish(simd, w1, &a1, &mut dst[(r + 1) * n..]);
            r += 2;
        }
        if r < count {
            let w0 = &w[r * k..(r + 1) * k];
            let zero = simd.splat_f32s(0.0);
            let mut a0 = [zero; C];
            for (w0, x) in S::as_simd_f32s(w0).0.iter().zip(x) {
                for c in 0..C {
                    a0[c] = simd.mul_add_f32s(*w0, x[c], a0[c]);
                }
            }
            self.finish(simd, w0, &a0, &mut dst[r * n..]);
        }
    }

    /// Reduces the accumulators of one weight row and adds the products of the tails.
    #[inline(always)]
    fn finish<S: Simd, const C: usize>(
        &self,
        simd: S,
        w_row: &[f32],
        acc: &[S::f32s; C],
        dst: &mut [f32],
    ) {
        let w_tail = S::as_simd_f32s(w_row).1;
        for (c, acc) in acc.iter().enumerate() {
            let x_tail = S::as_simd_f32s(self.rows[c]).1;
            let tail: f32 = w_tail.iter().zip(x_tail).map(|(a, b)| a * b).sum();
            dst[c] = simd.reduce_sum_f32s(*acc) + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    }

    #[test]
    fn kernel_matches_gemm_and_does_not_depend_on_the_batch() -> candle_core::Result<()> {
        let device = Device::Cpu;
        // 37 inputs: four whole chunks of eight and a tail of five; 150 outputs: panels of
        // four and a remainder of two, blocks of 64 and a remainder of 22.
        let (out_dim, k) = (150, 37);
        let weight = Tensor::randn(0f32, 1.0, (out_dim, k), &device)?;
        // Eleven rows: two groups of four and one of three.
        let x = Tensor::randn(0f32, 1.0, (11, k), &device)?;
        let all = project(&weight, &x)?.expect("contiguous f32 on the CPU");
        let gemm = x.matmul(&weight.t()?)?;
        assert_eq!(all.dims(), gemm.dims());
        for (a, b) in values(&all).iter().zip(values(&gemm)) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        // Each row gives bit for bit the same products alone, in a group of two, or wherever
        // it falls in a larger batch.
        for j in 0..11 {
            let alone = project(&weight, &x.narrow(0, j, 1)?)?.expect("kernel");
            assert_eq!(values(&alone), values(&all.narrow(0, j, 1)?), "row {j}");
        }
        for n in [2, 3, 5, 6, 9] {
            let some = project(&weight, &x.narrow(0, 0, n)?)?.expect("kernel");
            assert_eq!(values(&some), values(&all.narrow(0, 0, n)?), "{n} rows");
        }
        // No rows (a step that samples nothing): no products.
        let none = project(&weight, &x.narrow(0, 0, 0)?)?.expect("kernel");
        assert_eq!(none.dims(), &[0, out_dim]);
        // Rows that do not match the weight: an error, not a panic.
        assert!(project(&weight, &x.narrow(1, 0, 36)?).is_err());
        // Not f32: the caller falls back to gemm.
        assert!(project(&weight.to_dtype(DType::BF16)?, &x)?.is_none());
        Ok(())
    }

    #[test]
    fn inputs_shorter_than_a_lane_chunk_are_all_tail() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (9, 5), &device)?;
        let x = Tensor::randn(0f32, 1.0, (4, 5), &device)?;
        let kernel = project(&weight, &x)?.expect("kernel");
        let gemm = x.matmul(&weight.t()?)?;
        for (a, b) in values(&kernel).iter().zip(values(&gemm)) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        Ok(())
    }
}
