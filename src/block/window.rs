//! The live window of a sequence and its eviction schedule, in one place: [`LiveWindow`] is the
//! per-sequence state that [`super::KvCacheManager`] keeps in every block table and that
//! [`WindowPlanner`] keeps per engine request; [`Schedule`] says when an eviction is due and where
//! `live_start` goes; [`WindowPlanner::plan`] plans one engine forward for the whole batch at once
//! and returns flat arrays ready to become tensors.
//!
//! Rules (budget `B`, interval `L`, both multiples of the block size `bs`):
//! - `live_start` is block aligned, 0 before any eviction; the evictable window is `[base, len)`
//!   with `base = max(live_start, protected_len)`.
//! - An eviction is due when the evictable window holds `B + L` entries, or when a prompt is being
//!   compressed (`compress_pending`) and `align_down(len - B) > base`; it moves `live_start` to
//!   `align_down(len - B)`.
//! - Protect mode: `protected_len = align_up(prompt)`, never evicted; prompts are never compressed.
//! - Engine forwards (the planner): the evictions planned for a forward are committed at the start
//!   of the next one ("one step late"), so no engine frees memory its in-flight step may still read.
//! - Chunked prefill: when the whole prompt's length `P` is known (`prompt_len`), no eviction is due
//!   while `len < P` (the prompt is still being prefilled, in any number of chunks), and the row
//!   whose new tokens reach the end of the prompt (`len - num_new < P <= len`) compresses it once,
//!   to `align_down(len - B)` (outside protect mode): exactly what one chunk of the whole prompt
//!   gives, whatever the engine's chunking. When `P` is unknown, a prompt chunk of more than one
//!   token is compressed at its end (outside protect mode).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use super::{BlockError, CacheConfig, EvictionConfig, WindowError};

/// What the next eviction of a sequence does (returned by [`LiveWindow::due`], applied by
/// [`LiveWindow::apply`]).
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

/// Rounds `x` down to a multiple of `bs`.
pub fn align_down(x: usize, bs: usize) -> usize {
    x / bs * bs
}

/// Rounds `x` up to a multiple of `bs`.
pub fn align_up(x: usize, bs: usize) -> usize {
    x.div_ceil(bs) * bs
}

/// The eviction schedule: budget `B`, interval `L`, block size and protect mode, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Budget `B`: live entries left after an eviction.
    pub budget: usize,
    /// Interval `L`: the window grows to `B + L` before an eviction.
    pub interval: usize,
    /// Tokens per block (`live_start` and `protected_len` are multiples of it).
    pub block_size: usize,
    /// Protect mode: the prompt, rounded up to a block, is never evicted.
    pub protect_prompt: bool,
}

impl Schedule {
    /// The schedule of `ev` over blocks of `block_size`, checked by the cache configuration's rules
    /// (positive multiples of the block size, `L <= B`).
    pub fn new(ev: &EvictionConfig, block_size: usize) -> Result<Self, BlockError> {
        CacheConfig {
            block_size,
            num_blocks: 1,
            enable_prefix_caching: false,
            eviction: Some(ev.clone()),
        }
        .validate()?;
        Ok(Self::of(ev, block_size))
    }

    /// The schedule of an already validated configuration.
    pub(crate) fn of(ev: &EvictionConfig, block_size: usize) -> Self {
        Self {
            budget: ev.budget,
            interval: ev.interval,
            block_size,
            protect_prompt: ev.protect_prompt,
        }
    }

    /// Protected prefix of a prompt of `prompt_len` tokens: `align_up(prompt_len)` in protect mode.
    pub fn protected_len(&self, prompt_len: usize) -> usize {
        if self.protect_prompt {
            align_up(prompt_len, self.block_size)
        } else {
            0
        }
    }
}

/// Live-window state of one sequence: the one type the manager and the engine planner share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveWindow {
    /// Tokens in the sequence.
    pub len: usize,
    /// Current block-aligned `live_start` (0 before any eviction).
    pub live_start: usize,
    /// Block-aligned protected prefix (prompt rounded up to a block) in protect mode, else 0.
    pub protected_len: usize,
    /// A prompt awaits its compression (the next [`LiveWindow::due`] may evict without a full window).
    pub compress_pending: bool,
    /// Length of the whole prompt when known: no eviction is due while `len` is below it (the prompt
    /// is still being prefilled in chunks).
    pub prompt_len: Option<usize>,
}

