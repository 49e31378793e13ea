"""Admission that sees foresightkv's real footprint, through hooks on SGLang 0.5.23's ``PrefillAdder``.

SGLang admits a request when the free slots cover, besides its prompt, the tokens every running and
admitted request may still generate (``max_new_tokens``, clipped at
``SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION`` and, except for ``ignore_eos``, scaled by the scheduler's
new-token ratio). With the radix cache off, an ``ignore_eos`` request goes through
``add_one_req_ignore_eos`` instead, which lets running requests finish one by one in order of
tokens left and requires that each time the free slots cover what every remaining request still
adds. Both assume that a request grows to its full length.

With foresightkv a request never holds more than its cap: ``budget + interval + 1`` slots (the
window reaches ``budget + interval`` entries when an eviction falls due; the next token's slot is
allocated before that eviction's slots come back, one step later), plus its whole prompt with
``protect_prompt``. So what a request may still add is at most ``cap - held`` (``held``: the slots it
holds now, or once its admitted prefill is in). The hooks cap each estimate at that:

- ``_get_running_request_total_token_offset`` (running requests' future tokens),
- ``_select_prefill_admission`` (the new request's whole demand, ``total_tokens``),
- ``_update_prefill_budget`` (what an admitted request reserves; SGLang calls it right after
  appending the request to ``can_run_list``, so the request is ``can_run_list[-1]``),
- ``add_one_req_ignore_eos``: the same one-by-one check with real footprints, after which SGLang's
  own check, which assumes full lengths, is skipped (it is gated on ``is_hybrid_swa``, which the
  hook sets for the call only),
- ``BaseTokenToKVPoolAllocator.max_new_tokens_for_memory``: SGLang clips ``max_new_tokens`` so that a
  request fits an empty pool at full length; with foresightkv it only has to fit at its cap.

Without foresightkv on the adder's pool every hook returns SGLang's own value."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

from .ledger import ledger_key


@dataclass(frozen=True)
class Footprint:
    """The slot cap of the requests of one foresightkv backend."""

    backend: object
    #: ``budget + interval + 1``: the most slots a request's evictable window holds.
    window: int
    protect_prompt: bool

    @staticmethod
    def of(backend) -> "Footprint":
        """The footprint rule of ``backend``'s configuration."""
        cfg = backend.engine.config
        return Footprint(backend, cfg.budget + cfg.interval + 1, cfg.protect_prompt)

    def _prompt(self, req) -> int:
        """Length the request's prefill reaches (prompt; for a retracted request, what SGLang recomputes)."""
        fill = getattr(req, "full_untruncated_fill_ids", None)
        return len(fill) if fill else len(req.origin_input_ids) + len(req.output_ids)

    def _cap(self, protected: int) -> int:
        """Most slots a request whose protected prompt is ``protected`` tokens long holds."""
        return self.window + (protected if self.protect_prompt else 0)

    def admitted_growth(self, req) -> int:
        """Slots ``req`` may add once its whole prefill is in (it then holds all it prefilled)."""
        return max(0, self._cap(len(req.origin_input_ids)) - self._prompt(req))

    def running(self, req) -> Tuple[int, int]:
        """``(growth, held)`` of a running request: the slots it may still add and those it holds now
        (allocated minus what foresightkv's evictions gave back)."""
        if req.finished() or req.kv.req_pool_idx is None:
            return 0, 0
        allocated = int(req.kv.kv_allocated_len)
        be = self.backend
        key = ledger_key(be.req_to_token_pool, req.kv.req_pool_idx)
        eng = be.engine
        protected = eng.protected_len(key)  # 0 for a request without state (nothing evicted yet)
        held = allocated - max(0, eng.live_start(key) - protected)
        cap = self._cap(protected or len(req.origin_input_ids))
        return max(0, cap - held), held


def footprint(adder) -> Optional[Footprint]:
    """The footprint rule when foresightkv serves ``adder``'s pool, else None."""
    from .hooks import backend_for

    tree = getattr(adder, "tree_cache", None)
    backend = backend_for(getattr(tree, "req_to_token_pool", None))
    return None if backend is None else Footprint.of(backend)


