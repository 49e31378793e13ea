//! Property tests of the block manager over random operation sequences (add, append, fork, write,
//! compact, preempt, free) with prefix caching on and off and eviction off / on / prompt-protecting.
//!
//! A shadow model keeps the KV "content" every slot should hold: writes go to the slots the manager
//! returns, block copies are applied when handed out, compaction marks the entries it rewrites. After
//! every step all invariants are checked against the manager's snapshot, and every position a
//! sequence attends to must read back its own content (so collisions, missed copy-on-write, stale
//! prefix-cache entries and reads of released blocks all show up). Cases: FORESIGHTKV_PROPTEST_CASES.

mod common;

use std::collections::{HashMap, HashSet};

use foresightkv::block::{
    BlockError, BlockId, CacheConfig, EvictionConfig, KvCacheManager, ManagerSnapshot, SeqId,
};
use proptest::prelude::*;

const MAX_APPEND: usize = 4;
const SEQS: u64 = 5;

#[derive(Clone, Debug)]
enum Op {
    Add {
        seq: SeqId,
        family: u32,
        shared: usize,
        len: usize,
    },
    Append {
        seq: SeqId,
        n: usize,
        common: bool,
    },
    Fork {
        parent: SeqId,
        child: SeqId,
    },
    Compact {
        seq: SeqId,
    },
    Preempt {
        seq: SeqId,
    },
    Free {
        seq: SeqId,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let seq = 0..SEQS;
    prop_oneof![
        3 => (seq.clone(), 0..3u32, 0..24usize, 1..28usize)
            .prop_map(|(seq, family, shared, len)| Op::Add { seq, family, shared, len }),
        6 => (seq.clone(), 1..=MAX_APPEND, any::<bool>()).prop_map(|(seq, n, common)| Op::Append { seq, n, common }),
        2 => (seq.clone(), seq.clone()).prop_map(|(parent, child)| Op::Fork { parent, child }),
        3 => seq.clone().prop_map(|seq| Op::Compact { seq }),
        1 => seq.clone().prop_map(|seq| Op::Preempt { seq }),
        1 => seq.prop_map(|seq| Op::Free { seq }),
    ]
}

/// (eviction mode 0 = off, 1 = on, 2 = protect) x block size x B/L x caching x pool size.
fn config() -> impl Strategy<Value = CacheConfig> {
    (
        1..=4usize,
        0..3u8,
        1..=3usize,
        1..=3usize,
        any::<bool>(),
        3..48usize,
    )
        .prop_map(
            |(bs, mode, b_blocks, l_blocks, caching, num_blocks)| CacheConfig {
                block_size: bs,
                num_blocks,
                enable_prefix_caching: caching,
                eviction: (mode > 0).then(|| EvictionConfig {
                    budget: b_blocks.max(l_blocks) * bs,
                    interval: l_blocks.min(b_blocks) * bs,
                    protect_prompt: mode == 2,
                }),
            },
        )
}

#[derive(Clone, Debug)]
struct ModelSeq {
    tokens: Vec<u32>,
    content: Vec<u32>,
}

struct Harness {
    m: KvCacheManager,
    bs: usize,
    mem: HashMap<i64, u32>,
    seqs: HashMap<SeqId, ModelSeq>,
    next_unique: u32,
    next_mark: u32,
}

impl Harness {
    fn slot_of(&self, snap: &ManagerSnapshot, id: SeqId, pos: usize) -> Option<i64> {
        let t = &snap.sequences.iter().find(|(s, _)| *s == id)?.1;
        t.blocks
            .get(pos / self.bs)
            .copied()
            .flatten()
            .map(|b| (b as usize * self.bs + pos % self.bs) as i64)
    }

    /// Writes `content` to returned slots, checking each targets an exclusive, uncached block.
    /// Writes `content` to returned slots, checking each targets a block that is exclusive now and,
    /// unless freshly allocated by this call, was not in the prefix cache before it (`prior`).
    fn write(
        &mut self,
        snap: &ManagerSnapshot,
        prior: &ManagerSnapshot,
        slots: &[i64],
        content: &[u32],
    ) -> Result<(), TestCaseError> {
        let cached: HashSet<BlockId> = prior.cached.iter().map(|(_, b)| *b).collect();
        let mut seen = HashSet::new();
        for (&s, &c) in slots.iter().zip(content) {
            if s < 0 {
                continue;
            }
            prop_assert!(seen.insert(s), "slot {} returned twice in one call", s);
            let b = (s as usize / self.bs) as BlockId;
            prop_assert_eq!(
                snap.refcounts[b as usize],
                1,
                "write into shared block {}",
                b
            );
            let fresh = prior.refcounts[b as usize] == 0;
            prop_assert!(
                fresh || !cached.contains(&b),
                "write into cached block {}",
                b
            );
            self.mem.insert(s, c);
        }
        Ok(())
    }

