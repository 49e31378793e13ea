//! `KvCacheManager`: the thread-safe front of the paged KV cache (sequences, prefix sharing,
//! copy-on-write, live-window eviction, preemption, flat tables for kernels).

use std::collections::HashMap;

use parking_lot::Mutex;

use super::pool::BlockPool;
use super::table::{block_hash, BlockTable};
use super::window::{self, EvictionPlan, LiveWindow, Schedule};
use super::{BlockError, BlockId, CacheConfig, SeqId};

/// A block copy the engine must perform (whole block, every layer and head) before writing `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    /// Block to read (kept allocated until [`KvCacheManager::take_copies`] hands the copy out).
    pub src: BlockId,
    /// Freshly allocated, exclusively owned block to write.
    pub dst: BlockId,
}

/// Block tables of a batch as flat arrays, ready to copy to a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatBlockTables {
    /// Columns: the longest table of the batch.
    pub width: usize,
    /// `rows x width` physical block ids, row major; -1 = empty (released or past the end).
    pub table: Vec<i32>,
    /// Block-aligned `live_start` of each row.
    pub live_starts: Vec<i32>,
    /// Tokens of each row.
    pub lens: Vec<i32>,
    /// Protected prefix of each row (block-aligned prompt in protect mode, else 0).
    pub protected_lens: Vec<i32>,
}

/// One operation of a scheduler step, for [`KvCacheManager::apply_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOp<'a> {
    /// [`KvCacheManager::add_sequence`].
    Add {
        /// The sequence.
        id: SeqId,
        /// Its prompt.
        prompt: &'a [u32],
    },
    /// [`KvCacheManager::append`].
    Append {
        /// The sequence.
        id: SeqId,
        /// The tokens to append.
        tokens: &'a [u32],
    },
    /// [`KvCacheManager::compact`].
    Compact(SeqId),
    /// [`KvCacheManager::free`].
    Free(SeqId),
    /// [`KvCacheManager::preempt`].
    Preempt(SeqId),
}

/// What the operations of one step returned, flat and in operation order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepOutput {
    /// Slots of every `Add` (its prompt) and `Append` (its tokens).
    pub slots: Vec<i64>,
    /// Blocks every `Compact` released.
    pub released: Vec<BlockId>,
    /// How many of `released` each `Compact` released.
    pub released_counts: Vec<u32>,
    /// Tokens of every `Preempt`.
    pub preempted: Vec<u32>,
    /// How many of `preempted` each `Preempt` returned.
    pub preempted_counts: Vec<u32>,
}

impl StepOutput {
    /// Empties every buffer (keeping their capacity).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.released.clear();
        self.released_counts.clear();
        self.preempted.clear();
        self.preempted_counts.clear();
    }
}

/// Consistent copy of the whole manager state, for invariant checks and diagnostics.
#[derive(Clone, Debug)]
pub struct ManagerSnapshot {
    /// Reference count of every block.
    pub refcounts: Vec<u32>,
    /// Free blocks in allocation order.
    pub free_queue: Vec<BlockId>,
    /// Prefix-cache index: (content hash, block).
    pub cached: Vec<(u64, BlockId)>,
    /// Copies handed out by the next `take_copies` (each holds a reference on its `src`).
    pub pending_copies: Vec<BlockCopy>,
    /// Every registered sequence.
    pub sequences: Vec<(SeqId, BlockTable)>,
}

#[derive(Debug)]
struct Inner {
    pool: BlockPool,
    seqs: HashMap<SeqId, BlockTable>,
    copies: Vec<BlockCopy>,
}

/// The paged KV-cache manager: one mutex over pool and tables (operations are short and O(blocks
/// touched)), so it is `Send + Sync` and every method takes `&self`.
#[derive(Debug)]
pub struct KvCacheManager {
    config: CacheConfig,
    schedule: Option<Schedule>,
    inner: Mutex<Inner>,
}