def _remaining_new(req) -> int:
    """Tokens ``req`` may still generate, as ``add_one_req`` counts them (clipped)."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    return min(max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS)


def running_offset_hook(original, adder, req, *args, **kwargs):
    """AROUND hook of ``PrefillAdder._get_running_request_total_token_offset``: a running request's
    reserved future tokens, capped at what it may still add."""
    value = original(adder, req, *args, **kwargs)
    fp = footprint(adder)
    if fp is None:
        return value
    return min(value, fp.running(req)[0])


def select_hook(original, adder, req, *args, total_tokens, **kwargs):
    """AROUND hook of ``PrefillAdder._select_prefill_admission``: the new request's demand
    (``total_tokens``: prompt + future tokens + overhead) with its future tokens capped."""
    fp = footprint(adder)
    if fp is not None:
        new = _remaining_new(req)
        total_tokens -= new - min(new, fp.admitted_growth(req))
    return original(adder, req, *args, total_tokens=total_tokens, **kwargs)


def update_budget_hook(original, adder, prefix_len, extend_input_len, max_new_tokens=None, *args, **kwargs):
    """AROUND hook of ``PrefillAdder._update_prefill_budget``: the future tokens an admitted request
    (``can_run_list[-1]``) reserves, capped at what it may add after its prefill."""
    kw = "max_new_tokens" in kwargs
    if kw:
        max_new_tokens = kwargs.pop("max_new_tokens")
    fp = footprint(adder)
    if fp is not None and max_new_tokens and adder.can_run_list:
        max_new_tokens = min(max_new_tokens, fp.admitted_growth(adder.can_run_list[-1]))
    if kw:
        return original(adder, prefix_len, extend_input_len, *args, max_new_tokens=max_new_tokens, **kwargs)
    return original(adder, prefix_len, extend_input_len, max_new_tokens, *args, **kwargs)


def ignore_eos_states(fp: Footprint, adder, req) -> List[Tuple[float, int]]:
    """``(tokens_left, tokens_occupied)`` of every request ``add_one_req_ignore_eos`` weighs (the
    candidate, the running batch, those admitted in this pass), as SGLang computes them but with
    ``tokens_left`` capped at what each request may still add and ``tokens_occupied`` the slots it
    holds (or will hold once its admitted prefill is in)."""
    states = []

    def add(r, growth: int, held: int) -> None:
        ratio = 1.0 if r.sampling_params.ignore_eos else adder.new_token_ratio
        left = min(r.sampling_params.max_new_tokens * ratio - len(r.output_ids), growth)
        if left > 0:
            states.append((left, held))

    add(req, fp.admitted_growth(req), fp._prompt(req))
    if adder.running_batch is not None:
        for r in adder.running_batch.reqs:
            add(r, *fp.running(r))
    for r in adder.can_run_list:
        add(r, fp.admitted_growth(r), fp._prompt(r))
    states.sort(key=lambda s: s[0])
    return states


def ignore_eos_hook(original, adder, req, *args, **kwargs):
    """AROUND hook of ``PrefillAdder.add_one_req_ignore_eos``: SGLang's one-by-one check with the
    requests' real footprints; SGLang's own check (full lengths) is skipped for this call."""
    from sglang.srt.managers.schedule_policy import IGNORE_EOS_RESERVE_TOKENS, AddReqResult

    fp = footprint(adder)
    if fp is None or adder.is_hybrid_swa:
        return original(adder, req, *args, **kwargs)
    cand = len(req.full_untruncated_fill_ids) - req.prefix_len
    paged_input = adder.ceil_paged_tokens(cand) + adder.per_req_token_overhead
    rem = adder.cur_rem_tokens - paged_input
    states = ignore_eos_states(fp, adder, req)
    freed = 0
    for i, (left, occupied) in enumerate(states):
        bs = len(states) - i
        if rem + freed - left * bs <= IGNORE_EOS_RESERVE_TOKENS * bs:
            return AddReqResult.NO_TOKEN
        freed += occupied
    adder.is_hybrid_swa = True
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        adder.is_hybrid_swa = False


def max_new_tokens_hook(original, allocator, input_tokens, max_new_tokens, *args, token_capacity, **kwargs):
    """AROUND hook of ``BaseTokenToKVPoolAllocator.max_new_tokens_for_memory``: SGLang clips
    ``max_new_tokens`` so that the request fits an empty pool at full length; on a foresightkv pool it
    holds at most ``max(input, min(input + max_new, cap))`` slots, so ``max_new_tokens`` stays whenever
    that fits (with SGLang's own page and one-token margin)."""
    from .hooks import backend_for

    clipped = original(allocator, input_tokens, max_new_tokens, *args, token_capacity=token_capacity, **kwargs)
    backend = backend_for(allocator)
    if backend is None or clipped is None:
        return clipped
    cfg = backend.engine.config
    cap = cfg.budget + cfg.interval + 1 + (input_tokens if cfg.protect_prompt else 0)
    need = max(input_tokens, min(input_tokens + max_new_tokens, cap))
    page = allocator.page_size
    if -(-need // page) * page + page + 1 <= token_capacity:
        return max(clipped, max_new_tokens)
    return clipped


_PA = "sglang.srt.managers.schedule_policy.PrefillAdder."

#: (target, hook, hook type name) of the admission hooks.
HOOKS = (
    (_PA + "_get_running_request_total_token_offset", running_offset_hook, "AROUND"),
    (_PA + "_select_prefill_admission", select_hook, "AROUND"),
    (_PA + "_update_prefill_budget", update_budget_hook, "AROUND"),
    (_PA + "add_one_req_ignore_eos", ignore_eos_hook, "AROUND"),
    (
        "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.max_new_tokens_for_memory",
        max_new_tokens_hook,
        "AROUND",
    ),
)
