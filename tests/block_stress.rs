//! Multi-threaded stress tests of the block manager: worker threads drive their own sequences
//! through every operation while a checker thread verifies snapshots, and every worker reads back
//! the KV content its sequences attend to from a shared simulated cache memory.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use foresightkv::block::{
    BlockError, BlockId, CacheConfig, EvictionConfig, KvCacheManager, ManagerSnapshot, SeqId,
};
use parking_lot::Mutex;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const THREADS: u64 = 4;
const OPS: usize = 10000;
const BS: usize = 4;

/// Pool invariants on one consistent snapshot: refcount = table holders + pending copy sources,
/// free exactly when unreferenced, live windows block aligned with emptied entries before them.
fn check_snapshot(s: &ManagerSnapshot, bs: usize) -> Result<(), String> {
    let mut holders = vec![0u32; s.refcounts.len()];
    for (id, t) in &s.sequences {
        if t.window.live_start % bs != 0 || t.blocks.len() != t.tokens.len().div_ceil(bs) {
            return Err(format!(
                "seq {id}: bad window {} / {} blocks",
                t.window.live_start,
                t.blocks.len()
            ));
        }
        for b in t.held() {
            holders[b as usize] += 1;
        }
    }
    for c in &s.pending_copies {
        holders[c.src as usize] += 1;
    }
    let free: HashSet<BlockId> = s.free_queue.iter().copied().collect();
    if free.len() != s.free_queue.len() {
        return Err("duplicate in free queue".into());
    }
    for (b, (&rc, &h)) in s.refcounts.iter().zip(&holders).enumerate() {
        if rc != h || free.contains(&(b as BlockId)) != (rc == 0) {
            return Err(format!(
                "block {b}: refcount {rc}, holders {h}, free {}",
                free.contains(&(b as BlockId))
            ));
        }
    }
    Ok(())
}

struct Shared {
    m: KvCacheManager,
    mem: Vec<AtomicU32>,
    /// Serialises "write-producing operation + its block copies + its writes", like one engine step.
    step: Mutex<()>,
}

impl Shared {
    fn write(&self, slots: &[i64], vals: &[u32]) {
        for (&s, &v) in slots.iter().zip(vals) {
            if s >= 0 {
                self.mem[s as usize].store(v, Ordering::Relaxed);
            }
        }
    }

    fn apply_copies(&self) {
        for c in self.m.take_copies() {
            for off in 0..BS {
                let v = self.mem[c.src as usize * BS + off].load(Ordering::Relaxed);
                self.mem[c.dst as usize * BS + off].store(v, Ordering::Relaxed);
            }
        }
    }

    /// Every attended position of `id` reads back its expected content.
    fn verify(&self, id: SeqId, content: &[u32]) {
        let t = self.m.block_tables(&[id]).unwrap();
        let (len, live, prot) = (
            t.lens[0] as usize,
            t.live_starts[0] as usize,
            t.protected_lens[0] as usize,
        );
        assert_eq!(len, content.len(), "seq {id} length");
        for pos in (0..prot.min(len)).chain(live.max(prot)..len) {
            let b = t.table[pos / BS];
            assert!(b >= 0, "seq {id} pos {pos} in the window has no block");
            let got = self.mem[b as usize * BS + pos % BS].load(Ordering::Relaxed);
            assert_eq!(got, content[pos], "seq {id} pos {pos} block {b}");
        }
    }
}

fn worker(sh: &Shared, tid: u64, seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ tid);
    let mut seqs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut next_id = tid << 32;
    let mut next_tok = (tid as u32 + 1) << 26;
    let mut done = 0;
    for _ in 0..OPS {
        let ids: Vec<SeqId> = seqs.keys().copied().collect();
        let pick = (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())]);
        match (rng.random_range(0..10u32), pick) {
            (0..=1, _) | (_, None) if seqs.len() < 6 => {
                let family = tid as u32 * 8 + rng.random_range(0..3u32);
                let shared = rng.random_range(0..24usize);
                let prompt: Vec<u32> = (0..rng.random_range(1..40usize))
                    .map(|i| {
                        if i < shared {
                            family * 1000 + i as u32
                        } else {
                            next_tok += 1;
                            next_tok
                        }
                    })
                    .collect();
                next_id += 1;
                if let Ok(slots) = sh.m.add_sequence(next_id, &prompt) {
                    sh.write(&slots, &prompt);
                    seqs.insert(next_id, prompt);
                }
            }
            (2..=6, Some(id)) => {
                let _step = sh.step.lock();
                if sh.m.eviction_due(id).unwrap().is_some() {
                    let len = seqs[&id].len();
                    match sh.m.compact(id) {
                        Ok(_) => {
                            sh.apply_copies();
                            let after = sh.m.live_start(id).unwrap();
                            let interval = sh.m.config().eviction.as_ref().unwrap().interval;
                            let t = sh.m.block_tables(&[id]).unwrap();
                            let content = seqs.get_mut(&id).unwrap();
                            let end = len.saturating_sub(interval).max(after);
                            for (pos, c) in content.iter_mut().enumerate().take(end).skip(after) {
                                *c ^= 1 << 25;
                                let s = t.table[pos / BS] as i64 * BS as i64 + (pos % BS) as i64;
                                sh.write(&[s], &[*c]);
                            }
                        }
                        Err(BlockError::OutOfBlocks { .. }) => {}
                        Err(e) => panic!("compact: {e}"),
                    }
                } else {
                    let toks: Vec<u32> = (0..rng.random_range(1..3usize))
                        .map(|_| {
                            next_tok += 1;
                            next_tok
                        })
                        .collect();
                    match sh.m.append(id, &toks) {
                        Ok(slots) => {
                            sh.apply_copies();
                            sh.write(&slots, &toks);
                            seqs.get_mut(&id).unwrap().extend_from_slice(&toks);
                        }
                        Err(BlockError::OutOfBlocks { .. }) => {
                            sh.m.free(id).unwrap();
                            seqs.remove(&id);
                        }
                        Err(e) => panic!("append: {e}"),
                    }
                }
            }
            (7, Some(id)) if seqs.len() < 6 => {
                next_id += 1;
                sh.m.fork(id, next_id).unwrap();
                let c = seqs[&id].clone();
                seqs.insert(next_id, c);
            }
            (8, Some(id)) => {
                if rng.random_bool(0.5) {
                    sh.m.free(id).unwrap();
                } else {
                    let tokens = sh.m.preempt(id).unwrap();
                    assert_eq!(tokens.len(), seqs[&id].len());
                }
                seqs.remove(&id);
            }
            (_, Some(id)) => sh.verify(id, &seqs[&id]),
            _ => {}
        }
        done += 1;
    }
    for (id, content) in &seqs {
        sh.verify(*id, content);
        sh.m.free(*id).unwrap();
    }
    done
}

