//! The CPU kernels' argument validation: fuzzer-chosen layouts (sizes, strides, slot mappings, block
//! tables, survivor lists, buffer lengths) must be refused with a typed error or run without a
//! panic, an out-of-bounds index or an overflow (this runs under AddressSanitizer), the contract
//! the bindings rely on when they hand tensor memory to these kernels.
#![no_main]
use foresightkv::kernels::{self, CacheWriteLayout, KvCacheMut, LiveWindows, PagedKvLayout};
use libfuzzer_sys::fuzz_target;

/// Reads small integers from the fuzz input (zero when it runs out).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    /// A size in [-2, 62] or, rarely, a huge value (overflow probes).
    fn dim(&mut self) -> i64 {
        match self.u8() {
            255 => i64::MAX / 3,
            254 => -1,
            b => (b % 64) as i64 - 2,
        }
    }
    fn len(&mut self) -> usize {
        (self.u8() as usize) << 4 | (self.u8() as usize & 15)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let which = b.u8() % 3;
    let (tokens, heads, d, bs, nb) = (b.dim(), b.dim(), b.dim(), b.dim(), b.dim());
    let mut strides3 = || [b.dim(), b.dim(), b.dim()];
    let (kcs, vcs) = (strides3(), strides3());
    if which == 0 {
        let layout = CacheWriteLayout {
            cache: PagedKvLayout {
                num_blocks: nb,
                block_size: bs,
                num_kv_heads: heads,
                head_dim: d,
                key_strides: kcs,
                value_strides: vcs,
            },
            num_tokens: tokens,
            key_strides: [b.dim(), b.dim()],
            value_strides: [b.dim(), b.dim()],
        };
        let (kl, vl, kcl, vcl) = (b.len(), b.len(), b.len(), b.len());
        let slots: Vec<i64> = (0..b.u8() % 8)
            .map(|_| b.dim().wrapping_mul(3) - 10)
            .collect();
        let (key, value) = (vec![1f32; kl], vec![2f32; vl]);
        let (mut kc, mut vc) = (vec![0f32; kcl], vec![0f32; vcl]);
        let _ = kernels::reshape_and_cache(&layout, &key, &value, &mut kc, &mut vc, &slots);
        let _ = kernels::reshape_and_cache_into(
            &layout,
            &key,
            &value,
            KvCacheMut::Fused(&mut kc),
            &slots,
        );
        return;
    }
    let kv = PagedKvLayout {
        num_blocks: nb,
        block_size: bs,
        num_kv_heads: heads,
        head_dim: d,
        key_strides: kcs,
        value_strides: if which == 2 { kcs } else { vcs },
    };
    let seqs = (b.u8() % 4) as usize;
    let width = (b.u8() % 6) as i64;
    let block_tables: Vec<i32> = (0..seqs * width as usize).map(|_| b.dim() as i32).collect();
    let seq_lens: Vec<i32> = (0..seqs)
        .map(|_| (b.dim() as i32).wrapping_mul(4))
        .collect();
    let live_starts: Vec<i32> = (0..seqs)
        .map(|_| (b.dim() as i32).wrapping_mul(4))
        .collect();
    let num_evict: Vec<i32> = (0..seqs)
        .map(|_| (b.dim() as i32).wrapping_mul(2))
        .collect();
    let max_live = b.dim();
    let survivors: Vec<i32> = (0..b.len() % 512).map(|_| b.dim() as i32).collect();
    let windows = LiveWindows {
        block_tables: &block_tables,
        block_table_stride: width,
        seq_lens: &seq_lens,
        live_starts: &live_starts,
    };
    let (kl, vl) = (b.len(), b.len());
    let (mut key, mut value) = (vec![0f32; kl], vec![0f32; vl]);
    let cache = if which == 2 {
        KvCacheMut::Fused(&mut key)
    } else {
        KvCacheMut::Split {
            key: &mut key,
            value: &mut value,
        }
    };
    let _ = kernels::compact(&kv, &windows, max_live, &num_evict, &survivors, cache, None);
});
