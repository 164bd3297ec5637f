//! The CPU f32 projection kernel of decode steps: `x·Wᵀ` for a few rows of `x`.
//!
//! A decode step is bound by reading the weights, so every weight row is read from memory once
//! and multiplied with every row of `x` while it sits in the core's cache. The products are
//! register-blocked: a tile of two weight rows by up to four rows of `x` keeps its accumulators
//! in vector registers, loading six vectors per eight fused multiply-adds, where one dot product
//! at a time would load two per one and wait on a single chain of additions. The vector width
//! is the widest the CPU has ([`pulp`] picks it at run time: AVX-512 or AVX2 + FMA on x86-64,
//! NEON on aarch64, scalar elsewhere).
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
/// Weight rows of Q8_0 dequantized at once: few, so that they are still in the core's first-
/// level cache when the products read them.
const Q8_0_PANEL: usize = 2;
/// Rows of `x` one tile multiplies at once.
const GROUP: usize = 4;

/// `x·Wᵀ` for the rows of `x` (`[n, in]`) and `W` (`[out, in]`), as `[n, out]`. `None` when the
/// tensors are not f32 in CPU memory (the caller falls back to gemm).
pub(super) fn project(weight: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !weight.device().is_cpu() || weight.dtype() != DType::F32 || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (out_dim, k) = weight.dims2()?;
    let (w_storage, w_layout) = weight.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(w)) = &*w_storage else {
        return Ok(None);
    };
    let Some((w0, w1)) = w_layout.contiguous_offsets() else {
        return Ok(None);
    };
    project_rows(WeightRows::F32(&w[w0..w1]), out_dim, k, x).map(Some)
}

/// Bytes of one Q8_0 block: an f16 scale (little-endian), then 32 signed bytes.
pub(super) const Q8_0_BLOCK_BYTES: usize = 34;
/// Weights of one Q8_0 block.
pub(super) const Q8_0_BLOCK: usize = 32;

/// `x·Wᵀ` for the rows of `x` (`[n, in]`, f32 on the CPU) and `W` (`[out, in]`) held as Q8_0
/// blocks in `data`. Each panel of weight rows is dequantized (exactly: an f16 scale times a
/// small integer is an f32) into a cache-resident buffer and multiplied as f32, so the
/// products are those of the f32 kernel on the dequantized weights, and the activations keep
/// their precision.
pub(super) fn project_q8_0(
    data: &[u8],
    out_dim: usize,
    k: usize,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    if !k.is_multiple_of(Q8_0_BLOCK) || data.len() != out_dim * k / Q8_0_BLOCK * Q8_0_BLOCK_BYTES {
        candle_core::bail!(
            "{} bytes do not hold {out_dim} rows of {k} Q8_0 weights",
            data.len()
        );
    }
    project_rows(WeightRows::Q8_0(data), out_dim, k, x)
}

/// Where the weight rows come from.
#[derive(Debug, Clone, Copy)]
enum WeightRows<'a> {
    F32(&'a [f32]),
    Q8_0(&'a [u8]),
}

impl<'a> WeightRows<'a> {
    /// Rows `first..first + count`.
    fn rows(self, first: usize, count: usize, k: usize) -> Self {
        match self {
            Self::F32(w) => Self::F32(&w[first * k..(first + count) * k]),
            Self::Q8_0(b) => {
                let row = k / Q8_0_BLOCK * Q8_0_BLOCK_BYTES;
                Self::Q8_0(&b[first * row..(first + count) * row])
            }
        }
    }
}

fn project_rows(
    weight: WeightRows,
    out_dim: usize,
    k: usize,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let device = x.device().clone();
    if !device.is_cpu() || x.dtype() != DType::F32 {
        candle_core::bail!("the projection kernel takes f32 rows in CPU memory");
    }
    let x = x.contiguous()?;
    let n = x.dim(0)?;
    if x.dim(1)? != k {
        candle_core::bail!("projection of {} inputs given rows of {}", k, x.dim(1)?);
    }
    if n == 0 {
        // A step whose sequences are all mid-prompt asks for no logits.
        return Tensor::zeros((0, out_dim), DType::F32, &device);
    }
    let (x_storage, x_layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(xs)) = &*x_storage else {
        candle_core::bail!("the projection kernel takes f32 rows in CPU memory");
    };
    let Some((x0, x1)) = x_layout.contiguous_offsets() else {
        candle_core::bail!("the projection kernel takes contiguous rows");
    };
    let xs = &xs[x0..x1];
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
                    w: weight.rows(first, count, k),
                    count,
                    rows: &rows,
                    dst,
                });
            });
    }
    drop(x_storage);
    let y = Tensor::from_vec(out, (out_dim, n), &device)?;
    y.t()?.contiguous()
}

/// `dst[r * n + j]` = weight row r of `w` · `rows[j]`, for the `count` rows of `w`.
struct Products<'a> {
    w: WeightRows<'a>,
    count: usize,
    rows: &'a [&'a [f32]],
    dst: &'a mut [f32],
}