fn run(config: CacheConfig, seed: u64) {
    let bs = config.block_size;
    let n = config.num_blocks;
    let sh = Arc::new(Shared {
        m: KvCacheManager::new(config).unwrap(),
        mem: (0..n * bs).map(|_| AtomicU32::new(u32::MAX)).collect(),
        step: Mutex::new(()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    // The workers start only once the checker is running, so on a loaded machine the checker still
    // overlaps them (otherwise it may not be scheduled before the workers finish).
    let checker_running = Arc::new(AtomicBool::new(false));
    let checker = {
        let (sh, stop, running) = (sh.clone(), stop.clone(), checker_running.clone());
        std::thread::spawn(move || {
            let mut checks = 0;
            while !stop.load(Ordering::Relaxed) {
                check_snapshot(&sh.m.snapshot(), bs).unwrap();
                checks += 1;
                running.store(true, Ordering::Release);
                std::thread::yield_now();
            }
            checks
        })
    };
    while !checker_running.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let sh = sh.clone();
            std::thread::spawn(move || worker(&sh, t, seed))
        })
        .collect();
    let ops: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    let checks = checker.join().unwrap();
    sh.apply_copies();
    check_snapshot(&sh.m.snapshot(), bs).unwrap();
    assert_eq!(ops, THREADS as usize * OPS);
    assert!(checks > 0);
    assert_eq!(sh.m.num_sequences(), 0);
    assert_eq!(
        sh.m.num_free_blocks(),
        n,
        "freeing everything refills the pool"
    );
}

fn config(eviction: Option<EvictionConfig>) -> CacheConfig {
    CacheConfig {
        block_size: BS,
        num_blocks: 160,
        enable_prefix_caching: true,
        eviction,
    }
}

#[test]
fn concurrent_full_cache() {
    run(config(None), 1);
}

#[test]
fn concurrent_eviction() {
    run(
        config(Some(EvictionConfig {
            budget: 16,
            interval: 8,
            protect_prompt: false,
        })),
        2,
    );
}

#[test]
fn concurrent_protected_prompt() {
    run(
        config(Some(EvictionConfig {
            budget: 8,
            interval: 8,
            protect_prompt: true,
        })),
        3,
    );
}

/// Unserialised hammering, cross-thread prefix sharing included: the pool stays consistent and
/// refills completely once every sequence is gone.
#[test]
fn concurrent_unserialised_operations_keep_the_pool_consistent() {
    let m = Arc::new(
        KvCacheManager::new(CacheConfig {
            block_size: 2,
            num_blocks: 64,
            enable_prefix_caching: true,
            eviction: Some(EvictionConfig {
                budget: 8,
                interval: 4,
                protect_prompt: false,
            }),
        })
        .unwrap(),
    );
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(40 + t);
                let mut mine: Vec<SeqId> = Vec::new();
                for i in 0..OPS as u64 {
                    let id = (t << 32) | i;
                    match rng.random_range(0..6u32) {
                        0 => {
                            let prompt: Vec<u32> = (0..rng.random_range(1..20u32)).collect();
                            if m.add_sequence(id, &prompt).is_ok() {
                                mine.push(id);
                            }
                        }
                        1 if !mine.is_empty() => {
                            let p = mine[rng.random_range(0..mine.len())];
                            m.fork(p, id).unwrap();
                            mine.push(id);
                        }
                        2 if !mine.is_empty() => {
                            let k = rng.random_range(0..mine.len());
                            m.free(mine.swap_remove(k)).unwrap();
                        }
                        3 => {
                            m.take_copies();
                        }
                        _ if !mine.is_empty() => {
                            let s = mine[rng.random_range(0..mine.len())];
                            if m.eviction_due(s).unwrap().is_some() {
                                match m.compact(s) {
                                    Ok(_) | Err(BlockError::OutOfBlocks { .. }) => {}
                                    Err(e) => panic!("compact of due sequence {s} failed: {e}"),
                                }
                            } else if m.append(s, &[7]).is_err() {
                                let k = mine.iter().position(|x| *x == s).unwrap();
                                m.free(mine.swap_remove(k)).unwrap();
                            }
                        }
                        _ => {}
                    }
                    if i % 64 == 0 {
                        check_snapshot(&m.snapshot(), 2).unwrap();
                    }
                }
                for s in mine {
                    m.free(s).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    m.take_copies();
    check_snapshot(&m.snapshot(), 2).unwrap();
    assert_eq!(m.num_free_blocks(), 64);
}
