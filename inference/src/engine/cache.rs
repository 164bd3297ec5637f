//! The KV cache manager: a bounded pool of fixed-size blocks of KV storage, owned by the engine
//! and lent to the model for each forward, plus a prefix cache over those blocks.
//!
//! Storage is one tensor per layer for keys and one for values, `[kv_heads, blocks × block,
//! head_dim]`, allocated once at start-up: memory never grows past the configured budget. A
//! sequence holds a *block table*, the blocks its positions live in, in order; its KV is read
//! back as one `[kv_heads, len, head_dim]` view (a zero-copy slice when its blocks happen to be
//! consecutive, a gather otherwise).
//!
//! Blocks are reference counted. A full block whose KV has been computed can be *registered*
//! under the tokens it holds and the entry of the block before it, so that a later sequence
//! whose prompt starts with the same tokens takes the same blocks instead of recomputing them
//! (the council's agents share the system prompt and task; the rounds share the transcript).
//! Registered blocks that no sequence references any more stay cached and are evicted least
//! recently used first, only when a block is needed and none is free. Only full blocks are
//! shared, and a shared block is never written again, so no copy-on-write is needed.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

/// Index of a block in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// Shape of the KV cache, as the model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Bytes of KV storage one token takes in `dtype`.
    pub fn bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * dtype.size_in_bytes()
    }
}

/// Identity of a prefix-cache entry. Entry ids are never reused, so a key naming an evicted
/// parent can no longer be reached.
pub type EntryId = u64;

/// The entry id that stands for "no tokens before this block".
pub const ROOT: EntryId = 0;

/// A full block's key in the prefix cache: the entry of the block before it and its tokens.
type EntryKey = (EntryId, Box<[u32]>);

/// How a sequence's KV is read back for attention.
#[derive(Debug, Clone)]
pub enum KvView {
    /// Positions `offset..offset + len` of the storage: the blocks are consecutive.
    Slice { offset: usize, len: usize },
    /// These storage positions, in order.
    Gather(Tensor),
}

/// What the prefix cache has done since the pool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Blocks looked up.
    pub lookups: u64,
    /// Blocks found.
    pub hits: u64,
    /// Cached blocks dropped to make room.
    pub evictions: u64,
}

/// A bounded pool of KV blocks with a prefix cache.
#[derive(Debug)]
pub struct KvPool {
    shape: KvShape,
    block_size: usize,
    blocks: usize,
    device: Device,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    refs: Vec<u32>,
    /// Blocks that hold nothing anyone may want, ready to hand out.
    free: Vec<BlockId>,
    prefix_cache: bool,
    entries: HashMap<EntryKey, (EntryId, BlockId)>,
    /// The entry a block is registered under, if any.
    entry_of: Vec<Option<(EntryId, EntryKey)>>,
    next_entry: EntryId,
    /// Registered blocks nobody references, by when they were last released.
    lru: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    clock: u64,
    stats: PrefixStats,
}

impl KvPool {
    /// A pool of `blocks` blocks of `block_size` tokens each; `prefix_cache` turns sharing of
    /// registered prefixes on.
    pub fn new(
        shape: KvShape,
        blocks: usize,
        block_size: usize,
        dtype: DType,
        device: Device,
        prefix_cache: bool,
    ) -> candle_core::Result<Self> {
        if blocks == 0 || block_size == 0 {
            candle_core::bail!("a KV pool needs at least one block of at least one token");
        }
        if blocks > u32::MAX as usize {
            candle_core::bail!("{blocks} KV blocks are more than a pool can index");
        }
        let dims = (shape.kv_heads, blocks * block_size, shape.head_dim);
        let mut k = Vec::with_capacity(shape.layers);
        let mut v = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            k.push(Tensor::zeros(dims, dtype, &device)?);
            v.push(Tensor::zeros(dims, dtype, &device)?);
        }
        Ok(Self {
            shape,
            block_size,
            blocks,
            device,
            k,
            v,
            refs: vec![0; blocks],
            // Reversed so that block 0 is handed out first and fresh tables are consecutive.
            free: (0..blocks as u32).rev().map(BlockId).collect(),
            prefix_cache,
            entries: HashMap::new(),
            entry_of: vec![None; blocks],
            next_entry: ROOT + 1,
            lru: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            stats: PrefixStats::default(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    /// Tokens the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks * self.block_size
    }

    /// Blocks that can be handed out now: free ones and cached ones nobody references.
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Registered blocks nobody references (kept for reuse until evicted).
    pub fn cached_unreferenced(&self) -> usize {
        self.lru.len()
    }

    pub fn prefix_cache_enabled(&self) -> bool {
        self.prefix_cache
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.stats
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Bytes of KV storage one token takes.
    pub fn bytes_per_token(&self) -> usize {
        self.shape.bytes_per_token(self.k[0].dtype())
    }

    /// A block for a sequence to write into: a free one, else the least recently used cached
    /// one (its entry is dropped). `None` when every block is referenced.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.lru.pop_first()?;
                self.forget(block);
                self.stats.evictions += 1;
                block
            }
        };
        self.refs[block.index()] = 1;
        Some(block)
    }