impl WithSimd for Products<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            w,
            count,
            rows,
            dst,
        } = self;
        let (n, k) = (rows.len(), rows[0].len());
        // Each group of rows of `x` packed once, its vectors side by side.
        let groups: Vec<Packed<S>> = rows.chunks(GROUP).map(Packed::new).collect();
        // Dequantized weight rows of one panel.
        let (mut scratch, panel_rows) = match w {
            WeightRows::F32(_) => (Vec::new(), PANEL),
            WeightRows::Q8_0(_) => (vec![0f32; Q8_0_PANEL * k], Q8_0_PANEL),
        };
        let mut r0 = 0;
        while r0 < count {
            let r1 = (r0 + panel_rows).min(count);
            let panel = match w.rows(r0, r1 - r0, k) {
                WeightRows::F32(w) => w,
                WeightRows::Q8_0(bytes) => {
                    let out = &mut scratch[..(r1 - r0) * k];
                    dequantize_q8_0(bytes, out);
                    out
                }
            };
            let dst = &mut dst[r0 * n..r1 * n];
            for (g, group) in groups.iter().enumerate() {
                let at = Tile {
                    rows: &rows[g * GROUP..],
                    k,
                    stride: n,
                };
                let dst = &mut dst[g * GROUP..];
                match group {
                    Packed::Four(x) => at.panel(simd, panel, x, dst),
                    Packed::Three(x) => at.panel(simd, panel, x, dst),
                    Packed::Two(x) => at.panel(simd, panel, x, dst),
                    Packed::One(x) => at.panel(simd, panel, x, dst),
                }
            }
            r0 = r1;
        }
    }
}

/// Q8_0 blocks to f32: each weight is its block's f16 scale times its signed byte. With
/// AVX-512 sixteen weights at a time, with AVX2 eight (sign-extended, converted, scaled in
/// vector registers).
pub(super) fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V4::try_new() {
        simd.vectorize(|| dequantize_q8_0_v4(simd, bytes, out));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        simd.vectorize(|| dequantize_q8_0_v3(simd, bytes, out));
        return;
    }
    dequantize_q8_0_scalar(bytes, out);
}

