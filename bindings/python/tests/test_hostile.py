"""Hostile input for every public function: wrong types, dtypes, shapes, devices, strides,
aliasing, negative and huge sizes, freed sequences. Each raises the right foresightkv exception,
touches no output, and leaves the manager usable and consistent."""

import numpy as np
import pytest
import torch

import foresightkv as fkv
from conftest import check_consistent
from kernel_args import BS, D, G, H, KERNELS, NB, OUTPUTS
from kernel_args import valid_args as valid


class FakeTensor:
    """Looks like a tensor (data_ptr, shape, stride, dtype, device) but is not one."""

    shape = (4, 2, 1, 4)
    dtype = torch.float32
    device = torch.device("cpu")
    layout = torch.strided
    is_nested = False

    def data_ptr(self):
        return 16

    def stride(self):
        return (8, 4, 4, 1)


NOT_TENSORS = [None, [1.0, 2.0], "tensor", 3, FakeTensor()]

# ---------------------------------------------------------------- kernels

TENSOR_ARGS = [(k, a) for k in KERNELS for a in valid(k) if isinstance(valid(k)[a], torch.Tensor)]


def call(kernel, args):
    return getattr(fkv, kernel)(**args)


def expect_untouched(kernel, mutate, exc, match=None):
    """Calls `kernel` with valid args changed by `mutate`, expects `exc`, and checks no output changed."""
    args = valid(kernel)
    mutate(args)
    before = {k: v.clone() for k, v in args.items()
              if k in OUTPUTS[kernel] and isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=match):
        call(kernel, args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{kernel} wrote {k} before refusing"


@pytest.mark.parametrize("kernel", KERNELS)
def test_valid_arguments_are_accepted(kernel):
    call(kernel, valid(kernel))


OPTIONAL = {("compact", "stats"), ("paged_attention_decode", "out")}


@pytest.mark.parametrize(
    "kernel, arg, bad",
    [(k, a, b) for k, a in TENSOR_ARGS for b in range(len(NOT_TENSORS)) if not ((k, a) in OPTIONAL and NOT_TENSORS[b] is None)],
)
def test_non_tensors_raise_argument_type_error_naming_the_argument(kernel, arg, bad):
    def mutate(a):
        a[arg] = NOT_TENSORS[bad]

    expect_untouched(kernel, mutate, fkv.ArgumentTypeError, match=arg)


@pytest.mark.parametrize("kernel, arg", TENSOR_ARGS)
def test_wrong_dtypes_raise_dtype_error(kernel, arg):
    def mutate(a):
        t = a[arg]
        a[arg] = t.to(torch.float64) if t.is_floating_point() else t.to(torch.float32)
        if t.dtype == torch.int64:
            a[arg] = t.to(torch.int32)

    expect_untouched(kernel, mutate, fkv.DTypeError, match=arg)


@pytest.mark.parametrize("kernel, arg", TENSOR_ARGS)
def test_wrong_ranks_raise_shape_error(kernel, arg):
    def mutate(a):
        a[arg] = a[arg].unsqueeze(0)

    expect_untouched(kernel, mutate, fkv.ShapeError, match=arg)


# Growing a cache's or the statistics' block count keeps a call valid: those are not size errors.
GROWABLE = {"key_cache", "stats"}


# A grown argument whose size is checked against another: the error names that other argument.
SIZE_ERROR_NAMES = {
    ("select_survivors", "scores"): "seq_lens",
    ("scorer_mlp", "scores"): "block_tables",
    ("compact", "survivors"): "block_tables",
    ("reshape_and_cache", "key"): "value",
}


@pytest.mark.parametrize(
    "kernel, arg",
    [(k, a) for k, a in TENSOR_ARGS if a not in GROWABLE and (k, a) != ("reshape_and_cache", "value_cache")],
)
def test_wrong_sizes_raise_shape_error(kernel, arg):
    def mutate(a):
        t = a[arg]
        a[arg] = torch.cat([t, t[:1]])

    if arg == "block_tables" or (kernel, arg) == ("paged_attention_decode", "query"):
        match = None
    else:
        match = SIZE_ERROR_NAMES.get((kernel, arg), arg)
    expect_untouched(kernel, mutate, fkv.ShapeError, match=match)


@pytest.mark.parametrize("kernel, arg", TENSOR_ARGS)
def test_meta_tensors_raise_device_error(kernel, arg):
    def mutate(a):
        a[arg] = torch.empty_like(a[arg], device="meta")

    expect_untouched(kernel, mutate, fkv.DeviceError, match=arg)


@pytest.mark.parametrize("kernel", KERNELS)
def test_outputs_may_not_alias_inputs(kernel):
    """An input replaced by a view into the output's memory is refused before any write."""
    out = OUTPUTS[kernel][0]
    args = valid(kernel)
    donor = next(k for k, v in args.items() if k != out and isinstance(v, torch.Tensor)
                 and v.dtype == args[out].dtype and v.numel() <= args[out].numel())

    def mutate(a):
        a[donor] = a[out].reshape(-1)[: a[donor].numel()].view(a[donor].shape)

    expect_untouched(kernel, mutate, fkv.InvalidArgumentError, match="shares memory")


def test_read_only_numpy_output_is_refused():
    q = np.zeros((1, 2, 4), np.float32)
    kc = np.zeros((2, 2, 1, 4), np.float32)
    out = np.zeros((1, 2, 4), np.float32)
    out.setflags(write=False)
    with pytest.raises(fkv.InvalidArgumentError, match="out is read-only"):
        fkv.paged_attention_decode(q, kc, kc.copy(), np.zeros((1, 1), np.int32), np.ones(1, np.int32),
                                   np.zeros(1, np.int32), out=out)


def test_numpy_bad_layouts():
    kc = np.zeros((2, 2, 1, 4), np.float32)
    key = np.zeros((3, 1, 4), np.float32)
    slots = np.zeros(3, np.int64)
    with pytest.raises(fkv.ShapeError, match="negative strides"):
        fkv.reshape_and_cache(key[::-1], key, kc, kc.copy(), slots)
    with pytest.raises(fkv.DTypeError, match="float64"):
        fkv.reshape_and_cache(key.astype(np.float64), key, kc, kc.copy(), slots)
    with pytest.raises(fkv.DTypeError, match="slot_mapping"):
        fkv.reshape_and_cache(key, key, kc, kc.copy(), slots.astype(">i8"))
    raw = np.zeros(3 * 4 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(3, 1, 4)
    with pytest.raises(fkv.InvalidArgumentError, match="aligned"):
        fkv.reshape_and_cache(raw, key, kc, kc.copy(), slots)


def test_strided_value_view_is_read_in_place():
    a = valid("paged_attention_decode")
    wide = torch.randn(NB, BS, H, 2 * D)
    a["value_cache"] = wide[..., D:]
    fkv.paged_attention_decode(**a)
    b = dict(a, value_cache=wide[..., D:].contiguous(), out=torch.zeros_like(a["out"]))
    fkv.paged_attention_decode(**b)
    assert torch.equal(a["out"], b["out"])


def test_mixed_numpy_and_torch_run_on_the_host():
    a = valid("reshape_and_cache")
    a["slot_mapping"] = a["slot_mapping"].numpy()
    fkv.reshape_and_cache(**a)


@pytest.mark.parametrize(
    "kernel, mutate, exc, match",
    [
        ("reshape_and_cache", lambda a: a.update(slot_mapping=torch.tensor([0, 12, 1])), fkv.InvalidArgumentError, "12"),
        ("reshape_and_cache", lambda a: a.update(key=a["key"][:, :, ::2]), fkv.ShapeError, "key"),
        ("reshape_and_cache", lambda a: a.update(key=a["key"].to(torch.float16)), fkv.DTypeError, "value"),
        ("paged_attention_decode", lambda a: a.update(block_tables=torch.tensor([[0, 1, 9], [3, 4, -1]], dtype=torch.int32)), fkv.InvalidArgumentError, "9"),
        ("paged_attention_decode", lambda a: a.update(live_starts=torch.tensor([1, 0], dtype=torch.int32)), fkv.InvalidArgumentError, "live window"),
        ("paged_attention_decode", lambda a: a.update(live_starts=torch.tensor([8, 0], dtype=torch.int32)), fkv.InvalidArgumentError, "live window"),
        ("paged_attention_decode", lambda a: a.update(seq_lens=torch.tensor([-2, 3], dtype=torch.int32)), fkv.InvalidArgumentError, "-2"),
        ("paged_attention_decode", lambda a: a.update(seq_lens=torch.tensor([7, 3], dtype=torch.int32)), fkv.ShapeError, "block table"),
        ("paged_attention_decode", lambda a: a.update(seq_lens=torch.tensor([2**31 - 1, 3], dtype=torch.int32)), fkv.ShapeError, "block table"),
        ("paged_attention_decode", lambda a: a.update(query=torch.randn(2, 3, D)), fkv.ShapeError, "3"),
        ("paged_attention_decode", lambda a: a.update(block_tables=a["block_tables"].t().contiguous().t()), fkv.ShapeError, "block_tables"),
        ("paged_attention_decode", lambda a: a.update(seq_lens=torch.tensor([6, 0, 3, 0], dtype=torch.int32)[::2]), fkv.ShapeError, "seq_lens"),
        ("paged_attention_decode", lambda a: a.update(scale=float("nan")), fkv.InvalidArgumentError, "scale"),
        ("paged_attention_decode", lambda a: a.update(scale="big"), fkv.ArgumentTypeError, "scale"),
        ("paged_attention_decode", lambda a: a.update(query=torch.randn(2, H * G, D).to(torch.float16)), fkv.DTypeError, "key_cache"),
        ("paged_attention_decode", lambda a: a.update(value_cache=torch.randn(NB, BS, H, D + 1)), fkv.ShapeError, "value_cache"),
        ("window_stats", lambda a: a.update(num_queries=torch.tensor([5, 1], dtype=torch.int32)), fkv.InvalidArgumentError, "num_queries"),
        ("window_stats", lambda a: a.update(num_queries=torch.tensor([-1, 1], dtype=torch.int32)), fkv.InvalidArgumentError, "num_queries"),
        ("window_stats", lambda a: a.update(stats=torch.zeros(NB, BS, H, G + 1, 8)), fkv.ShapeError, "group"),
        ("window_stats", lambda a: a.update(stats=torch.zeros(NB, BS, H, G, 9)), fkv.ShapeError, "stats"),
        ("window_stats", lambda a: a.update(stats=torch.zeros(NB, BS, H, 8, G).transpose(3, 4)), fkv.ShapeError, "stats"),
        ("scorer_mlp", lambda a: a.update(w1=torch.zeros(H, 16, 5)), fkv.ShapeError, "w1"),
        ("scorer_mlp", lambda a: a.update(b2=torch.zeros(H + 1)), fkv.ShapeError, "b2"),
        ("scorer_mlp", lambda a: a.update(scores=torch.zeros(2, H, 3)), fkv.InvalidArgumentError, "max_live"),
        ("select_survivors", lambda a: a.update(num_evict=torch.tensor([9, 0], dtype=torch.int32)), fkv.InvalidArgumentError, "num_evict"),
        ("select_survivors", lambda a: a.update(num_protected=-1), fkv.InvalidArgumentError, "num_protected"),
        ("select_survivors", lambda a: a.update(num_protected=2**70), fkv.InvalidArgumentError, "num_protected"),
        ("select_survivors", lambda a: a.update(num_protected="2"), fkv.ArgumentTypeError, "num_protected"),
        ("compact", lambda a: a.update(num_evict=torch.tensor([1, 0], dtype=torch.int32)), fkv.InvalidArgumentError, "block_size"),
        ("compact", lambda a: a.update(survivors=torch.tensor([[[3, 2, 0, 0], [1, 3, 0, 0]], [[0, 1, 2, 0]] * 2], dtype=torch.int32)), fkv.InvalidArgumentError, "ascending"),
        ("compact", lambda a: a.update(survivors=torch.tensor([[[2, 99, 0, 0], [1, 3, 0, 0]], [[0, 1, 2, 0]] * 2], dtype=torch.int32)), fkv.InvalidArgumentError, "99"),
        ("compact", lambda a: a.update(value_cache=a["key_cache"]), fkv.InvalidArgumentError, "shares memory"),
    ],
)
def test_bad_values_are_refused_before_any_write(kernel, mutate, exc, match):
    expect_untouched(kernel, mutate, exc, match=match)


def test_cuda_work_without_kernels_or_gpu_is_a_device_error():
    if fkv.gpu_available() and fkv.kernels_compiled():
        pytest.skip("this machine runs CUDA kernels; covered by test_cuda.py")
    if not torch.cuda.is_available():
        pytest.skip("torch cannot make CUDA tensors here (no GPU); the no-kernels path is covered with a GPU")
    a = {k: v.cuda() for k, v in valid("reshape_and_cache").items()}
    with pytest.raises(fkv.DeviceError, match="key_cache"):
        fkv.reshape_and_cache(**a)


# ---------------------------------------------------------------- configuration and manager


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: fkv.CacheConfig(-1, 8), fkv.ConfigError, "block_size"),
        (lambda: fkv.CacheConfig(16, 2**70), fkv.ConfigError, "num_blocks"),
        (lambda: fkv.CacheConfig(16, 2**31 - 1), fkv.ConfigError, "2147483647"),
        (lambda: fkv.CacheConfig("16", 8), fkv.ArgumentTypeError, "block_size"),
        (lambda: fkv.CacheConfig(16.0, 8), fkv.ArgumentTypeError, "block_size"),
        (lambda: fkv.CacheConfig(16, 8, eviction="yes"), fkv.ArgumentTypeError, "eviction"),
        (lambda: fkv.CacheConfig(16, 8, enable_prefix_caching="yes"), fkv.ArgumentTypeError, "enable_prefix_caching"),
        (lambda: fkv.EvictionConfig(-16, 16), fkv.ConfigError, "budget"),
        (lambda: fkv.EvictionConfig(16, 2**64), fkv.ConfigError, "interval"),
        (lambda: fkv.EvictionConfig(16, 0), fkv.ConfigError, "interval"),
        (lambda: fkv.EvictionConfig(16, 16, protect_prompt=1.5), fkv.ArgumentTypeError, "protect_prompt"),
        (lambda: fkv.CacheConfig.from_json('{"block_size": 0, "num_blocks": 1, "enable_prefix_caching": false, "eviction": null}'), fkv.ConfigError, "block_size"),
        (lambda: fkv.CacheConfig.from_json("[]"), fkv.ConfigError, "JSON"),
        (lambda: fkv.KvCacheManager("config"), fkv.ArgumentTypeError, "config"),
        (lambda: fkv.KvCacheManager(None), fkv.ArgumentTypeError, "config"),
    ],
)
def test_bad_configuration(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.fixture
def manager():
    m = fkv.KvCacheManager(fkv.CacheConfig(4, 16, enable_prefix_caching=True, eviction=fkv.EvictionConfig(8, 4)))
    m.add_sequence(1, [1, 2, 3, 4, 5])
    m.add_sequence(2, [1, 2, 3, 4, 6])
    m.fork(1, 3)
    m.add_sequence(4, [9])
    m.free(4)
    yield m
    check_consistent(m)
    m.add_sequence(100, [1, 2, 3])
    m.append(100, [4])
    assert m.seq_len(100) == 4
    m.free(100)
    check_consistent(m)


BAD_IDS = [
    (-1, fkv.InvalidArgumentError),
    (2**64, fkv.InvalidArgumentError),
    (2**100, fkv.InvalidArgumentError),
    ("1", fkv.ArgumentTypeError),
    (1.0, fkv.ArgumentTypeError),
    (None, fkv.ArgumentTypeError),
    (4, fkv.SequenceError),
    (12345, fkv.SequenceError),
]
BY_ID = ["append", "eviction_due", "compact", "free", "preempt", "seq_len", "live_start", "protected_len",
         "live_tokens", "blocks_held"]


@pytest.mark.parametrize("method", BY_ID)
@pytest.mark.parametrize("bad, exc", BAD_IDS)
def test_bad_and_freed_sequence_ids(manager, method, bad, exc):
    before = manager.snapshot()
    args = (bad, [1]) if method == "append" else (bad,)
    with pytest.raises(exc, match="seq_id|sequence"):
        getattr(manager, method)(*args)
    assert manager.snapshot() == before


@pytest.mark.parametrize(
    "prompt, exc, match",
    [
        ([], fkv.InvalidArgumentError, "empty prompt"),
        ("abc", fkv.ArgumentTypeError, "prompt"),
        (b"abc", fkv.ArgumentTypeError, "prompt"),
        (None, fkv.ArgumentTypeError, "prompt"),
        (7, fkv.ArgumentTypeError, "prompt"),
        ([1, -1], fkv.InvalidArgumentError, r"prompt\[1\] = -1"),
        ([2**32], fkv.InvalidArgumentError, r"prompt\[0\]"),
        ([1, 2.5], fkv.ArgumentTypeError, r"prompt\[1\]"),
        ([[1]], fkv.ArgumentTypeError, r"prompt\[0\]"),
        (torch.tensor([1.0, 2.0]), fkv.DTypeError, "prompt"),
        (torch.tensor([[1, 2]]), fkv.ShapeError, "prompt"),
        (torch.tensor([1, -3]), fkv.InvalidArgumentError, r"prompt\[1\] = -3"),
        (torch.empty(3, dtype=torch.int64, device="meta"), fkv.DeviceError, "prompt"),
        (np.array([1, 2], dtype=np.uint8), fkv.DTypeError, "prompt"),
        (list(range(17 * 4)), fkv.OutOfBlocksError, "out of KV-cache blocks"),
    ],
)
def test_bad_prompts(manager, prompt, exc, match):
    before = manager.snapshot()
    with pytest.raises(exc, match=match):
        manager.add_sequence(50, prompt)
    assert manager.snapshot() == before
    with pytest.raises(fkv.SequenceError):
        manager.seq_len(50)


def test_duplicate_and_unknown_ids_in_fork_and_add(manager):
    before = manager.snapshot()
    with pytest.raises(fkv.SequenceError, match="already exists"):
        manager.add_sequence(1, [1])
    with pytest.raises(fkv.SequenceError, match="already exists"):
        manager.fork(2, 1)
    with pytest.raises(fkv.SequenceError, match="unknown"):
        manager.fork(77, 78)
    with pytest.raises(fkv.InvalidArgumentError, match="child"):
        manager.fork(1, -5)
    assert manager.snapshot() == before


def test_bad_appends(manager):
    before = manager.snapshot()
    for tokens, exc in [([-1], fkv.InvalidArgumentError), ("x", fkv.ArgumentTypeError), (None, fkv.ArgumentTypeError),
                        ([2**40], fkv.InvalidArgumentError), (list(range(100)), fkv.OutOfBlocksError)]:
        with pytest.raises(exc):
            manager.append(1, tokens)
        assert manager.snapshot() == before
    assert manager.append(1, []) == []


def test_eviction_state_errors_leave_the_manager_consistent(manager):
    manager.append(2, list(range(7)))
    assert manager.eviction_due(2) is not None
    with pytest.raises(fkv.EvictionStateError):
        manager.append(2, [1])
    with pytest.raises(fkv.EvictionStateError):
        manager.compact(1)
    manager.compact(2)
    manager.append(2, [1])


def test_bad_block_table_requests(manager):
    with pytest.raises(fkv.SequenceError):
        manager.block_tables([1, 4])
    with pytest.raises(fkv.ArgumentTypeError, match="seq_ids"):
        manager.block_tables(5)
    with pytest.raises(fkv.InvalidArgumentError, match=r"seq_ids\[1\]"):
        manager.block_tables([1, -1])
    assert manager.block_tables([]).num_seqs == 0


@pytest.mark.parametrize("args, exc", [((-1, 5), fkv.InvalidArgumentError), ((5, 2**40), fkv.InvalidArgumentError),
                                       ((5, "9"), fkv.ArgumentTypeError), ((2**64, 1), fkv.InvalidArgumentError)])
def test_bad_max_blocks_held(manager, args, exc):
    with pytest.raises(exc):
        manager.max_blocks_held(*args)


def test_hierarchy_lets_callers_catch_builtins():
    assert issubclass(fkv.ConfigError, ValueError)
    assert issubclass(fkv.ShapeError, ValueError) and issubclass(fkv.ShapeError, fkv.InvalidArgumentError)
    assert issubclass(fkv.DTypeError, TypeError)
    assert issubclass(fkv.SequenceError, LookupError)
    assert issubclass(fkv.CudaError, RuntimeError)
    for name in fkv.errors.__all__:
        assert issubclass(getattr(fkv, name), fkv.Error)


def test_views_reaching_outside_their_memory_are_refused():
    """numpy's as_strided can forge a view past its buffer; it must be caught before any read."""
    small = np.zeros(16, np.float32)
    forged = np.lib.stride_tricks.as_strided(small, shape=(4, 1, 4), strides=(1 << 20, 16, 4))
    kc = np.zeros((2, 2, 1, 4), np.float32)
    with pytest.raises(fkv.ShapeError, match="outside the array that owns its memory"):
        fkv.reshape_and_cache(forged, forged, kc, kc.copy(), np.zeros(4, np.int64))
    inside = np.lib.stride_tricks.as_strided(small, shape=(4, 1, 4), strides=(16, 16, 4))
    fkv.reshape_and_cache(inside, inside, kc, kc.copy(), np.zeros(4, np.int64))
    big = torch.zeros(64)
    view = big[8:].view(14, 1, 4)
    out = torch.zeros(2, 2, 1, 4)
    fkv.reshape_and_cache(view[:3], view[:3], out, out.clone(), torch.zeros(3, dtype=torch.int64))