    /// Takes one more reference to `block` (a sequence sharing it).
    pub fn share(&mut self, block: BlockId) {
        let i = block.index();
        if self.refs[i] == 0 {
            self.lru.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
    }

    /// Drops one reference to `block`; a block nobody references is cached if registered,
    /// free otherwise.
    pub fn release(&mut self, block: BlockId) {
        let i = block.index();
        debug_assert!(self.refs[i] > 0, "block released more often than taken");
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] > 0 {
            return;
        }
        if self.entry_of[i].is_some() {
            self.clock += 1;
            self.released_at[i] = self.clock;
            self.lru.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }

    /// Releases every block of `table` and empties it.
    pub fn release_all(&mut self, table: &mut Vec<BlockId>) {
        // Last block first, so that a prefix's later blocks are evicted before its first ones.
        for block in table.drain(..).rev() {
            self.release(block);
        }
    }

    fn forget(&mut self, block: BlockId) {
        if let Some((_, key)) = self.entry_of[block.index()].take()
            && self.entries.get(&key).is_some_and(|&(_, b)| b == block)
        {
            self.entries.remove(&key);
        }
    }

    /// The cached blocks that hold the longest registered prefix of `tokens`, at most
    /// `max_blocks` of them, each with a reference taken for the caller; with the entry of the
    /// last one (to register the sequence's later blocks under).
    pub fn lookup(&mut self, tokens: &[u32], max_blocks: usize) -> (Vec<BlockId>, EntryId) {
        let mut found = Vec::new();
        let mut parent = ROOT;
        if !self.prefix_cache {
            return (found, parent);
        }
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            self.stats.lookups += 1;
            let key: EntryKey = (parent, chunk.into());
            let Some(&(entry, block)) = self.entries.get(&key) else {
                break;
            };
            self.stats.hits += 1;
            self.share(block);
            found.push(block);
            parent = entry;
        }
        (found, parent)
    }