fn dequantize_q8_0_scalar(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q8_0_BLOCK_BYTES>();
    let (outs, _) = out.as_chunks_mut::<Q8_0_BLOCK>();
    for (block, out) in blocks.iter().zip(outs) {
        let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (o, &q) in out.iter_mut().zip(&block[2..]) {
            *o = f32::from(q as i8) * scale;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dequantize_q8_0_v3(simd: pulp::x86::V3, bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q8_0_BLOCK_BYTES>();
    let (outs, _) = out.as_chunks_mut::<Q8_0_BLOCK>();
    for (block, out) in blocks.iter().zip(outs) {
        let scale = simd.splat_f32x8(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
        let (quants, _) = block[2..].as_chunks::<8>();
        let (eights, _) = out.as_chunks_mut::<8>();
        for (q, o) in quants.iter().zip(eights) {
            let mut wide = [0u8; 16];
            wide[..8].copy_from_slice(q);
            let q: pulp::i8x16 = pulp::bytemuck::cast(wide);
            let f = simd.convert_i32x8_to_f32x8(simd.convert_i8x16_to_i32x8(q));
            *o = pulp::bytemuck::cast(simd.mul_f32s(f, scale));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dequantize_q8_0_v4(simd: pulp::x86::V4, bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q8_0_BLOCK_BYTES>();
    let (outs, _) = out.as_chunks_mut::<Q8_0_BLOCK>();
    for (block, out) in blocks.iter().zip(outs) {
        let scale = simd.splat_f32x16(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
        let (quants, _) = block[2..].as_chunks::<16>();
        let (sixteens, _) = out.as_chunks_mut::<16>();
        for (q, o) in quants.iter().zip(sixteens) {
            let q: pulp::i8x16 = pulp::bytemuck::cast(*q);
            let f = simd.convert_i32x16_to_f32x16(simd.convert_i8x16_to_i32x16(q));
            *o = pulp::bytemuck::cast(simd.mul_f32s(f, scale));
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
    /// Every weight row of `w` against the `C` rows packed in `x`: four weight rows at a time
    /// for one or two rows of `x` (so that at least eight chains of multiply-adds are in
    /// flight when the weights come from cache), two for more (the accumulators fill the
    /// vector registers), then one.
    #[inline(always)]
    fn panel<S: Simd, const C: usize>(
        &self,
        simd: S,
        w: &[f32],
        x: &[[S::f32s; C]],
        dst: &mut [f32],
    ) {
        let count = w.len() / self.k;
        let mut r = 0;
        if C <= 2 {
            r = self.rows_at_a_time::<S, C, 4>(simd, w, x, dst, r, count);
        }
        r = self.rows_at_a_time::<S, C, 2>(simd, w, x, dst, r, count);
        self.rows_at_a_time::<S, C, 1>(simd, w, x, dst, r, count);
    }

    /// Weight rows `from..` of `w`, `R` at a time, while `R` are left; returns the first row
    /// not done. Each product is one chain of multiply-adds over the vectors in order, so it
    /// does not depend on `R` or `C`.
    #[inline(always)]
    fn rows_at_a_time<S: Simd, const C: usize, const R: usize>(
        &self,
        simd: S,
        w: &[f32],
        x: &[[S::f32s; C]],
        dst: &mut [f32],
        from: usize,
        count: usize,
    ) -> usize {
        let (k, n) = (self.k, self.stride);
        let mut r = from;
        while r + R <= count {
            let rows: [&[f32]; R] = std::array::from_fn(|i| &w[(r + i) * k..(r + i + 1) * k]);
            let heads: [&[S::f32s]; R] = std::array::from_fn(|i| S::as_simd_f32s(rows[i]).0);
            let mut acc = [[simd.splat_f32s(0.0); C]; R];
            for (v, x) in x.iter().enumerate() {
                for i in 0..R {
                    let w = heads[i][v];
                    for c in 0..C {
                        acc[i][c] = simd.mul_add_f32s(w, x[c], acc[i][c]);
                    }
                }
            }
            for i in 0..R {
                self.finish(simd, rows[i], &acc[i], &mut dst[(r + i) * n..]);
            }
            r += R;
        }
        r
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
        // 37 inputs: whole vectors and a tail (at 8 or 16 lanes); 150 outputs: panels of four
        // and a remainder of two, blocks of 64 and a remainder of 22.
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
    fn q8_0_blocks_dequantize_to_scale_times_byte() {
        // Three blocks: scales 0.5, -2 and 1/1024 (f16 0x3800, 0xC000, 0x1400), bytes that
        // cover the signed range.
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for (scale_bits, scale) in [(0x3800u16, 0.5f32), (0xC000, -2.0), (0x1400, 1.0 / 1024.0)] {
            bytes.extend(scale_bits.to_le_bytes());
            for i in 0..Q8_0_BLOCK {
                let q = match i {
                    0 => i8::MIN,
                    1 => i8::MAX,
                    _ => (i as i32 * 37 % 256 - 128) as i8,
                };
                bytes.push(q as u8);
                expected.push(f32::from(q) * scale);
            }
        }
        let mut out = vec![f32::NAN; 3 * Q8_0_BLOCK];
        dequantize_q8_0(&bytes, &mut out);
        assert_eq!(out, expected);
        // Each path the CPU has, not only the one picked here.
        let mut scalar = vec![f32::NAN; 3 * Q8_0_BLOCK];
        dequantize_q8_0_scalar(&bytes, &mut scalar);
        assert_eq!(scalar, expected);
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(simd) = pulp::x86::V3::try_new() {
                let mut v3 = vec![f32::NAN; 3 * Q8_0_BLOCK];
                simd.vectorize(|| dequantize_q8_0_v3(simd, &bytes, &mut v3));
                assert_eq!(v3, expected, "AVX2");
            }
            if let Some(simd) = pulp::x86::V4::try_new() {
                let mut v4 = vec![f32::NAN; 3 * Q8_0_BLOCK];
                simd.vectorize(|| dequantize_q8_0_v4(simd, &bytes, &mut v4));
                assert_eq!(v4, expected, "AVX-512");
            }
        }
        assert!(expected.contains(&(-128.0 * 0.5)) && expected.contains(&(127.0 * -2.0)));
    }

    /// The products by each vector width the CPU has: scalar, and AVX2 and AVX-512 where
    /// present (the engine uses the widest), against f64 dot products.
    #[test]
    fn every_vector_width_the_cpu_has_computes_the_products() {
        // 53 inputs: whole vectors and a tail at every width; 70 outputs: blocks of four,
        // two and one weight rows; 6 rows of `x`: a group of four and one of two.
        let (out_dim, k, n) = (70, 53, 6);
        let value = |i: usize| ((i * 7919) % 211) as f32 / 211.0 - 0.5;
        let w: Vec<f32> = (0..out_dim * k).map(value).collect();
        let xs: Vec<f32> = (0..n * k).map(|i| value(i + 1_000)).collect();
        let rows: Vec<&[f32]> = xs.chunks_exact(k).collect();
        let run = |with: &dyn Fn(Products)| -> Vec<f32> {
            let mut dst = vec![f32::NAN; out_dim * n];
            with(Products {
                w: WeightRows::F32(&w),
                count: out_dim,
                rows: &rows,
                dst: &mut dst,
            });
            dst
        };
        let check = |name: &str, got: Vec<f32>| {
            for o in 0..out_dim {
                for (j, row) in rows.iter().enumerate() {
                    let exact: f64 = w[o * k..(o + 1) * k]
                        .iter()
                        .zip(row.iter())
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let got = f64::from(got[o * n + j]);
                    assert!((got - exact).abs() < 1e-5, "{name}: {got} vs {exact}");
                }
            }
        };
        check("scalar", run(&|p| Simd::vectorize(pulp::Scalar::new(), p)));
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(simd) = pulp::x86::V3::try_new() {
                check("AVX2", run(&|p| Simd::vectorize(simd, p)));
            }
            if let Some(simd) = pulp::x86::V4::try_new() {
                check("AVX-512", run(&|p| Simd::vectorize(simd, p)));
            }
        }
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