fn check_len(id: SeqId, len: usize) -> Result<(), BlockError> {
    if len > i32::MAX as usize {
        return Err(BlockError::SequenceTooLong { id, len });
    }
    Ok(())
}

fn slot(block: BlockId, bs: usize, pos: usize) -> i64 {
    (block as usize * bs + pos % bs) as i64
}

impl KvCacheManager {
    /// A manager over a fresh pool; the configuration is validated first.
    pub fn new(config: CacheConfig) -> Result<Self, BlockError> {
        config.validate()?;
        let inner = Inner {
            pool: BlockPool::new(config.num_blocks)?,
            seqs: HashMap::new(),
            copies: Vec::new(),
        };
        let schedule = config
            .eviction
            .as_ref()
            .map(|ev| Schedule::of(ev, config.block_size));
        Ok(Self {
            config,
            schedule,
            inner: Mutex::new(inner),
        })
    }

    /// The configuration the manager was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.config.num_blocks
    }

    /// Free blocks now (cached blocks nobody references count as free).
    pub fn num_free_blocks(&self) -> usize {
        self.inner.lock().pool.num_free()
    }

    /// Registered sequences.
    pub fn num_sequences(&self) -> usize {
        self.inner.lock().seqs.len()
    }

    /// Most blocks a sequence with this prompt growing to `max_len` tokens holds at once, decoding
    /// one token per step and compacting when due (the compressed footprint with eviction).
    pub fn max_blocks_held(&self, prompt_len: usize, max_len: usize) -> usize {
        window::max_blocks_held(&self.config, prompt_len, max_len)
    }

    /// Registers sequence `id` with its prompt and returns the prompt's slot mapping; positions in
    /// blocks reused from the prefix cache get -1 (already computed, not to be written). The block
    /// holding the last prompt token is never taken from the cache, so at least one token is computed.
    pub fn add_sequence(&self, id: SeqId, prompt: &[u32]) -> Result<Vec<i64>, BlockError> {
        if prompt.is_empty() {
            return Err(BlockError::EmptyPrompt(id));
        }
        check_len(id, prompt.len())?;
        let bs = self.config.block_size;
        let caching = self.config.enable_prefix_caching;
        let mut g = self.inner.lock();
        let Inner { pool, seqs, .. } = &mut *g;
        if seqs.contains_key(&id) {
            return Err(BlockError::DuplicateSequence(id));
        }
        let p = prompt.len();
        let mut hashes = Vec::new();
        if caching {
            let mut parent = None;
            for chunk in prompt.chunks_exact(bs) {
                let h = block_hash(parent, chunk);
                hashes.push(h);
                parent = Some(h);
            }
        }
        let hits: Vec<BlockId> = hashes
            .iter()
            .take((p - 1) / bs)
            .map_while(|h| pool.lookup(*h))
            .collect();
        let revived = hits.iter().filter(|b| pool.refcount(**b) == 0).count();
        let needed = p.div_ceil(bs) - hits.len() + revived;
        if needed > pool.num_free() {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: pool.num_free(),
            });
        }
        let mut blocks: Vec<Option<BlockId>> = Vec::with_capacity(p.div_ceil(bs));
        for &b in &hits {
            pool.incref(b);
            blocks.push(Some(b));
        }
        while blocks.len() < p.div_ceil(bs) {
            blocks.push(Some(pool.allocate()?));
        }
        let mut slots = Vec::with_capacity(p);
        for pos in 0..p {
            let i = pos / bs;
            match blocks[i] {
                Some(b) if i >= hits.len() => slots.push(slot(b, bs, pos)),
                _ => slots.push(-1),
            }
        }
        for (i, h) in hashes.iter().enumerate().skip(hits.len()) {
            if let Some(b) = blocks[i] {
                pool.register(b, *h);
            }
        }
        // The whole prompt arrives at once: the planner's rule (one compression at the prompt's
        // end), kept pending only while it has something to evict.
        let mut window = LiveWindow {
            len: p,
            ..LiveWindow::default()
        };
        if let Some(s) = &self.schedule {
            window.grow(s, p, p, true, Some(p));
            if window.due(s).is_none() {
                window.compress_pending = false;
            }
        }
        seqs.insert(
            id,
            BlockTable {
                tokens: prompt.to_vec(),
                prompt_len: p,
                window,
                blocks,
                hashes,
                compactions: 0,
            },
        );
        Ok(slots)
    }

    /// Appends tokens to sequence `id` and returns their slots. A shared partially filled last block
    /// is copied first (see [`Self::take_copies`]); refused with `EvictionDue` while an eviction is due.
    pub fn append(&self, id: SeqId, tokens: &[u32]) -> Result<Vec<i64>, BlockError> {
        let bs = self.config.block_size;
        let caching = self.config.enable_prefix_caching;
        let mut g = self.inner.lock();
        let Inner { pool, seqs, copies } = &mut *g;
        let seq = seqs.get_mut(&id).ok_or(BlockError::UnknownSequence(id))?;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(s) = &self.schedule {
            if seq.window.due(s).is_some() {
                return Err(BlockError::EvictionDue(id));
            }
        }
        let len = seq.tokens.len();
        check_len(id, len + tokens.len())?;
        let new_blocks = (len + tokens.len()).div_ceil(bs) - seq.blocks.len();
        let shared_last = match seq.blocks.last() {
            Some(Some(b)) if len % bs != 0 && pool.refcount(*b) > 1 => Some(*b),
            _ => None,
        };
        let needed = new_blocks + usize::from(shared_last.is_some());
        if needed > pool.num_free() {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: pool.num_free(),
            });
        }
        if let Some(src) = shared_last {
            let dst = pool.allocate()?;
            copies.push(BlockCopy { src, dst });
            let last = seq.blocks.len() - 1;
            seq.blocks[last] = Some(dst);
        }
        let mut slots = Vec::with_capacity(tokens.len());
        for &t in tokens {
            let pos = seq.tokens.len();
            if pos % bs == 0 {
                seq.blocks.push(Some(pool.allocate()?));
            }
            let b = seq.blocks[pos / bs].expect("blocks from live_start on are held");
            slots.push(slot(b, bs, pos));
            seq.tokens.push(t);
            seq.window.len = seq.tokens.len();
            let full = seq.tokens.len() % bs == 0;
            if caching && full && seq.compactions == 0 && seq.hashes.len() == pos / bs {
                let h = block_hash(seq.hashes.last().copied(), &seq.tokens[pos + 1 - bs..=pos]);
                seq.hashes.push(h);
                pool.register(b, h);
            }
        }
        Ok(slots)
    }

    /// The eviction due now for sequence `id`, if any (always `None` without eviction configured).
    pub fn eviction_due(&self, id: SeqId) -> Result<Option<EvictionPlan>, BlockError> {
        let g = self.inner.lock();
        let seq = g.seqs.get(&id).ok_or(BlockError::UnknownSequence(id))?;
        Ok(self.schedule.as_ref().and_then(|s| seq.window.due(s)))
    }

    /// Applies the due eviction: advances `live_start`, empties the table entries before it and
    /// returns their blocks (freed unless another table shares them). Blocks the compaction kernel
    /// will write (the new window except its newest `L` tokens) are made exclusive first: shared ones
    /// are copied (see [`Self::take_copies`]), cached ones leave the prefix cache. Atomic: on error
    /// nothing changed.
    pub fn compact(&self, id: SeqId) -> Result<Vec<BlockId>, BlockError> {
        let bs = self.config.block_size;
        let mut g = self.inner.lock();
        let Inner { pool, seqs, copies } = &mut *g;
        let seq = seqs.get_mut(&id).ok_or(BlockError::UnknownSequence(id))?;
        let s = self
            .schedule
            .as_ref()
            .ok_or(BlockError::NoEvictionDue(id))?;
        let plan = seq.window.due(s).ok_or(BlockError::NoEvictionDue(id))?;
        let (lo, hi) = (seq.window.base() / bs, plan.live_start_after / bs);
        let write_end = seq.window.len.saturating_sub(s.interval);
        let write_hi = if write_end > plan.live_start_after {
            write_end.div_ceil(bs)
        } else {
            hi
        };
        let write_hi = write_hi.min(seq.blocks.len());
        let freed = seq.blocks[lo..hi]
            .iter()
            .flatten()
            .filter(|b| pool.refcount(**b) == 1)
            .count();
        let cow = seq.blocks[hi..write_hi]
            .iter()
            .flatten()
            .filter(|b| pool.refcount(**b) > 1)
            .count();
        if cow > pool.num_free() + freed {
            return Err(BlockError::OutOfBlocks {
                needed: cow - freed,
                free: pool.num_free(),
            });
        }
        let mut released = Vec::with_capacity(hi - lo);
        for entry in &mut seq.blocks[lo..hi] {
            if let Some(b) = entry.take() {
                pool.decref(b);
                released.push(b);
            }
        }
        for entry in &mut seq.blocks[hi..write_hi] {
            if let Some(b) = *entry {
                if pool.refcount(b) > 1 {
                    let dst = pool.allocate()?;
                    copies.push(BlockCopy { src: b, dst });
                    *entry = Some(dst);
                } else {
                    pool.unregister(b);
                }
            }
        }
        seq.window.apply(&plan);
        seq.compactions += 1;
        seq.hashes.clear();
        Ok(released)
    }

    /// Registers `child` as a copy of `parent` sharing all its blocks (parallel sampling); the
    /// first write into a shared block copies it.
    pub fn fork(&self, parent: SeqId, child: SeqId) -> Result<(), BlockError> {
        let mut g = self.inner.lock();
        let Inner { pool, seqs, .. } = &mut *g;
        if seqs.contains_key(&child) {
            return Err(BlockError::DuplicateSequence(child));
        }
        let table = seqs
            .get(&parent)
            .ok_or(BlockError::UnknownSequence(parent))?
            .clone();
        for b in table.held() {
            pool.incref(b);
        }
        seqs.insert(child, table);
        Ok(())
    }

    /// Removes sequence `id` and releases its blocks (cached ones stay reusable while free).
    pub fn free(&self, id: SeqId) -> Result<(), BlockError> {
        self.remove(id).map(|_| ())
    }

    /// Removes sequence `id`, releases everything and returns all its token ids (prompt and
    /// generated) so it can be resumed by recompute: `add_sequence(id, &tokens)`.
    pub fn preempt(&self, id: SeqId) -> Result<Vec<u32>, BlockError> {
        self.remove(id).map(|t| t.tokens)
    }

    fn remove(&self, id: SeqId) -> Result<BlockTable, BlockError> {
        let mut g = self.inner.lock();
        let table = g.seqs.remove(&id).ok_or(BlockError::UnknownSequence(id))?;
        for b in table.held() {
            g.pool.decref(b);
        }
        Ok(table)
    }

    /// Applies the operations of one scheduler step in order, appending what they return to `out`
    /// (one call per engine step instead of one per operation). Stops at the first refused
    /// operation and returns its index and error; the operations before it stay applied.
    pub fn apply_step(
        &self,
        ops: &[StepOp<'_>],
        out: &mut StepOutput,
    ) -> Result<(), (usize, BlockError)> {
        for (i, op) in ops.iter().enumerate() {
            let r = match *op {
                StepOp::Add { id, prompt } => {
                    self.add_sequence(id, prompt).map(|s| out.slots.extend(s))
                }
                StepOp::Append { id, tokens } => {
                    self.append(id, tokens).map(|s| out.slots.extend(s))
                }
                StepOp::Compact(id) => self.compact(id).map(|b| {
                    out.released_counts.push(b.len() as u32);
                    out.released.extend(b);
                }),
                StepOp::Free(id) => self.free(id),
                StepOp::Preempt(id) => self.preempt(id).map(|t| {
                    out.preempted_counts.push(t.len() as u32);
                    out.preempted.extend(t);
                }),
            };
            r.map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Hands out the pending block copies (from copy-on-write) and drops the references that kept
    /// their sources allocated: perform them before the next call that allocates blocks.
    pub fn take_copies(&self) -> Vec<BlockCopy> {
        let mut g = self.inner.lock();
        let copies = std::mem::take(&mut g.copies);
        for c in &copies {
            g.pool.decref(c.src);
        }
        copies
    }

    /// Tokens in sequence `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize, BlockError> {
        self.with_seq(id, |s| s.tokens.len())
    }

    /// Block-aligned start of the live window of sequence `id`.
    pub fn live_start(&self, id: SeqId) -> Result<usize, BlockError> {
        self.with_seq(id, |s| s.window.live_start)
    }

    /// Protected prefix of sequence `id` (block-aligned prompt in protect mode, else 0).
    pub fn protected_len(&self, id: SeqId) -> Result<usize, BlockError> {
        self.with_seq(id, |s| s.window.protected_len)
    }

    /// KV entries attention reads per (layer, head): `[0, protected) ∪ [max(live_start, protected), len)`.
    pub fn live_tokens(&self, id: SeqId) -> Result<usize, BlockError> {
        self.with_seq(id, |s| s.window.live_tokens())
    }

    /// Blocks sequence `id` references now.
    pub fn blocks_held(&self, id: SeqId) -> Result<usize, BlockError> {
        self.with_seq(id, |s| s.held().count())
    }

    fn with_seq<T>(&self, id: SeqId, f: impl FnOnce(&BlockTable) -> T) -> Result<T, BlockError> {
        let g = self.inner.lock();
        g.seqs
            .get(&id)
            .map(f)
            .ok_or(BlockError::UnknownSequence(id))
    }

    /// Block tables, live starts, lengths and protected prefixes of `ids`, one row each, as flat
    /// arrays ready to copy to a device.
    pub fn block_tables(&self, ids: &[SeqId]) -> Result<FlatBlockTables, BlockError> {
        let g = self.inner.lock();
        let rows = ids
            .iter()
            .map(|id| g.seqs.get(id).ok_or(BlockError::UnknownSequence(*id)))
            .collect::<Result<Vec<_>, _>>()?;
        let width = rows.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
        let mut out = FlatBlockTables {
            width,
            table: vec![-1; rows.len() * width],
            live_starts: Vec::with_capacity(rows.len()),
            lens: Vec::with_capacity(rows.len()),
            protected_lens: Vec::with_capacity(rows.len()),
        };
        for (r, s) in rows.iter().enumerate() {
            for (c, b) in s.blocks.iter().enumerate() {
                if let Some(b) = b {
                    out.table[r * width + c] = *b as i32;
                }
            }
            out.live_starts.push(s.window.live_start as i32);
            out.lens.push(s.tokens.len() as i32);
            out.protected_lens.push(s.window.protected_len as i32);
        }
        Ok(out)
    }

    /// A consistent copy of the whole state (for invariant checks; O(pool + tables)).
    pub fn snapshot(&self) -> ManagerSnapshot {
        let g = self.inner.lock();
        let n = g.pool.num_blocks();
        ManagerSnapshot {
            refcounts: (0..n as BlockId).map(|b| g.pool.refcount(b)).collect(),
            free_queue: g.pool.free_queue(),
            cached: g.pool.cached_blocks(),
            pending_copies: g.copies.clone(),
            sequences: g.seqs.iter().map(|(id, t)| (*id, t.clone())).collect(),
        }
    }
}