    /// How many blocks of `tokens` (at most `max_blocks`) a [`Self::lookup`] would find now,
    /// without taking them or counting a lookup.
    pub fn cached_blocks(&self, tokens: &[u32], max_blocks: usize) -> usize {
        if !self.prefix_cache {
            return 0;
        }
        let mut parent = ROOT;
        let mut found = 0;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let key: EntryKey = (parent, chunk.into());
            let Some(&(entry, _)) = self.entries.get(&key) else {
                break;
            };
            found += 1;
            parent = entry;
        }
        found
    }

    /// Registers `block`, which holds the KV of `tokens` (one full block) after the prefix of
    /// entry `parent`; returns the entry later blocks of the sequence are registered under.
    /// If the same prefix is already cached in another block, that entry is returned and
    /// `block` stays private to its sequence.
    pub fn register(&mut self, block: BlockId, parent: EntryId, tokens: &[u32]) -> EntryId {
        debug_assert_eq!(tokens.len(), self.block_size);
        if !self.prefix_cache {
            return ROOT;
        }
        let key: EntryKey = (parent, tokens.into());
        if let Some(&(entry, _)) = self.entries.get(&key) {
            return entry;
        }
        if self.entry_of[block.index()].is_some() {
            // Already registered under another prefix: sharing is by whole prefixes only.
            return ROOT;
        }
        let entry = self.next_entry;
        self.next_entry += 1;
        self.entries.insert(key.clone(), (entry, block));
        self.entry_of[block.index()] = Some((entry, key));
        entry
    }

    /// Copies the first `tokens` positions of block `from` into block `to`.
    pub fn copy_block(&self, from: BlockId, to: BlockId, tokens: usize) -> candle_core::Result<()> {
        let (src, dst) = (from.index() * self.block_size, to.index() * self.block_size);
        for store in self.k.iter().chain(&self.v) {
            let part = store.narrow(1, src, tokens)?.contiguous()?;
            store.slice_set(&part, 1, dst)?;
        }
        Ok(())
    }

    /// Writes keys and values `[kv_heads, n, head_dim]` of `layer` at positions
    /// `start..start + n` of the sequence whose blocks are `table`.
    pub fn write(
        &self,
        layer: usize,
        table: &[BlockId],
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        let n = k.dim(1)?;
        if (start + n).div_ceil(self.block_size) > table.len() {
            candle_core::bail!(
                "KV write of positions {start}..{} past the {} blocks of the sequence",
                start + n,
                table.len()
            );
        }
        let mut done = 0;
        while done < n {
            let pos = start + done;
            let (block, within) = (table[pos / self.block_size], pos % self.block_size);
            let take = (self.block_size - within).min(n - done);
            let at = block.index() * self.block_size + within;
            let (k_part, v_part) = if take == n {
                (k.clone(), v.clone())
            } else {
                (
                    k.narrow(1, done, take)?.contiguous()?,
                    v.narrow(1, done, take)?.contiguous()?,
                )
            };
            self.k[layer].slice_set(&k_part, 1, at)?;
            self.v[layer].slice_set(&v_part, 1, at)?;
            done += take;
        }
        Ok(())
    }

    /// How to read positions `0..len` of the sequence whose blocks are `table`.
    pub fn view(&self, table: &[BlockId], len: usize) -> candle_core::Result<KvView> {
        let needed = len.div_ceil(self.block_size);
        if needed > table.len() {
            candle_core::bail!("KV read of {len} positions past the {} blocks", table.len());
        }
        let table = &table[..needed];
        let consecutive = table.windows(2).all(|w| w[1].0 == w[0].0 + 1);
        if consecutive {
            let offset = table.first().map_or(0, |b| b.index() * self.block_size);
            return Ok(KvView::Slice { offset, len });
        }
        Ok(KvView::Gather(Tensor::new(
            self.rows(table, len)?,
            &self.device,
        )?))
    }

    /// Storage rows (positions along the pool's second axis) of a sequence's positions
    /// `0..len`, in order.
    pub fn rows(&self, table: &[BlockId], len: usize) -> candle_core::Result<Vec<u32>> {
        if len.div_ceil(self.block_size) > table.len() {
            candle_core::bail!("KV read of {len} positions past the {} blocks", table.len());
        }
        Ok((0..len)
            .map(|p| {
                (table[p / self.block_size].index() * self.block_size + p % self.block_size) as u32
            })
            .collect())
    }

    /// The keys and values of `layer`, `[kv_heads, blocks * block_size, head_dim]` each.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Keys and values `[kv_heads, len, head_dim]` of `layer` through `view`.
    pub fn read(&self, layer: usize, view: &KvView) -> candle_core::Result<(Tensor, Tensor)> {
        match view {
            KvView::Slice { offset, len } => Ok((
                self.k[layer].narrow(1, *offset, *len)?,
                self.v[layer].narrow(1, *offset, *len)?,
            )),
            KvView::Gather(positions) => Ok((
                self.k[layer].index_select(positions, 1)?,
                self.v[layer].index_select(positions, 1)?,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        layers: 1,
        kv_heads: 2,
        head_dim: 3,
    };

    fn pool(blocks: usize, prefix_cache: bool) -> KvPool {
        KvPool::new(SHAPE, blocks, 2, DType::F32, Device::Cpu, prefix_cache).expect("pool")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    }

    /// `[kv_heads, n, head_dim]` with distinct values starting at `from`.
    fn kv(n: usize, from: f32) -> Tensor {
        Tensor::arange(from, from + (2 * n * 3) as f32, &Device::Cpu)
            .and_then(|t| t.reshape((2, n, 3)))
            .expect("kv")
    }

    #[test]
    fn blocks_are_bounded_counted_and_reused() {
        let mut p = pool(2, false);
        let a = p.allocate().expect("first");
        let b = p.allocate().expect("second");
        assert_ne!(a, b);
        assert!(p.allocate().is_none(), "a pool of 2 gave a third block");
        p.release(a);
        assert_eq!(p.available(), 1);
        assert_eq!(p.allocate(), Some(a));
    }

    #[test]
    fn writes_span_blocks_and_read_back_through_slices_and_gathers() -> candle_core::Result<()> {
        let mut p = pool(4, false);
        let blocks: Vec<BlockId> = (0..4).map(|_| p.allocate().expect("block")).collect();
        // A table in scrambled order forces a gather; its first three positions are written
        // in one call that crosses a block boundary, the fourth in another.
        let table = [blocks[3], blocks[1]];
        let first = kv(3, 0.0);
        p.write(0, &table, 0, &first, &first)?;
        let last = kv(1, 100.0);
        p.write(0, &table, 3, &last, &last)?;
        let view = p.view(&table, 4)?;
        assert!(matches!(view, KvView::Gather(_)));
        let (k, v) = p.read(0, &view)?;
        let expected = Tensor::cat(&[&first, &last], 1)?;
        assert_eq!(values(&k), values(&expected));
        assert_eq!(values(&v), values(&expected));
        // Consecutive blocks read as a slice with the same values.
        let straight = [blocks[0], blocks[1]];
        p.copy_block(blocks[3], blocks[0], 2)?;
        let view = p.view(&straight, 4)?;
        assert!(matches!(view, KvView::Slice { offset: 0, len: 4 }));
        assert_eq!(values(&p.read(0, &view)?.0), values(&expected));
        assert!(
            p.write(0, &table, 4, &last, &last).is_err(),
            "a write past the table must fail"
        );
        assert!(
            p.view(&table, 5).is_err(),
            "a read past the table must fail"
        );
        Ok(())
    }

    #[test]
    fn registered_prefixes_are_found_whole_and_only_whole() {
        let mut p = pool(6, true);
        let tokens = [1, 2, 3, 4, 5];
        let a = p.allocate().expect("a");
        let b = p.allocate().expect("b");
        let after_a = p.register(a, ROOT, &tokens[..2]);
        let after_b = p.register(b, after_a, &tokens[2..4]);
        assert_ne!(after_a, after_b);
        // The same tokens find both blocks; a reference is taken on each.
        let (found, entry) = p.lookup(&tokens, 8);
        assert_eq!(found, vec![a, b]);
        assert_eq!(entry, after_b);
        // A different first block finds nothing, even though its second block matches.
        let (none, entry) = p.lookup(&[9, 9, 3, 4], 8);
        assert!(none.is_empty());
        assert_eq!(entry, ROOT);
        // The limit caps how much is taken.
        let (one, _) = p.lookup(&tokens, 1);
        assert_eq!(one, vec![a]);
        let stats = p.prefix_stats();
        assert_eq!((stats.lookups, stats.hits), (2 + 1 + 1, 2 + 1));
        // Registering the same prefix from another block keeps the first.
        let c = p.allocate().expect("c");
        assert_eq!(p.register(c, ROOT, &tokens[..2]), after_a);
        let (found, _) = p.lookup(&tokens[..2], 8);
        assert_eq!(found, vec![a]);
    }

    #[test]
    fn unreferenced_cached_blocks_survive_until_evicted_least_recent_first() {
        let mut p = pool(3, true);
        let a = p.allocate().expect("a");
        let b = p.allocate().expect("b");
        let entry_a = p.register(a, ROOT, &[1, 1]);
        p.register(b, ROOT, &[2, 2]);
        p.release(a);
        p.release(b);
        assert_eq!(p.cached_unreferenced(), 2);
        assert_eq!(p.available(), 3);
        // Still found after the sequences that computed them are gone.
        let (found, _) = p.lookup(&[1, 1], 8);
        assert_eq!(found, vec![a]);
        p.release(a);
        // a was released after b: the free block goes first, then b, then a.
        let c = p.allocate().expect("free block");
        assert!(c != a && c != b);
        assert_eq!(p.allocate(), Some(b));
        assert_eq!(p.prefix_stats().evictions, 1);
        assert!(
            p.lookup(&[2, 2], 8).0.is_empty(),
            "an evicted block is found"
        );
        assert_eq!(p.allocate(), Some(a));
        assert!(p.allocate().is_none());
        // A key naming the evicted entry can never be reached again.
        let d = a;
        assert_ne!(p.register(d, entry_a, &[3, 3]), entry_a);
        assert!(p.lookup(&[1, 1, 3, 3], 8).0.is_empty());
    }

    #[test]
    fn without_the_prefix_cache_nothing_is_shared() {
        let mut p = pool(2, false);
        let a = p.allocate().expect("a");
        assert_eq!(p.register(a, ROOT, &[1, 1]), ROOT);
        p.release(a);
        assert_eq!(p.cached_unreferenced(), 0);
        assert!(p.lookup(&[1, 1], 8).0.is_empty());
    }
}
