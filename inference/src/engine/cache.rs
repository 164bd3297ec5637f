//! The KV cache manager: a pool of fixed-capacity slots, one per running sequence, owned by
//! the engine and lent to the model for each forward. The model never keeps KV state itself,
//! so sequences of any length at any position batch together.

use candle_core::{DType, Device, Tensor};

/// Index of a slot in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId(usize);

/// Per-layer key and value storage of one slot, each `[kv_heads, capacity, head_dim]`.
#[derive(Debug)]
struct SlotStorage {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

/// Shape of the KV cache, as the model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A bounded pool of KV slots. Storage of a slot is allocated the first time the slot is used
/// and kept for reuse.
#[derive(Debug)]
pub struct KvPool {
    shape: KvShape,
    capacity: usize,
    dtype: DType,
    device: Device,
    storage: Vec<Option<SlotStorage>>,
    free: Vec<SlotId>,
}

impl KvPool {
    /// `slots` sequences of at most `capacity` tokens each.
    pub fn new(
        shape: KvShape,
        slots: usize,
        capacity: usize,
        dtype: DType,
        device: Device,
    ) -> Self {
        Self {
            shape,
            capacity,
            dtype,
            device,
            storage: (0..slots).map(|_| None).collect(),
            // Reversed so that slot 0 is handed out first.
            free: (0..slots).rev().map(SlotId).collect(),
        }
    }

    /// Tokens one slot holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Bytes of KV storage one token takes.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.shape.layers
            * self.shape.kv_heads
            * self.shape.head_dim
            * self.dtype.size_in_bytes()
    }

    pub fn allocate(&mut self) -> candle_core::Result<Option<SlotId>> {
        let Some(slot) = self.free.pop() else {
            return Ok(None);
        };
        if self.storage[slot.0].is_none() {
            let dims = (self.shape.kv_heads, self.capacity, self.shape.head_dim);
            let mut k = Vec::with_capacity(self.shape.layers);
            let mut v = Vec::with_capacity(self.shape.layers);
            for _ in 0..self.shape.layers {
                k.push(Tensor::zeros(dims, self.dtype, &self.device)?);
                v.push(Tensor::zeros(dims, self.dtype, &self.device)?);
            }
            self.storage[slot.0] = Some(SlotStorage { k, v });
        }
        Ok(Some(slot))
    }

    pub fn release(&mut self, slot: SlotId) {
        debug_assert!(!self.free.contains(&slot), "slot released twice");
        self.free.push(slot);
    }

    fn slot(&self, slot: SlotId) -> candle_core::Result<&SlotStorage> {
        self.storage
            .get(slot.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| candle_core::Error::Msg(format!("KV slot {} is not allocated", slot.0)))
    }

    /// Writes keys and values `[kv_heads, n, head_dim]` of `layer` at positions
    /// `offset..offset + n` of `slot`.
    pub fn write(
        &self,
        layer: usize,
        slot: SlotId,
        offset: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        let n = k.dim(1)?;
        if offset + n > self.capacity {
            candle_core::bail!("KV slot overflow: {} + {n} > {}", offset, self.capacity);
        }
        let storage = self.slot(slot)?;
        storage.k[layer].slice_set(k, 1, offset)?;
        storage.v[layer].slice_set(v, 1, offset)?;
        Ok(())
    }

    /// Keys and values of positions `0..len` of `layer` in `slot`, `[kv_heads, len, head_dim]`.
    /// Copies the first `len` positions of `from` into `to` (a sequence that starts with the
    /// same tokens then needs no prefill of them).
    pub fn copy_prefix(&self, from: SlotId, to: SlotId, len: usize) -> candle_core::Result<()> {
        if from == to {
            return Ok(());
        }
        for layer in 0..self.shape.layers {
            let (k, v) = self.read(layer, from, len)?;
            self.write(layer, to, 0, &k.contiguous()?, &v.contiguous()?)?;
        }
        Ok(())
    }

    pub fn read(
        &self,
        layer: usize,
        slot: SlotId,
        len: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let storage = self.slot(slot)?;
        Ok((
            storage.k[layer].narrow(1, 0, len)?,
            storage.v[layer].narrow(1, 0, len)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_reused_and_written_in_place() -> candle_core::Result<()> {
        let shape = KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 3,
        };
        let mut pool = KvPool::new(shape, 2, 4, DType::F32, Device::Cpu);
        let a = pool.allocate()?.expect("first slot");
        let b = pool.allocate()?.expect("second slot");
        assert_ne!(a, b);
        assert!(pool.allocate()?.is_none(), "pool of 2 gave a third slot");
        let k = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((2, 2, 3))?;
        pool.write(0, a, 1, &k, &k)?;
        let (rk, _) = pool.read(0, a, 3)?;
        assert_eq!(
            rk.narrow(1, 1, 2)?.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?
        );
        assert!(
            pool.write(0, a, 3, &k, &k).is_err(),
            "write past capacity must fail"
        );
        pool.copy_prefix(a, b, 3)?;
        let (ak, av) = pool.read(0, a, 3)?;
        let (bk, bv) = pool.read(0, b, 3)?;
        assert_eq!(
            bk.flatten_all()?.to_vec1::<f32>()?,
            ak.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(
            bv.flatten_all()?.to_vec1::<f32>()?,
            av.flatten_all()?.to_vec1::<f32>()?
        );
        pool.release(a);
        assert_eq!(pool.allocate()?, Some(a));
        Ok(())
    }
}