impl LiveWindow {
    /// Start of the evictable window: `max(live_start, protected_len)`.
    pub fn base(&self) -> usize {
        self.live_start.max(self.protected_len)
    }

    /// KV entries attention reads: `[0, protected_len) ∪ [base, len)`.
    pub fn live_tokens(&self) -> usize {
        self.len.min(self.protected_len) + self.len.saturating_sub(self.base())
    }

    /// The eviction due now, if any: the evictable window `[base, len)` reached `B + L`, or a
    /// prompt compression is pending; the new `live_start` is `align_down(len - B)`, the
    /// block-aligned position leaving at least `B` live (exactly `B` on the regular schedule).
    pub fn due(&self, s: &Schedule) -> Option<EvictionPlan> {
        let base = self.base();
        if self.len <= base || self.prefilling() {
            return None;
        }
        if self.len - base < s.budget + s.interval && !self.compress_pending {
            return None;
        }
        // Only when due: the division is most of this call's cost.
        let after = align_down(self.len.saturating_sub(s.budget), s.block_size);
        if after <= base {
            return None;
        }
        Some(EvictionPlan {
            len: self.len,
            live_start_before: self.live_start,
            live_start_after: after,
            evicted_per_head: after - base,
            released_blocks: (after - base) / s.block_size,
        })
    }

    /// The prompt is still being prefilled: its length is known and not reached yet.
    pub fn prefilling(&self) -> bool {
        self.prompt_len.is_some_and(|p| self.len < p)
    }

    /// Records that the sequence grew to `len` by `num_new` tokens (`prefill`: prompt tokens;
    /// `prompt_len`: the whole prompt's length, if known, remembered once given) and whether that
    /// growth asks for a prompt compression: with the prompt's length known, the growth that reaches
    /// its end (`len - num_new < prompt_len <= len`); otherwise a prompt chunk of more than one
    /// token. Protect mode never compresses; in it, prompt tokens extend the protected prefix to
    /// `align_up(min(len, prompt_len))`.
    pub fn grow(
        &mut self,
        s: &Schedule,
        len: usize,
        num_new: usize,
        prefill: bool,
        prompt_len: Option<usize>,
    ) {
        if prompt_len.is_some() {
            self.prompt_len = prompt_len;
        }
        if s.protect_prompt && prefill && num_new > 0 {
            let prompt = self.prompt_len.map_or(len, |p| p.min(len));
            self.protected_len = self.protected_len.max(s.protected_len(prompt));
        }
        self.len = len;
        let start = len - num_new.min(len);
        self.compress_pending = !s.protect_prompt
            && match self.prompt_len {
                Some(p) => start < p && p <= len,
                None => prefill && num_new > 1,
            };
    }

    /// Applies an eviction planned by [`Self::due`]: moves `live_start`, ends a pending compression.
    pub fn apply(&mut self, plan: &EvictionPlan) {
        self.live_start = plan.live_start_after;
        self.compress_pending = false;
    }
}

/// Most blocks one sequence holds at once while its prompt of `prompt_len` tokens grows to
/// `max_len`, appending one token per step and compacting whenever an eviction is due.
///
/// Full cache: `ceil(max_len / bs)`. With eviction the window start is block aligned, so the window
/// of at most `B + L` entries spans exactly `(B + L) / bs` blocks (no extra partial block); a
/// prompt is held whole until its compression right after prefill, whose released blocks then no
/// longer count. Protect mode adds the prompt blocks to a window over the generated tokens.
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

