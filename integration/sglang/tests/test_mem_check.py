"""SGLang's own memory checks hold while foresightkv evicts (issue 19): the busy-time pool accounting
(``SchedulerInvariantChecker._check_full_pool`` over ``_get_total_uncached_sizes``, what
``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=1`` asserts after every batch) and the page invariants
(``_check_kv_page_invariants``: no running request's ``req_to_token`` row names a free slot, no slot twice
on the free list), run with SGLang's real checker over the rig's real pools after every step."""

from types import SimpleNamespace

import pytest
from rig import Rig

from foresightkv.engine import EngineConfig
from foresightkv_sglang.backend import ForesightKVAttnBackend


def _checker(rig, running):
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler_components.invariant_checker import SchedulerInvariantChecker
    from sglang.srt.managers.scheduler_components.pool_stats_observer import SchedulerPoolStatsObserver

    observer = SchedulerPoolStatsObserver(
        tree_cache=rig.tree, token_to_kv_pool_allocator=rig.alloc, req_to_token_pool=rig.rtp,
        session_controller=SimpleNamespace(sessions={}), hisparse_coordinator=None, is_hybrid_swa=False,
        is_hybrid_ssm=False, enable_hisparse=False, full_tokens_per_layer=None, swa_tokens_per_layer=None,
        max_total_num_tokens=rig.size,
    )  # fmt: skip
    batch = SimpleNamespace(reqs=running)
    return SchedulerInvariantChecker(
        is_hybrid_swa=False, is_hybrid_ssm=False, disaggregation_mode=DisaggregationMode.NULL, page_size=1,
        full_tokens_per_layer=None, swa_tokens_per_layer=None, max_total_num_tokens=rig.size, tree_cache=rig.tree,
        token_to_kv_pool_allocator=rig.alloc, req_to_token_pool=rig.rtp, pool_stats_observer=observer,
        get_last_batch=lambda: batch, get_running_batch=lambda: batch, scheduler_stage_metrics=None,
    )  # fmt: skip


def _assert_sglang_checks_pass(rig, lives):
    checker = _checker(rig, [lv.req for lv in lives])
    full, _ = checker._get_total_uncached_sizes()
    leak, msg = checker._check_full_pool(checker.pool_stats_observer.get_pool_stats(), uncached=full)
    assert not leak, f"SGLang's busy-time check reports a leak: {msg}"
    checker._check_kv_page_invariants()
    assert checker.count_memory_leak_warnings == 0, "a running request's row names a free slot"


@pytest.mark.parametrize("protect", [False, True])
def test_sglang_memory_checks_hold_through_evictions(server_args, protect):
    rig = Rig(server_args, size=256, rows=4, max_ctx=96)
    backend = ForesightKVAttnBackend(
        rig.runner, EngineConfig(budget=8, interval=4, policy="h2o", protect_prompt=protect)
    )
    lives = [rig.add(n) for n in "abc"]
    rig.run(backend, rig.batch(lives, [5, 11, 19]))
    _assert_sglang_checks_pass(rig, lives)
    for step in range(40):
        rig.run(backend, rig.batch(lives, [1] * len(lives)))
        _assert_sglang_checks_pass(rig, lives)
        if step == 20:
            rig.finish(lives.pop(1))
            _assert_sglang_checks_pass(rig, lives)
    assert backend.freed_slots > 0
    for lv in lives:
        rig.finish(lv)
    _assert_sglang_checks_pass(rig, [])
    assert sorted(rig.free_slots()) == list(range(1, rig.size + 1))
