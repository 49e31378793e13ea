//! `BlockPool`: a fixed set of blocks with reference counts, an O(1) free queue, and the content-hash
//! index of cached blocks (automatic prefix caching).
//!
//! A block is free exactly when its reference count is 0, and then it sits in the free queue (a
//! doubly linked list over arrays, so removal from the middle is O(1)). A freed block keeps its
//! content hash while it waits in the queue: a prefix-cache hit revives it, and allocation (from
//! the head, the least recently freed) drops the hash before handing the block out.

use std::collections::HashMap;

use super::{BlockError, BlockId};

const NIL: u32 = u32::MAX;

/// Fixed pool of KV-cache blocks with reference counts and a prefix-cache index.
#[derive(Debug)]
pub struct BlockPool {
    refcount: Vec<u32>,
    hash: Vec<Option<u64>>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<u64, BlockId>,
}

impl BlockPool {
    /// Host bytes of bookkeeping per block (reference count, hash, free-queue links).
    pub const BYTES_PER_BLOCK: usize =
        std::mem::size_of::<u32>() * 3 + std::mem::size_of::<Option<u64>>();

    /// A pool of `num_blocks` free blocks (`num_blocks < u32::MAX`, checked by the config); a typed
    /// error if the host cannot hold its bookkeeping.
    pub fn new(num_blocks: usize) -> Result<Self, BlockError> {
        let oom = || BlockError::OutOfHostMemory {
            blocks: num_blocks,
            bytes: num_blocks.saturating_mul(Self::BYTES_PER_BLOCK),
        };
        fn filled<T: Clone>(n: usize, f: impl Fn(usize) -> T) -> Option<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).ok()?;
            v.extend((0..n).map(f));
            Some(v)
        }
        let n = u32::try_from(num_blocks).map_err(|_| oom())?;
        let refcount = filled(num_blocks, |_| 0u32).ok_or_else(oom)?;
        let hash = filled(num_blocks, |_| None).ok_or_else(oom)?;
        let prev =
            filled(num_blocks, |i| if i == 0 { NIL } else { i as u32 - 1 }).ok_or_else(oom)?;
        let next = filled(num_blocks, |i| {
            if i as u32 + 1 == n {
                NIL
            } else {
                i as u32 + 1
            }
        })
        .ok_or_else(oom)?;
        Ok(Self {
            refcount,
            hash,
            prev,
            next,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            num_free: num_blocks,
            cached: HashMap::new(),
        })
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Free blocks (including cached blocks nobody references).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Reference count of `block` (0 = free).
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcount[block as usize]
    }

    /// Takes the least recently freed block (dropping its cached hash), with reference count 1.
    pub fn allocate(&mut self) -> Result<BlockId, BlockError> {
        let b = self.head;
        if b == NIL {
            return Err(BlockError::OutOfBlocks { needed: 1, free: 0 });
        }
        self.unlink(b);
        self.unregister(b);
        self.refcount[b as usize] = 1;
        Ok(b)
    }

    /// Adds a reference to `block`, reviving it from the free queue if it was free (cache hit).
    pub fn incref(&mut self, block: BlockId) {
        if self.refcount[block as usize] == 0 {
            self.unlink(block);
        }
        self.refcount[block as usize] += 1;
    }

    /// Drops a reference; returns true if the block became free (it keeps its cached hash).
    pub fn decref(&mut self, block: BlockId) -> bool {
        let rc = &mut self.refcount[block as usize];
        debug_assert!(*rc > 0, "decref of free block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.push_tail(block);
            true
        } else {
            false
        }
    }

    /// Cached block holding content `hash`, if any.
    pub fn lookup(&self, hash: u64) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Caches `block` under `hash` unless another block already holds that content.
    pub fn register(&mut self, block: BlockId, hash: u64) {
        if self.hash[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hash[block as usize] = Some(hash);
        }
    }

    /// Removes `block` from the prefix-cache index (before its content is overwritten).
    pub fn unregister(&mut self, block: BlockId) {
        if let Some(h) = self.hash[block as usize].take() {
            self.cached.remove(&h);
        }
    }

    /// Free blocks in allocation order (head first); for tests and diagnostics.
    pub fn free_queue(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut b = self.head;
        while b != NIL {
            out.push(b);
            b = self.next[b as usize];
        }
        out
    }

    /// (hash, block) pairs of the prefix-cache index; for tests and diagnostics.
    pub fn cached_blocks(&self) -> Vec<(u64, BlockId)> {
        self.cached.iter().map(|(h, b)| (*h, *b)).collect()
    }

    fn unlink(&mut self, b: BlockId) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, b: BlockId) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_exhausted_then_free_and_revive() {
        let mut p = BlockPool::new(3).unwrap();
        let a: Vec<_> = (0..3).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(
            p.allocate(),
            Err(BlockError::OutOfBlocks { needed: 1, free: 0 })
        );
        p.register(a[1], 7);
        assert!(p.decref(a[1]));
        assert_eq!(p.num_free(), 1);
        assert_eq!(p.lookup(7), Some(a[1]));
        p.incref(a[1]);
        assert_eq!((p.num_free(), p.refcount(a[1])), (0, 1));
        assert!(p.decref(a[1]));
        assert_eq!(p.allocate().unwrap(), a[1]);
        assert_eq!(p.lookup(7), None);
    }
}