/// One request of an engine forward, as the planner takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepRequest {
    /// Stable key of the request's state (the engine's request identity; below 2^63).
    pub key: u64,
    /// Tokens of the request after this forward.
    pub seq_len: usize,
    /// Tokens (queries) this forward adds; `seq_len - num_new` were computed before.
    pub num_new: usize,
    /// The new tokens are prompt tokens (they extend the protected prompt in protect mode and a
    /// chunk of more than one is compressed at its end otherwise).
    pub prefill: bool,
    /// The engine starts the request over (new request, recomputation after preemption): its state
    /// is replaced by a fresh one.
    pub reset: bool,
    /// Length of the request's whole prompt when the engine knows it (remembered by the request's
    /// state once given). No eviction is then due while `seq_len < prompt_len`, and the row that
    /// reaches the prompt's end compresses it once, so the plan does not depend on how the engine
    /// chunked the prompt. In protect mode a prefill chunk protects `align_up(min(seq_len,
    /// prompt_len))` instead of `align_up(seq_len)` (a chunk that also re-prefills generated
    /// tokens protects the prompt only).
    pub prompt_len: Option<usize>,
}

/// A committed eviction: positions `[evicted_from, new_live_start)` of request `key` hold no live
/// entry any more, so the engine may give their memory back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advance {
    /// The request.
    pub key: u64,
    /// `live_start` before the eviction.
    pub old_live_start: usize,
    /// `live_start` after it.
    pub new_live_start: usize,
    /// The request's protected prefix (0 outside protect mode).
    pub protected_len: usize,
}

impl Advance {
    /// First position whose memory this eviction gives back: `max(old_live_start, protected_len)`.
    pub fn evicted_from(&self) -> usize {
        self.old_live_start.max(self.protected_len)
    }
}

/// The state the planner keeps per request key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestWindow {
    /// Serial number of this state (0, 1, 2, ... in creation order; a reset makes a new one): the
    /// request part of the victim RNG key, and the handle of per-request data kept elsewhere.
    pub serial: u64,
    /// The live window after the last planned forward, `live_start` as committed.
    pub window: LiveWindow,
    /// `live_start` the last forward's eviction moves the window to at the next plan, if any.
    pub pending: Option<usize>,
    /// Request slot of this state, in `[0, max_slots)`: the row of per-request buffers reserved at
    /// start-up (recent queries); kept across a reset, free again after a release.
    pub slot: u32,
    /// First position whose query counts for the statistics since the last eviction planned for the
    /// request (0 before any): its recorded queries are those of `[max(queries_from, protected_len),
    /// len)`.
    pub queries_from: usize,
}

/// Per-row plan of one forward in flat arrays (one entry per request row, batch order), reused
/// between calls. Positions are original token positions unless the field says "kernel
/// coordinates": the window as the kernels read it through a block table whose evicted middle
/// (protect mode, `[protected_len, live_start)`) is cut out; outside protect mode both agree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Length after the forward.
    pub seq_lens: Vec<i32>,
    /// Tokens the forward adds.
    pub num_new: Vec<i32>,
    /// Offset of the row's first query in the forward's token array.
    pub query_starts: Vec<i32>,
    /// Committed `live_start`.
    pub live_starts: Vec<i32>,
    /// Protected prefix (0 outside protect mode).
    pub protected_lens: Vec<i32>,
    /// Start of the evictable window, `max(live_start, protected_len)`.
    pub bases: Vec<i32>,
    /// `live_start` the eviction due at the end of this forward moves to, -1 when none is due.
    pub evict_to: Vec<i32>,
    /// Window length in kernel coordinates.
    pub window_lens: Vec<i32>,
    /// Attention start in kernel coordinates (0 in protect mode, `live_start` otherwise).
    pub attn_starts: Vec<i32>,
    /// Evictable start in kernel coordinates (`protected_len` in protect mode, `live_start` otherwise).
    pub evict_starts: Vec<i32>,
    /// Serial of the row's state ([`RequestWindow::serial`]).
    pub serials: Vec<i64>,
    /// Request slot of the row's state ([`RequestWindow::slot`]).
    pub slots: Vec<i32>,
    /// Queries recorded for the statistics since the request's last eviction, this forward's
    /// included (before the eviction due at its end): those of positions `[len - num_queries, len)`.
    pub num_queries: Vec<i32>,
    /// Evictions of the previous forward, committed by this plan (in the order they were planned).
    pub released: Vec<Advance>,
    /// Serials of the states this plan replaced (resets): their per-request data can go.
    pub dropped: Vec<u64>,
    /// Tokens of the forward: the sum of `num_new`.
    pub num_tokens: usize,
}

