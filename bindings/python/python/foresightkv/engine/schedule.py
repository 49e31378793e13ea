"""The eviction schedule of the core (``src/block/schedule.rs``, ``plan``) as pure arithmetic, for the
engines' per-step decisions: when an eviction is due and where ``live_start`` goes. In protect mode
the prompt, rounded up to a block (``protected_len``), is never evicted: the evictable window starts
at ``max(live_start, protected_len)`` and a prompt is never compressed."""

from typing import Optional


def align_down(x: int, block_size: int) -> int:
    """``x`` rounded down to a multiple of ``block_size``."""
    return x // block_size * block_size


def align_up(x: int, block_size: int) -> int:
    """``x`` rounded up to a multiple of ``block_size`` (the protected prefix of a prompt of ``x``)."""
    return -(-x // block_size) * block_size


def next_live_start(
    budget: int,
    interval: int,
    block_size: int,
    seq_len: int,
    live_start: int,
    *,
    protected_len: int = 0,
    compress: bool = False,
) -> Optional[int]:
    """The new ``live_start`` when an eviction is due for a sequence of ``seq_len`` tokens, else None.

    Due when the evictable window ``[max(live_start, protected_len), seq_len)`` holds ``budget +
    interval`` entries, or when ``compress`` (a prompt just prefilled) and it holds more than the
    budget allows (never in protect mode: pass ``compress=False``); the new start is
    ``align_down(seq_len - budget)``, the same rule as the core."""
    base = max(live_start, protected_len)
    if seq_len <= base:
        return None
    due = seq_len - base >= budget + interval or compress
    after = align_down(max(seq_len - budget, 0), block_size)
    if not due or after <= base:
        return None
    return after
