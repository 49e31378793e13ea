//! The eviction schedule as pure arithmetic: when an eviction is due, where `live_start` goes, and
//! how many blocks a sequence holds at most (for admission).

use super::{CacheConfig, EvictionConfig};

/// What the next eviction of a sequence does (returned by `eviction_due`, applied by `compact`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvictionPlan {
    /// Sequence length (tokens) when the eviction is applied.
    pub len: usize,
    /// `live_start` before the eviction.
    pub live_start_before: usize,
    /// `live_start` after the eviction (block aligned, leaves at least `B` evictable entries live).
    pub live_start_after: usize,
    /// Entries each (layer, KV head) evicts: the live count shrinks by this much.
    pub evicted_per_head: usize,
    /// Block-table entries the eviction empties (their blocks go back to the pool unless shared).
    pub released_blocks: usize,
}

/// Window state of one sequence, the input of [`plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    /// Tokens in the sequence.
    pub len: usize,
    /// Current block-aligned `live_start` (0 before any eviction).
    pub live_start: usize,
    /// Block-aligned protected prefix (prompt rounded up to a block) in protect mode, else 0.
    pub protected_len: usize,
    /// A prompt longer than `B` awaits its compression right after prefill.
    pub compress_pending: bool,
}

/// Rounds `x` down to a multiple of `bs`.
pub fn align_down(x: usize, bs: usize) -> usize {
    x / bs * bs
}

/// Rounds `x` up to a multiple of `bs`.
pub fn align_up(x: usize, bs: usize) -> usize {
    x.div_ceil(bs) * bs
}

/// Start of the evictable window: `max(live_start, protected_len)`.
pub fn window_base(st: &WindowState) -> usize {
    st.live_start.max(st.protected_len)
}

/// The eviction due now, if any: the evictable window `[base, len)` reached `B + L`, or a prompt
/// longer than `B` was just prefilled; the new `live_start` is `align_down(len - B)`, the
/// block-aligned position leaving at least `B` live (exactly `B` on the regular schedule).
pub fn plan(ev: &EvictionConfig, block_size: usize, st: &WindowState) -> Option<EvictionPlan> {
    let base = window_base(st);
    if st.len <= base {
        return None;
    }
    let live = st.len - base;
    let due = live >= ev.budget + ev.interval || st.compress_pending;
    let after = align_down(st.len.saturating_sub(ev.budget), block_size);
    if !due || after <= base {
        return None;
    }
    Some(EvictionPlan {
        len: st.len,
        live_start_before: st.live_start,
        live_start_after: after,
        evicted_per_head: after - base,
        released_blocks: (after - base) / block_size,
    })
}

/// Most blocks one sequence holds at once while its prompt of `prompt_len` tokens grows to
/// `max_len`, appending one token per step and compacting whenever an eviction is due.
///
/// Full cache: `ceil(max_len / bs)`. With eviction the window start is block aligned, so the window
/// of at most `B + L` entries spans exactly `(B + L) / bs` blocks (no extra partial block); a
/// prompt is held whole until its compression right after prefill, whose released blocks then no
/// longer count. Protect mode adds the prompt
/// blocks to a window over the generated tokens.
pub fn max_blocks_held(config: &CacheConfig, prompt_len: usize, max_len: usize) -> usize {
    let bs = config.block_size;
    let max_len = max_len.max(prompt_len);
    let Some(ev) = &config.eviction else {
        return max_len.div_ceil(bs);
    };
    let window_blocks = (ev.budget + ev.interval) / bs;
    if ev.protect_prompt {
        let protected = align_up(prompt_len, bs);
        let generated = max_len.saturating_sub(protected);
        protected / bs + generated.div_ceil(bs).min(window_blocks)
    } else {
        let compressed = if prompt_len >= ev.budget + bs {
            align_down(prompt_len - ev.budget, bs) / bs
        } else {
            0
        };
        let window = (max_len.div_ceil(bs) - compressed).min(window_blocks);
        prompt_len.div_ceil(bs).max(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EV: EvictionConfig = EvictionConfig {
        budget: 64,
        interval: 32,
        protect_prompt: false,
    };

    fn st(len: usize, live_start: usize) -> WindowState {
        WindowState {
            len,
            live_start,
            protected_len: 0,
            compress_pending: false,
        }
    }

    #[test]
    fn regular_schedule_advances_by_interval() {
        assert_eq!(plan(&EV, 16, &st(95, 0)), None);
        let p = plan(&EV, 16, &st(96, 0)).unwrap();
        assert_eq!(
            (p.live_start_after, p.evicted_per_head, p.released_blocks),
            (32, 32, 2)
        );
        assert_eq!(plan(&EV, 16, &st(127, 32)), None);
        assert_eq!(plan(&EV, 16, &st(128, 32)).unwrap().live_start_after, 64);
    }

    #[test]
    fn long_prompt_is_compressed_block_aligned() {
        let s = WindowState {
            len: 100,
            live_start: 0,
            protected_len: 0,
            compress_pending: true,
        };
        let p = plan(&EV, 16, &s).unwrap();
        assert_eq!(p.live_start_after, 32);
        assert!(100 - p.live_start_after >= 64 && 100 - p.live_start_after < 64 + 16);
        let short = WindowState { len: 70, ..s };
        assert_eq!(plan(&EV, 16, &short), None);
    }
}