impl StepPlan {
    fn clear(&mut self) {
        for v in [
            &mut self.seq_lens,
            &mut self.num_new,
            &mut self.query_starts,
            &mut self.live_starts,
            &mut self.protected_lens,
            &mut self.bases,
            &mut self.evict_to,
            &mut self.window_lens,
            &mut self.attn_starts,
            &mut self.evict_starts,
            &mut self.slots,
            &mut self.num_queries,
        ] {
            v.clear();
        }
        self.serials.clear();
        self.released.clear();
        self.dropped.clear();
        self.num_tokens = 0;
    }

    /// Rows of the plan.
    pub fn len(&self) -> usize {
        self.seq_lens.len()
    }

    /// Whether the plan has no rows.
    pub fn is_empty(&self) -> bool {
        self.seq_lens.is_empty()
    }
}

/// Hasher of request keys: one multiply and fold (keys come from the engine, not from users, and
/// the map only needs spread, not DoS resistance; SipHash was a third of the planner's time).
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 ^= x;
    }
}

type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;
type KeySet = HashSet<u64, BuildHasherDefault<KeyHasher>>;

/// Most tokens of one request or one forward: the device tables are int32.
const MAX_TOKENS: usize = i32::MAX as usize;

/// Most request keys: keys travel as int64.
const MAX_KEY: u64 = i64::MAX as u64;

/// Row position marker of a row whose key has no state yet (a new request).
const NEW_KEY: u32 = u32::MAX;

/// The batched eviction planner of an engine: the live window of every request, keyed by the
/// engine's request key, planned one forward (all requests of the batch) per call.
///
/// States live in a slab indexed by the request slot, found through a key index; the slot each
/// row position had at the last plan is kept as a hint, so the common step (the same requests in
/// the same order as the last forward) finds every state without hashing.
#[derive(Clone, Debug)]
pub struct WindowPlanner {
    schedule: Schedule,
    evicts: bool,
    /// `(key, state)` of each request slot in use, `None` for a free slot.
    slab: Vec<Option<(u64, RequestWindow)>>,
    /// Slot of each key with state.
    index: KeyMap<u32>,
    /// Slot of each row position at the last plan (a hint: checked against the key before use).
    hints: Vec<u32>,
    /// Scratch of one plan: the slot of each row's existing state, [`NEW_KEY`] for none.
    resolved: Vec<u32>,
    /// `(slot, serial)` of the states whose eviction the last plan made pending.
    pending: Vec<(u32, u64)>,
    next_serial: u64,
    max_slots: Option<usize>,
    free_slots: Vec<u32>,
    next_slot: u32,
}

impl WindowPlanner {
    /// A planner for `schedule`; `evicts` is false for a policy that never evicts (windows are
    /// tracked, no eviction is ever due).
    pub fn new(schedule: Schedule, evicts: bool) -> Self {
        Self {
            schedule,
            evicts,
            slab: Vec::new(),
            index: KeyMap::default(),
            hints: Vec::new(),
            resolved: Vec::new(),
            pending: Vec::new(),
            next_serial: 0,
            max_slots: None,
            free_slots: Vec::new(),
            next_slot: 0,
        }
    }

    /// Bounds the requests with state to `max_slots` (the request slots reserved at start-up; None
    /// = unbounded); a plan that would exceed it is refused with [`WindowError::TooManyRequests`].
    /// Refused (returns false) when more requests hold state already.
    pub fn set_max_slots(&mut self, max_slots: Option<usize>) -> bool {
        if max_slots.is_some_and(|m| m < self.index.len() || m > u32::MAX as usize) {
            return false;
        }
        if let Some(m) = max_slots {
            // Refused while a request holds a slot at or past the new bound.
            if self.index.values().any(|&s| s as usize >= m) {
                return false;
            }
            self.free_slots.retain(|&s| (s as usize) < m);
            if self.next_slot as usize > m {
                self.next_slot = m as u32;
            }
        }
        self.max_slots = max_slots;
        true
    }

