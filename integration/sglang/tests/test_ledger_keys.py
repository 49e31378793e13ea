"""The batch's ledger keys, computed in one pass over SGLang's real ``ReqToTokenPool``: each equals
``ledger_key`` of its row (``generation << 32 | row``), and a row or generation that does not fit a
key is refused naming it."""

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

from foresightkv_sglang.ledger import ledger_key, ledger_keys


def _pool():
    pool = ReqToTokenPool(6, 16, device="cpu", enable_memory_saver=False)
    pool.req_generation[:] = torch.arange(pool.req_generation.numel(), dtype=torch.int64) * 3
    return pool


def test_batch_keys_equal_the_per_row_key():
    pool = _pool()
    rows = np.array([3, 1, 5, 1], dtype=np.int64)
    assert ledger_keys(pool, rows) == [ledger_key(pool, int(r)) for r in rows]
    assert ledger_keys(pool, rows)[0] == 9 << 32 | 3


def test_a_generation_that_does_not_fit_is_refused_naming_it():
    pool = _pool()
    pool.req_generation[4] = 1 << 31
    with pytest.raises(ValueError, match=r"row 4 / generation 2147483648 do not fit"):
        ledger_keys(pool, np.array([1, 4], dtype=np.int64))


def test_a_negative_row_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"row -1 "):
        ledger_keys(_pool(), np.array([2, -1], dtype=np.int64))
