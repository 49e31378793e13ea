//! The fused K|V cache layout is one contract: `reshape_and_cache` writes it exactly as separate
//! caches would (and `compact` / decode read it), the value view starting `head_dim` elements after
//! the key view of one `[num_blocks, block_size, num_kv_heads, 2 * head_dim]` tensor. (Issue 16.)

use foresightkv::kernels::{self, CacheWriteLayout, KvCacheMut, PagedKvLayout};

#[test]
fn reshape_and_cache_into_a_fused_cache_equals_separate_caches() {
    let (tokens, heads, d, bs, nb) = (5i64, 3i64, 4i64, 4i64, 3i64);
    let row = (heads * d) as usize;
    let key: Vec<f32> = (0..tokens as usize * row).map(|i| i as f32).collect();
    let value: Vec<f32> = (0..tokens as usize * row)
        .map(|i| -(i as f32) - 1.0)
        .collect();
    let slots = vec![0i64, 5, -1, 11, 7];
    let split = CacheWriteLayout::contiguous(tokens, heads, d, bs, nb);
    let cache_len = (nb * bs * heads * d) as usize;
    let (mut kc, mut vc) = (vec![0f32; cache_len], vec![0f32; cache_len]);
    kernels::reshape_and_cache(&split, &key, &value, &mut kc, &mut vc, &slots).unwrap();

    let fused_strides = [bs * heads * 2 * d, heads * 2 * d, 2 * d];
    let fused = CacheWriteLayout {
        cache: PagedKvLayout {
            key_strides: fused_strides,
            value_strides: fused_strides,
            ..split.cache
        },
        ..split
    };
    let mut both = vec![0f32; 2 * cache_len];
    kernels::reshape_and_cache_into(&fused, &key, &value, KvCacheMut::Fused(&mut both), &slots)
        .unwrap();
    // Brute force: every (block, token, head, i) of the fused tensor against the split caches.
    for b in 0..nb {
        for t in 0..bs {
            for h in 0..heads {
                for i in 0..d {
                    let split_at = (((b * bs + t) * heads + h) * d + i) as usize;
                    let fused_at = (((b * bs + t) * heads + h) * 2 * d + i) as usize;
                    assert_eq!(both[fused_at], kc[split_at], "K {b} {t} {h} {i}");
                    assert_eq!(
                        both[fused_at + d as usize],
                        vc[split_at],
                        "V {b} {t} {h} {i}"
                    );
                }
            }
        }
    }
    // A fused buffer too short for the value view is refused before any write.
    let mut short = vec![7f32; 2 * cache_len - 1];
    assert!(kernels::reshape_and_cache_into(
        &fused,
        &key,
        &value,
        KvCacheMut::Fused(&mut short),
        &slots
    )
    .is_err());
    assert!(short.iter().all(|&x| x == 7.0));
}
