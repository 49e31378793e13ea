"""``foresightkv_vllm.lifecycle.install`` wraps vLLM's V1 ``GPUModelRunner._update_states`` once per
process (idempotent, vLLM's own method called through), and ``uninstall`` restores it. What the
wrapper releases is tested in whole vLLM (integration/vllm/e2e/test_llm.py: no state is left after
the runner has seen every finish and every preemption) and, for the anchor rule, in
test_request_keys.py; ``release_requests``' bookkeeping of preempted requests below."""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("vllm")


def test_install_wraps_once_and_uninstall_restores():
    from foresightkv_vllm import lifecycle
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    lifecycle.uninstall()
    original = GPUModelRunner._update_states
    try:
        assert lifecycle.install() and lifecycle.install()
        wrapped = GPUModelRunner._update_states
        assert wrapped is not original
        assert getattr(wrapped, lifecycle._ORIGINAL) is original
        assert wrapped.__name__ == original.__name__
        assert list(inspect.signature(wrapped).parameters)[:2] == ["self", "scheduler_output"]
    finally:
        lifecycle.uninstall()
    assert GPUModelRunner._update_states is original



class _Runner:
    """The parts of vLLM's V1 runner ``release_requests`` reads: its request states (block ids per KV
    cache group, computed count at the start of the request's last step) and its attention groups."""

    def __init__(self, builder) -> None:
        self.requests = {}
        self.attn_groups = [[SimpleNamespace(metadata_builders=[builder])]]

    def hold(self, rid: str, blocks, computed: int) -> None:
        self.requests[rid] = SimpleNamespace(block_ids=(list(blocks),), num_computed_tokens=computed)


def _output(preempted=(), finished=(), resumed=()):
    """A scheduler output as the V1 runner receives it (only the fields ``release_requests`` reads)."""
    return SimpleNamespace(
        preempted_req_ids=set(preempted),
        finished_req_ids=set(finished),
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set(resumed)),
    )


def test_preempted_requests_are_released_at_preemption_and_their_stale_finish_releases_nothing():
    """A preempted request's state goes at the step vLLM reports the preemption; when it is aborted
    while waiting, the runner still lists its old blocks, which vLLM has handed to another request
    anchored there at the same block index: that finish must release nothing (releasing by the stale
    table would drop the other request's state). A request preempted and resumed in one step
    (vLLM's ``reset_prefix_cache``) is released once and its later finish releases its new state."""
    from foresightkv_vllm import lifecycle
    from foresightkv_vllm.backend import ForesightKVMetadataBuilder, RequestKeys

    from test_request_keys import BS, RecordingEngine

    engine = RecordingEngine()
    keys = RequestKeys(engine, BS)
    builder = ForesightKVMetadataBuilder.__new__(ForesightKVMetadataBuilder)
    builder.keys = keys  # the one part of a builder the lifecycle uses
    runner = _Runner(builder)

    def start(rid, blocks, length):
        """A new request's first step: ``length`` tokens written to ``blocks``, anchored in the last."""
        (key,) = keys.resolve(np.array([0]), np.array([-1])).tolist()
        positions = np.arange(length)
        token_blocks = np.array(blocks)[positions // BS]
        keys.claim(np.array([key]), np.array([length]), np.array([-1]), np.array([True]), token_blocks,
                   np.full(length, key), np.array([blocks[(length - 1) // BS]]))
        runner.hold(rid, blocks, 0)
        return key

    a = start("a", [1, 2], 6)
    b = start("b", [3], 3)
    assert lifecycle.release_requests(runner, _output(preempted={"a"})) == 1
    assert engine.released == [a]
    c = start("c", [5, 2], 6)  # a's freed block 2 now holds c's anchor, at block index 1 as in a's table
    assert lifecycle.release_requests(runner, _output(finished={"a"})) == 0  # a's table is stale
    runner.requests.pop("a")
    assert engine.released == [a] and keys.block_of(c) == 2
    assert lifecycle.release_requests(runner, _output(preempted={"b"}, resumed={"b"})) == 1
    b2 = start("b", [7], 2)  # recomputed from scratch: a new state in new blocks
    assert lifecycle.release_requests(runner, _output(finished={"b", "c"})) == 2
    assert engine.released == [a, b, b2, c] or engine.released == [a, b, c, b2]
    assert len(keys) == 0 and not runner.__dict__[lifecycle._PREEMPTED]