    /// The bound on requests with state ([`Self::set_max_slots`]).
    pub fn max_slots(&self) -> Option<usize> {
        self.max_slots
    }

    /// The schedule the planner follows.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Requests with state.
    pub fn num_requests(&self) -> usize {
        self.index.len()
    }

    /// Keys of the requests with state (any order).
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.keys().copied()
    }

    /// The state of request `key`, if any.
    pub fn state(&self, key: u64) -> Option<&RequestWindow> {
        let slot = *self.index.get(&key)?;
        self.slab[slot as usize].as_ref().map(|(_, st)| st)
    }

    /// Forgets request `key` (finished, aborted or preempted); its pending eviction is dropped.
    /// Returns the serial of the state it had.
    pub fn release(&mut self, key: u64) -> Option<u64> {
        let slot = self.index.remove(&key)?;
        let (_, st) = self.slab[slot as usize].take()?;
        self.free_slots.push(slot);
        Some(st.serial)
    }

    /// Slot of the state of `key` at row position `i`: the hint when it still holds `key`, else
    /// the index; [`NEW_KEY`] when the key has no state.
    fn lookup(&self, i: usize, key: u64) -> u32 {
        if let Some(&slot) = self.hints.get(i) {
            if matches!(self.slab.get(slot as usize), Some(Some((k, _))) if *k == key) {
                return slot;
            }
        }
        self.index.get(&key).copied().unwrap_or(NEW_KEY)
    }

    /// Checks the rows against the state the plan will see (after committing the pending
    /// evictions and applying the resets of earlier rows), before anything changes; records each
    /// row's slot in `resolved` for the plan.
    fn validate(&mut self, rows: &[StepRequest]) -> Result<(), WindowError> {
        let mut fresh = KeySet::default();
        let mut new_keys = KeySet::default();
        let mut total = 0usize;
        // Scratch taken out for the loop (`lookup` borrows `self`); an error drops it (rare, and
        // the next plan allocates it again).
        let mut resolved = std::mem::take(&mut self.resolved);
        resolved.clear();
        for (i, r) in rows.iter().enumerate() {
            let slot = self.lookup(i, r.key);
            resolved.push(slot);
            if r.key > MAX_KEY {
                return Err(WindowError::KeyTooLarge(r.key));
            }
            if r.num_new > r.seq_len {
                return Err(WindowError::MoreNewThanLength {
                    key: r.key,
                    num_new: r.num_new,
                    seq_len: r.seq_len,
                });
            }
            if r.seq_len > MAX_TOKENS {
                return Err(WindowError::TooLong {
                    key: r.key,
                    len: r.seq_len,
                });
            }
            total += r.num_new;
            if total > MAX_TOKENS {
                return Err(WindowError::TooManyTokens(total));
            }
            if r.reset {
                fresh.insert(r.key);
            }
            let live_start = match self.slab.get(slot as usize) {
                Some(Some((_, s))) if fresh.is_empty() || !fresh.contains(&r.key) => {
                    s.pending.unwrap_or(s.window.live_start)
                }
                _ => 0,
            };
            let start = r.seq_len - r.num_new;
            if start < live_start {
                return Err(WindowError::BeforeWindow {
                    key: r.key,
                    start,
                    live_start,
                });
            }
            if self.schedule.protect_prompt && r.prefill && r.num_new > 0 && live_start > 0 {
                return Err(WindowError::PromptAfterEviction { key: r.key });
            }
            if slot == NEW_KEY {
                new_keys.insert(r.key);
            }
        }
        self.resolved = resolved;
        if let Some(max) = self.max_slots {
            let needed = self.index.len() + new_keys.len();
            if needed > max {
                return Err(WindowError::TooManyRequests { needed, max });
            }
        }
        Ok(())
    }

    /// A free slot for a new state (the lowest freed one first, else the next unused).
    fn take_slot(&mut self) -> u32 {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.next_slot += 1;
                self.next_slot - 1
            }
        };
        if self.slab.len() <= slot as usize {
            self.slab.resize(slot as usize + 1, None);
        }
        slot
    }

    /// Plans one forward into `out` (cleared first): commits the evictions planned by the previous
    /// call (`out.released`), then, row by row, replaces the state of reset or unknown keys, records
    /// the new length, extends the protected prompt (protect mode), and plans the eviction due at
    /// the end of this forward. A key may appear in several rows (a chunk split in two): later rows
    /// see the earlier rows' state. Atomic: on error nothing changed.
    pub fn plan(&mut self, rows: &[StepRequest], out: &mut StepPlan) -> Result<(), WindowError> {
        self.validate(rows)?;
        out.clear();
        for (slot, serial) in std::mem::take(&mut self.pending) {
            if let Some(Some((key, st))) = self.slab.get_mut(slot as usize) {
                if st.serial != serial {
                    continue;
                }
                if let Some(to) = st.pending.take() {
                    out.released.push(Advance {
                        key: *key,
                        old_live_start: st.window.live_start,
                        new_live_start: to,
                        protected_len: st.window.protected_len,
                    });
                    st.window.live_start = to;
                }
            }
        }
        let s = self.schedule;
        let mut offset = 0usize;
        let mut hints = std::mem::take(&mut self.hints);
        hints.clear();
        for (i, r) in rows.iter().enumerate() {
            let serial = self.next_serial;
            let fresh = |slot| RequestWindow {
                serial,
                window: LiveWindow::default(),
                pending: None,
                slot,
                queries_from: 0,
            };
            let mut slot = self.resolved[i];
            if slot == NEW_KEY {
                // A new key, or one a previous row of this forward created.
                slot = self.index.get(&r.key).copied().unwrap_or(NEW_KEY);
            }
            if slot == NEW_KEY {
                slot = self.take_slot();
                self.index.insert(r.key, slot);
                self.slab[slot as usize] = Some((r.key, fresh(slot)));
                self.next_serial += 1;
            }
            hints.push(slot);
            let Some((_, st)) = self.slab[slot as usize].as_mut() else {
                unreachable!("slot {slot} of key {} holds a state", r.key)
            };
            if r.reset && st.serial != serial {
                out.dropped.push(st.serial);
                *st = fresh(slot);
                self.next_serial += 1;
            }
            let w = &mut st.window;
            w.grow(&s, r.seq_len, r.num_new, r.prefill, r.prompt_len);
            let target = if self.evicts {
                w.due(&s).map(|p| p.live_start_after)
            } else {
                None
            };
            w.compress_pending = false;
            let (ls, p, n) = (w.live_start, w.protected_len, r.seq_len);
            out.num_queries
                .push(n.saturating_sub(st.queries_from.max(p)) as i32);
            out.slots.push(slot as i32);
            st.pending = target;
            if target.is_some() {
                self.pending.push((slot, st.serial));
                st.queries_from = n;
            }
            out.seq_lens.push(n as i32);
            out.num_new.push(r.num_new as i32);
            out.query_starts.push(offset as i32);
            out.live_starts.push(ls as i32);
            out.protected_lens.push(p as i32);
            out.bases.push(ls.max(p) as i32);
            out.evict_to.push(target.map_or(-1, |t| t as i32));
            if s.protect_prompt {
                out.window_lens
                    .push(if ls > p { p + n - ls } else { n } as i32);
                out.attn_starts.push(0);
                out.evict_starts.push(p as i32);
            } else {
                out.window_lens.push(n as i32);
                out.attn_starts.push(ls as i32);
                out.evict_starts.push(ls as i32);
            }
            out.serials.push(st.serial as i64);
            offset += r.num_new;
        }
        self.hints = hints;
        out.num_tokens = offset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Schedule = Schedule {
        budget: 64,
        interval: 32,
        block_size: 16,
        protect_prompt: false,
    };

    fn win(len: usize, live_start: usize) -> LiveWindow {
        LiveWindow {
            len,
            live_start,
            protected_len: 0,
            compress_pending: false,
            prompt_len: None,
        }
    }

    #[test]
    fn regular_schedule_advances_by_interval() {
        assert_eq!(win(95, 0).due(&S), None);
        let p = win(96, 0).due(&S).unwrap();
        assert_eq!(
            (p.live_start_after, p.evicted_per_head, p.released_blocks),
            (32, 32, 2)
        );
        assert_eq!(win(127, 32).due(&S), None);
        assert_eq!(win(128, 32).due(&S).unwrap().live_start_after, 64);
    }

    #[test]
    fn long_prompt_is_compressed_block_aligned() {
        let w = LiveWindow {
            compress_pending: true,
            ..win(100, 0)
        };
        let p = w.due(&S).unwrap();
        assert_eq!(p.live_start_after, 32);
        assert!(100 - p.live_start_after >= 64 && 100 - p.live_start_after < 64 + 16);
        let short = LiveWindow { len: 70, ..w };
        assert_eq!(short.due(&S), None);
    }

    fn row(key: u64, seq_len: usize, num_new: usize, prefill: bool) -> StepRequest {
        StepRequest {
            key,
            seq_len,
            num_new,
            prefill,
            reset: false,
            prompt_len: None,
        }
    }

    #[test]
    fn evictions_commit_one_forward_late() {
        let mut p = WindowPlanner::new(S, true);
        let mut out = StepPlan::default();
        p.plan(&[row(7, 100, 100, true)], &mut out).unwrap();
        assert_eq!((out.evict_to[0], out.live_starts[0]), (32, 0));
        assert!(out.released.is_empty());
        p.plan(&[row(7, 101, 1, false)], &mut out).unwrap();
        assert_eq!(out.live_starts[0], 32);
        assert_eq!(out.released[0].evicted_from(), 0);
        assert_eq!(out.released[0].new_live_start, 32);
        assert_eq!(out.evict_to[0], -1);
    }

    #[test]
    fn a_failed_plan_changes_nothing() {
        let mut p = WindowPlanner::new(S, true);
        let mut out = StepPlan::default();
        p.plan(&[row(1, 100, 100, true)], &mut out).unwrap();
        let before = p.clone();
        let err = p.plan(&[row(2, 5, 5, true), row(1, 3, 6, false)], &mut out);
        assert!(matches!(err, Err(WindowError::MoreNewThanLength { .. })));
        for k in [1, 2] {
            assert_eq!(p.state(k), before.state(k));
        }
        assert_eq!(p.num_requests(), before.num_requests());
        assert_eq!(p.pending, before.pending);
        // The window moved to 32 at the commit: new tokens starting before it need a reset.
        let err = p.plan(&[row(1, 101, 80, false)], &mut out);
        assert!(matches!(err, Err(WindowError::BeforeWindow { .. })));
        let reset = StepRequest {
            reset: true,
            ..row(1, 101, 80, false)
        };
        p.plan(&[reset], &mut out).unwrap();
        assert_eq!(out.dropped, vec![0]);
        assert_eq!(out.serials, vec![1]);
    }

    #[test]
    fn protect_mode_cuts_the_middle_out_of_the_kernel_window() {
        let s = Schedule {
            protect_prompt: true,
            ..S
        };
        let mut p = WindowPlanner::new(s, true);
        let mut out = StepPlan::default();
        p.plan(&[row(3, 40, 40, true)], &mut out).unwrap();
        assert_eq!(out.protected_lens[0], 48);
        let mut len = 40;
        while out.evict_to[0] < 0 {
            len += 1;
            p.plan(&[row(3, len, 1, false)], &mut out).unwrap();
        }
        assert_eq!(len, 48 + 96);
        len += 1;
        p.plan(&[row(3, len, 1, false)], &mut out).unwrap();
        assert_eq!(out.live_starts[0], 80);
        assert_eq!(out.window_lens[0] as usize, 48 + len - 80);
        assert_eq!((out.attn_starts[0], out.evict_starts[0]), (0, 48));
        assert_eq!(out.released[0].evicted_from(), 48);
    }
}