    fn apply_copies(&mut self) {
        for c in self.m.take_copies() {
            for off in 0..self.bs {
                let src = (c.src as usize * self.bs + off) as i64;
                let dst = (c.dst as usize * self.bs + off) as i64;
                match self.mem.get(&src).copied() {
                    Some(v) => self.mem.insert(dst, v),
                    None => self.mem.remove(&dst),
                };
            }
        }
    }

    fn prompt(&mut self, family: u32, shared: usize, len: usize) -> Vec<u32> {
        (0..len)
            .map(|i| {
                if i < shared {
                    family * 1000 + i as u32
                } else {
                    self.next_unique += 1;
                    1_000_000 + self.next_unique
                }
            })
            .collect()
    }
}

/// Checks the pool and table invariants; with `content`, also that every attended position reads
/// back its own content (only meaningful once pending copies are applied).
fn check_invariants(h: &Harness, content: bool) -> Result<(), TestCaseError> {
    let snap = h.m.snapshot();
    let cfg = h.m.config();
    let bs = h.bs;
    let n = cfg.num_blocks;
    // Free or referenced, never both; the free queue holds each free block once.
    let free: HashSet<BlockId> = snap.free_queue.iter().copied().collect();
    prop_assert_eq!(
        free.len(),
        snap.free_queue.len(),
        "free queue has duplicates"
    );
    prop_assert_eq!(free.len(), h.m.num_free_blocks());
    let mut holders = vec![0u32; n];
    for (_, t) in &snap.sequences {
        for b in t.held() {
            holders[b as usize] += 1;
        }
    }
    for c in &snap.pending_copies {
        holders[c.src as usize] += 1;
    }
    for (b, &held) in holders.iter().enumerate() {
        prop_assert_eq!(
            snap.refcounts[b],
            held,
            "refcount of block {} != holders",
            b
        );
        prop_assert_eq!(
            free.contains(&(b as BlockId)),
            snap.refcounts[b] == 0,
            "block {} free xor referenced",
            b
        );
    }
    let cached: HashSet<BlockId> = snap.cached.iter().map(|(_, b)| *b).collect();
    prop_assert_eq!(h.seqs.len(), snap.sequences.len());
    for (id, t) in &snap.sequences {
        let model = &h.seqs[id];
        let len = t.tokens.len();
        prop_assert_eq!(&t.tokens, &model.tokens, "tokens of {}", id);
        prop_assert_eq!(t.blocks.len(), len.div_ceil(bs));
        prop_assert_eq!(t.window.len, len, "window length of {}", id);
        prop_assert_eq!(
            t.window.live_start % bs,
            0,
            "live_start of {} not block aligned",
            id
        );
        prop_assert_eq!(t.window.protected_len % bs, 0);
        let base = t.window.live_start.max(t.window.protected_len);
        let released = t.window.protected_len / bs
            ..(t.window.live_start / bs).max(t.window.protected_len / bs);
        for (i, b) in t.blocks.iter().enumerate() {
            prop_assert_eq!(
                b.is_none(),
                released.contains(&i),
                "seq {} block entry {}: {:?}",
                id,
                i,
                b
            );
        }
        // The partially filled last block is writable: never in the prefix cache.
        if len % bs != 0 {
            let last = t.blocks[len / bs].expect("window entry");
            prop_assert!(
                !cached.contains(&last),
                "writable block {} of seq {} is cached",
                last,
                id
            );
        }
        if let Some(ev) = &cfg.eviction {
            let live = len.saturating_sub(base);
            if !t.window.compress_pending {
                prop_assert!(
                    live < ev.budget + ev.interval + MAX_APPEND,
                    "seq {} window {} over budget",
                    id,
                    live
                );
            }
        }
        // Every attended position reads back its own content.
        for pos in (0..len.min(t.window.protected_len))
            .chain(base..len)
            .filter(|_| content)
        {
            let s = h
                .slot_of(&snap, *id, pos)
                .expect("attended position has a block");
            prop_assert_eq!(
                h.mem.get(&s).copied(),
                Some(model.content[pos]),
                "seq {} pos {} slot {}",
                id,
                pos,
                s
            );
        }
    }
    let flat =
        h.m.block_tables(&snap.sequences.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .unwrap();
    for (r, (_, t)) in snap.sequences.iter().enumerate() {
        prop_assert_eq!(flat.lens[r] as usize, t.tokens.len());
        prop_assert_eq!(flat.live_starts[r] as usize, t.window.live_start);
        for c in 0..flat.width {
            let want = t.blocks.get(c).copied().flatten().map_or(-1, |b| b as i32);
            prop_assert_eq!(flat.table[r * flat.width + c], want);
        }
    }
    Ok(())
}

fn step(h: &mut Harness, op: &Op) -> Result<(), TestCaseError> {
    let before = h.m.snapshot();
    let bs = h.bs;
    match op.clone() {
        Op::Add {
            seq,
            family,
            shared,
            len,
        } => {
            let prompt = h.prompt(family, shared, len);
            match h.m.add_sequence(seq, &prompt) {
                Ok(slots) => {
                    prop_assert!(!h.seqs.contains_key(&seq));
                    prop_assert_eq!(slots.len(), len);
                    let hits = slots.iter().take_while(|s| **s < 0).count();
                    prop_assert_eq!(hits % bs, 0);
                    prop_assert!(slots[hits..].iter().all(|s| *s >= 0) && hits < len);
                    h.seqs.insert(
                        seq,
                        ModelSeq {
                            tokens: prompt.clone(),
                            content: prompt.clone(),
                        },
                    );
                    let snap = h.m.snapshot();
                    h.write(&snap, &before, &slots, &prompt)?;
                }
                Err(BlockError::DuplicateSequence(s)) => {
                    prop_assert!(s == seq && h.seqs.contains_key(&seq))
                }
                Err(BlockError::OutOfBlocks { needed, free }) => {
                    prop_assert!(needed > free && !h.seqs.contains_key(&seq));
                    prop_assert_eq!(
                        &h.m.snapshot().refcounts,
                        &before.refcounts,
                        "failed add changed the pool"
                    );
                }
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }
        Op::Append { seq, n, common } => {
            let Some(model) = h.seqs.get(&seq).cloned() else {
                prop_assert_eq!(h.m.append(seq, &[1]), Err(BlockError::UnknownSequence(seq)));
                return Ok(());
            };
            let due = h.m.eviction_due(seq).unwrap();
            let start = model.tokens.len();
            let toks: Vec<u32> = (0..n)
                .map(|i| {
                    h.next_unique += 1;
                    if common {
                        2_000_000 + (start + i) as u32
                    } else {
                        3_000_000 + h.next_unique
                    }
                })
                .collect();
            match h.m.append(seq, &toks) {
                Ok(slots) => {
                    prop_assert!(due.is_none(), "append accepted while eviction due");
                    prop_assert_eq!(slots.len(), n);
                    h.apply_copies();
                    let snap = h.m.snapshot();
                    h.write(&snap, &before, &slots, &toks)?;
                    let m = h.seqs.get_mut(&seq).unwrap();
                    m.tokens.extend_from_slice(&toks);
                    m.content.extend_from_slice(&toks);
                }
                Err(BlockError::EvictionDue(s)) => prop_assert!(s == seq && due.is_some()),
                Err(BlockError::OutOfBlocks { needed, free }) => {
                    prop_assert!(needed > free);
                    prop_assert_eq!(
                        &h.m.snapshot().refcounts,
                        &before.refcounts,
                        "failed append changed the pool"
                    );
                }
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }
        Op::Fork { parent, child } => match h.m.fork(parent, child) {
            Ok(()) => {
                prop_assert!(h.seqs.contains_key(&parent) && !h.seqs.contains_key(&child));
                let m = h.seqs[&parent].clone();
                h.seqs.insert(child, m);
            }
            Err(BlockError::DuplicateSequence(c)) => {
                prop_assert!(c == child && h.seqs.contains_key(&child))
            }
            Err(BlockError::UnknownSequence(p)) => {
                prop_assert!(p == parent && !h.seqs.contains_key(&parent))
            }
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        },
        Op::Compact { seq } => {
            if !h.seqs.contains_key(&seq) {
                prop_assert_eq!(h.m.compact(seq), Err(BlockError::UnknownSequence(seq)));
                return Ok(());
            }
            let plan = h.m.eviction_due(seq).unwrap();
            let t = before
                .sequences
                .iter()
                .find(|(s, _)| *s == seq)
                .unwrap()
                .1
                .clone();
            match (h.m.compact(seq), plan) {
                (Ok(released), Some(plan)) => {
                    let ev = h.m.config().eviction.clone().unwrap();
                    let base = t.window.live_start.max(t.window.protected_len);
                    let expect: Vec<BlockId> = t.blocks[base / bs..plan.live_start_after / bs]
                        .iter()
                        .flatten()
                        .copied()
                        .collect();
                    prop_assert_eq!(&released, &expect);
                    prop_assert_eq!(released.len(), plan.released_blocks);
                    let after = h.m.live_start(seq).unwrap();
                    prop_assert_eq!(after, plan.live_start_after);
                    let len = t.tokens.len();
                    let live = len - after;
                    prop_assert!(
                        live >= ev.budget && live < ev.budget + bs,
                        "live {} after eviction",
                        live
                    );
                    let base = t.window.live_start.max(t.window.protected_len);
                    if len - base == ev.budget + ev.interval {
                        prop_assert_eq!(live, ev.budget, "regular eviction leaves exactly B");
                    }
                    prop_assert_eq!(h.m.eviction_due(seq).unwrap(), None);
                    h.apply_copies();
                    // The compaction kernel rewrites [after, len - L): mark that content.
                    let snap = h.m.snapshot();
                    let end = len.saturating_sub(ev.interval).max(after);
                    h.next_mark += 1;
                    let mark = h.next_mark << 24;
                    let mut slots = Vec::new();
                    let mut vals = Vec::new();
                    for pos in after..end {
                        slots.push(h.slot_of(&snap, seq, pos).unwrap());
                        vals.push(h.seqs[&seq].content[pos] ^ mark);
                    }
                    h.write(&snap, &snap, &slots, &vals)?;
                    let m = h.seqs.get_mut(&seq).unwrap();
                    m.content[after..end].copy_from_slice(&vals);
                }
                (Err(BlockError::NoEvictionDue(s)), None) => prop_assert_eq!(s, seq),
                (Err(BlockError::OutOfBlocks { .. }), Some(_)) => {
                    prop_assert_eq!(
                        &h.m.snapshot().refcounts,
                        &before.refcounts,
                        "failed compact changed the pool"
                    );
                }
                (r, p) => prop_assert!(false, "compact {:?} with plan {:?}", r, p),
            }
        }
        Op::Preempt { seq } => match h.m.preempt(seq) {
            Ok(tokens) => {
                let m = h.seqs.remove(&seq).unwrap();
                prop_assert_eq!(tokens, m.tokens);
            }
            Err(e) => {
                prop_assert!(e == BlockError::UnknownSequence(seq) && !h.seqs.contains_key(&seq))
            }
        },
        Op::Free { seq } => match h.m.free(seq) {
            Ok(()) => prop_assert!(h.seqs.remove(&seq).is_some()),
            Err(e) => {
                prop_assert!(e == BlockError::UnknownSequence(seq) && !h.seqs.contains_key(&seq))
            }
        },
    }
    check_invariants(h, false)?;
    h.apply_copies();
    check_invariants(h, true)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(3000), ..ProptestConfig::default() })]

    /// Random operation sequences keep every invariant, and freeing everything refills the pool.
    #[test]
    fn random_operations_keep_invariants(cfg in config(), ops in prop::collection::vec(op(), 1..60)) {
        let bs = cfg.block_size;
        let mut h = Harness {
            m: KvCacheManager::new(cfg).unwrap(),
            bs,
            mem: HashMap::new(),
            seqs: HashMap::new(),
            next_unique: 0,
            next_mark: 0,
        };
        for op in &ops {
            step(&mut h, op)?;
        }
        let ids: Vec<SeqId> = h.seqs.keys().copied().collect();
        for id in ids {
            h.m.free(id).unwrap();
            h.seqs.remove(&id);
        }
        h.apply_copies();
        check_invariants(&h, true)?;
        prop_assert_eq!(h.m.num_free_blocks(), h.m.num_blocks());
    }

    /// One sequence decoding token by token, compacting when due, peaks at exactly `max_blocks_held`.
    #[test]
    fn admission_bound_is_exact(
        bs in 1..=8usize, mode in 0..3u8, b_blocks in 1..=4usize, l_blocks in 1..=4usize,
        prompt_len in 1..80usize, extra in 0..120usize,
    ) {
        let mut cfg = CacheConfig {
            block_size: bs,
            num_blocks: 1,
            enable_prefix_caching: false,
            eviction: (mode > 0).then(|| EvictionConfig {
                budget: b_blocks.max(l_blocks) * bs,
                interval: l_blocks.min(b_blocks) * bs,
                protect_prompt: mode == 2,
            }),
        };
        let max_len = prompt_len + extra;
        // A pool of exactly the bound must be enough.
        let bound = KvCacheManager::new(cfg.clone()).unwrap().max_blocks_held(prompt_len, max_len);
        cfg.num_blocks = bound;
        let m = KvCacheManager::new(cfg).unwrap();
        let prompt: Vec<u32> = (0..prompt_len as u32).collect();
        m.add_sequence(1, &prompt).unwrap();
        let mut peak = m.blocks_held(1).unwrap();
        loop {
            if m.eviction_due(1).unwrap().is_some() {
                m.compact(1).unwrap();
            }
            if m.seq_len(1).unwrap() == max_len {
                break;
            }
            m.append(1, &[7]).unwrap();
            peak = peak.max(m.blocks_held(1).unwrap());
            prop_assert_eq!(m.blocks_held(1).unwrap() + m.num_free_blocks(), bound);
        }
        prop_assert_eq!(peak, bound);
    }
}

#[test]
fn bad_config_and_bad_input_are_typed_errors() {
    let bad = CacheConfig {
        block_size: 16,
        num_blocks: 8,
        enable_prefix_caching: false,
        eviction: Some(EvictionConfig {
            budget: 40,
            interval: 16,
            protect_prompt: false,
        }),
    };
    assert!(matches!(
        KvCacheManager::new(bad),
        Err(BlockError::InvalidConfig(_))
    ));
    let m = KvCacheManager::new(CacheConfig {
        block_size: 4,
        num_blocks: 2,
        enable_prefix_caching: true,
        eviction: None,
    })
    .unwrap();
    assert_eq!(m.add_sequence(1, &[]), Err(BlockError::EmptyPrompt(1)));
    assert_eq!(
        m.add_sequence(1, &[1; 9]),
        Err(BlockError::OutOfBlocks { needed: 3, free: 2 })
    );
    assert_eq!(m.compact(1), Err(BlockError::UnknownSequence(1)));
    m.add_sequence(1, &[1; 3]).unwrap();
    assert_eq!(m.compact(1), Err(BlockError::NoEvictionDue(1)));
    assert!(matches!(
        m.block_tables(&[3]),
        Err(BlockError::UnknownSequence(3))
    ));
}

#[test]
fn prefix_hit_reuses_blocks_and_fork_copies_on_write() {
    let m = KvCacheManager::new(CacheConfig {
        block_size: 4,
        num_blocks: 16,
        enable_prefix_caching: true,
        eviction: None,
    })
    .unwrap();
    let prompt: Vec<u32> = (0..10).collect();
    m.add_sequence(1, &prompt).unwrap();
    m.free(1).unwrap();
    let slots = m.add_sequence(2, &prompt).unwrap();
    assert_eq!(
        slots.iter().filter(|s| **s < 0).count(),
        8,
        "two full cached blocks reused after free"
    );
    m.fork(2, 3).unwrap();
    let before = m.block_tables(&[2, 3]).unwrap();
    m.append(3, &[99]).unwrap();
    let copies = m.take_copies();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].src as i32, before.table[2]);
    let after = m.block_tables(&[2, 3]).unwrap();
    assert_eq!(after.table[before.width + 2], copies[0].dst as i32);
    assert_eq!(after.table[2], before.table[2]);
}
