//! Throughput of the block manager: allocate/free, prefix hits, decode appends, fork, compact,
//! and the Azure LLM trace's request sequence replayed through it (operations per second).
//!
//! Traces are read from `data/traces/azure_llm_2023_{conv,code}.csv` under the crate root.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use foresightkv::block::{BlockError, CacheConfig, EvictionConfig, KvCacheManager, SeqId};

const BS: usize = 16;

fn manager(num_blocks: usize, caching: bool, eviction: Option<EvictionConfig>) -> KvCacheManager {
    KvCacheManager::new(CacheConfig {
        block_size: BS,
        num_blocks,
        enable_prefix_caching: caching,
        eviction,
    })
    .expect("valid bench config")
}

fn evict(budget: usize, interval: usize) -> Option<EvictionConfig> {
    Some(EvictionConfig {
        budget,
        interval,
        protect_prompt: false,
    })
}

fn micro(c: &mut Criterion) {
    let prompt: Vec<u32> = (0..512).collect();
    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Elements(1));
    g.bench_function("add_free_512_tokens", |b| {
        let m = manager(4096, false, None);
        b.iter(|| {
            m.add_sequence(1, black_box(&prompt)).unwrap();
            m.free(1).unwrap();
        })
    });
    g.bench_function("add_free_512_tokens_prefix_hit", |b| {
        let m = manager(4096, true, None);
        m.add_sequence(0, &prompt).unwrap();
        b.iter(|| {
            m.add_sequence(1, black_box(&prompt)).unwrap();
            m.free(1).unwrap();
        })
    });
    g.bench_function("fork_free_1024_tokens", |b| {
        let m = manager(4096, false, None);
        m.add_sequence(0, &(0..1024).collect::<Vec<u32>>()).unwrap();
        b.iter(|| {
            m.fork(0, 1).unwrap();
            m.free(1).unwrap();
        })
    });
    let (seqs, steps) = (64u64, 256usize);
    g.throughput(Throughput::Elements(seqs * steps as u64));
    g.bench_function("append_decode_64x256", |b| {
        b.iter_batched(
            || {
                let m = manager(8192, true, None);
                for s in 0..seqs {
                    m.add_sequence(s, &[s as u32; 100]).unwrap();
                }
                m
            },
            |m| {
                for step in 0..steps {
                    for s in 0..seqs {
                        m.append(s, &[step as u32]).unwrap();
                    }
                }
                m
            },
            BatchSize::LargeInput,
        )
    });
    g.throughput(Throughput::Elements(seqs));
    g.bench_function("compact_64_due_b512_l128", |b| {
        b.iter_batched(
            || {
                let m = manager(8192, true, evict(512, 128));
                for s in 0..seqs {
                    m.add_sequence(s, &vec![s as u32 + 1; 640]).unwrap();
                    m.compact(s).unwrap();
                    m.append(s, &[0; 128]).unwrap();
                }
                m
            },
            |m| {
                for s in 0..seqs {
                    black_box(m.compact(s).unwrap());
                }
                m
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// One trace request: prompt and output lengths, in arrival order.
struct Request {
    prompt: usize,
    output: usize,
}

fn load_trace(name: &str, limit: usize) -> Vec<Request> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/traces")
        .join(format!("azure_llm_2023_{name}.csv"));
    let mut rdr =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    rdr.records()
        .take(limit)
        .map(|r| {
            let r = r.expect("trace row");
            Request {
                prompt: r[1].parse().expect("ContextTokens"),
                output: r[2].parse().expect("GeneratedTokens"),
            }
        })
        .collect()
}

/// Replays the requests through the manager as a continuous-batching loop (admission by
/// `max_blocks_held`, one decode token per running sequence per step, compaction when due, free on
/// completion); returns the number of manager calls made (add, eviction_due, compact, append, free).
fn replay(reqs: &[Request], m: &KvCacheManager, max_seqs: usize) -> u64 {
    let mut ops = 0u64;
    let mut next = 0usize;
    let mut reserved = 0usize;
    let mut running: Vec<(SeqId, usize, usize)> = Vec::new();
    let mut prompt = Vec::new();
    while next < reqs.len() || !running.is_empty() {
        while next < reqs.len() && running.len() < max_seqs {
            let r = &reqs[next];
            let need = m.max_blocks_held(r.prompt, r.prompt + r.output);
            if reserved + need > m.num_blocks() {
                break;
            }
            prompt.clear();
            prompt.extend((0..r.prompt as u32).map(|p| p ^ ((next as u32) << 16)));
            m.add_sequence(next as SeqId, &prompt).unwrap();
            ops += 1;
            reserved += need;
            running.push((next as SeqId, r.output, need));
            next += 1;
        }
        running.retain_mut(|(id, left, need)| {
            while m.eviction_due(*id).unwrap().is_some() {
                m.compact(*id).unwrap();
                ops += 2;
            }
            // The eviction_due check above, then one append or free.
            ops += 2;
            if *left == 0 {
                m.free(*id).unwrap();
                reserved -= *need;
                return false;
            }
            match m.append(*id, &[*left as u32]) {
                Ok(_) => *left -= 1,
                Err(e @ BlockError::OutOfBlocks { .. }) => panic!("admission let in too much: {e}"),
                Err(e) => panic!("{e}"),
            }
            true
        });
    }
    ops
}

fn trace(c: &mut Criterion) {
    let mut g = c.benchmark_group("azure_trace_replay");
    g.sample_size(10);
    for name in ["conv", "code"] {
        let reqs = load_trace(name, 2000);
        for (label, ev) in [("full", None), ("evict_b1024_l128", evict(1024, 128))] {
            let cfg = || manager(16384, true, ev.clone());
            let ops = replay(&reqs, &cfg(), 256);
            g.throughput(Throughput::Elements(ops));
            g.bench_function(format!("{name}_{label}_2000req_{ops}ops"), |b| {
                b.iter_batched(
                    cfg,
                    |m| black_box(replay(&reqs, &m, 256)),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // No plots: the plotters backend needs system fonts that CI machines often lack.
    config = Criterion::default().without_plots();
    targets = micro, trace
}
criterion_main!(benches);
