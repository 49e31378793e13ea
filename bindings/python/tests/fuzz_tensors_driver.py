"""Property-based fuzzing of the tensor entry points (run by test_fuzz_tensors.py in a subprocess, so
a segfault or abort is a counted failure): `python fuzz_tensors_driver.py KERNEL EXAMPLES`.

Each example starts from valid arguments of one kernel (outputs placed between canary guards) and
applies random mutations to its tensor arguments: another dtype, shape or rank; strides that are
negative, zero, overlapping or huge (numpy ``as_strided``, which no library checks); aliasing with
another argument; another memory owner (torch, numpy, numpy over a bytearray / mmap, a DLPack-only
object, a non-tensor). The contract checked for every example: the call returns or raises a
``foresightkv.Error`` (nothing else), a refused call writes nothing, and no call writes outside the
outputs it was given (the guards around every unmutated output stay intact)."""

import mmap
import sys

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import foresightkv as fkv
from kernel_args import OUTPUTS, DLPackOnly, valid_args

GUARD = 64
SENTINEL = 12345


def guarded(t):
    """A copy of `t` placed between two guard regions of one buffer; returns (view, buffer, n)."""
    n = t.numel()
    buf = torch.full((n + 2 * GUARD,), SENTINEL, dtype=t.dtype)
    view = buf[GUARD:GUARD + n].view(t.shape)
    view.copy_(t)
    return view, buf, n


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
          torch.bool, torch.complex64]
KEEP = []  # buffers (bytearrays, mmaps) kept alive for the views made over them


def to_numpy_over(owner, arr):
    """A numpy array with `arr`'s contents in memory owned by a bytearray or an mmap."""
    arr = np.ascontiguousarray(arr)
    nbytes = max(arr.nbytes, 1)
    raw = bytearray(nbytes) if owner == "bytearray" else mmap.mmap(-1, max(nbytes, 1))
    KEEP.append(raw)
    out = np.frombuffer(raw, dtype=arr.dtype, count=arr.size).reshape(arr.shape)
    out[...] = arr
    return out


def mutate(draw, args, name, names):
    t = args[name]
    kind = draw(st.sampled_from(["dtype", "shape", "numpy_strides", "torch_strides", "alias", "owner",
                                 "negative", "zero_stride", "noncontig", "not_tensor"]))
    if not isinstance(t, torch.Tensor):
        return kind
    if kind == "dtype":
        args[name] = t.to(draw(st.sampled_from(DTYPES)))
    elif kind == "shape":
        shape = list(t.shape)
        op = draw(st.sampled_from(["grow", "shrink", "zero", "add_dim", "drop_dim"]))
        if op == "add_dim":
            shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
        elif op == "drop_dim" and shape:
            shape.pop(draw(st.integers(0, len(shape) - 1)))
        elif shape:
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] = {"grow": shape[i] + draw(st.integers(1, 3)), "shrink": max(shape[i] - 1, 0), "zero": 0}[op]
        args[name] = torch.zeros(shape, dtype=t.dtype)
    elif kind == "numpy_strides":
        a = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        item = a.itemsize
        strides = tuple(draw(st.sampled_from([0, item, -item, 2 * item, 1 << 20, 1 << 40, 3])) for _ in a.shape)
        base = a if draw(st.booleans()) else to_numpy_over(draw(st.sampled_from(["bytearray", "mmap"])), a)
        args[name] = np.lib.stride_tricks.as_strided(base, shape=a.shape, strides=strides)
    elif kind == "torch_strides":
        strides = tuple(draw(st.sampled_from([0, 1, 2, 3, 7])) for _ in t.shape)
        try:
            args[name] = t.as_strided(t.shape, strides)
        except RuntimeError:
            pass
    elif kind == "alias":
        others = [n for n in names if n != name and isinstance(args[n], torch.Tensor) and args[n].dtype == t.dtype]
        if others:
            src = args[draw(st.sampled_from(others))]
            flat = src.view(-1) if src.is_contiguous() else None
            if flat is not None and flat.numel() >= t.numel():
                off = draw(st.integers(0, flat.numel() - t.numel()))
                args[name] = flat[off:off + t.numel()].view(t.shape)
    elif kind == "owner":
        owner = draw(st.sampled_from(["numpy", "bytearray", "mmap", "dlpack", "numpy_readonly"]))
        if t.dtype == torch.bfloat16:
            return kind
        if owner == "numpy":
            args[name] = t.numpy()
        elif owner == "numpy_readonly":
            a = t.numpy().copy()
            a.setflags(write=False)
            args[name] = a
        elif owner == "dlpack":
            args[name] = DLPackOnly(t)
        else:
            args[name] = to_numpy_over(owner, t.numpy())
    elif kind == "negative" and t.dim() > 0 and t.dtype != torch.bfloat16:
        args[name] = t.numpy()[::-1]
    elif kind == "zero_stride" and t.dim() > 0:
        args[name] = t[:1].expand(t.shape) if t.shape[0] > 0 else t
    elif kind == "noncontig" and t.dim() > 1:
        args[name] = t.transpose(0, 1)
    elif kind == "not_tensor":
        args[name] = draw(st.sampled_from([None, 3, "x", [1.0, 2.0], memoryview(b"abcd"), object()]))
    return kind


def snapshot(values):
    return [v.clone() for v in values]


def run(kernel, examples):
    counts = {"accepted": 0, "refused": 0}
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def prop(data):
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
        args, outputs = valid_args(kernel, gen), OUTPUTS[kernel]
        guards = {}
        for o in outputs:
            args[o], buf, n = guarded(args[o])
            guards[o] = (buf, n)
        originals = dict(args)
        names = list(args)
        mutated = set()
        for _ in range(data.draw(st.integers(0, 3))):
            name = data.draw(st.sampled_from(names))
            mutate(data.draw, args, name, names)
            mutated.add(name)
        bufs = [b for b, _ in guards.values()]
        before = snapshot(bufs)
        try:
            getattr(fkv, kernel)(**args)
            refused = False
        except fkv.Error:
            refused = True
        counts["refused" if refused else "accepted"] += 1
        if refused:
            for b, was in zip(bufs, before):
                assert torch.equal(b, was), f"{kernel} wrote before refusing (mutated {sorted(mutated)})"
        for o, (buf, n) in guards.items():
            if o in mutated or originals[o] is not args[o]:
                continue
            assert torch.all(buf[:GUARD] == SENTINEL) and torch.all(buf[GUARD + n:] == SENTINEL), \
                f"{kernel} wrote outside {o} (mutated {sorted(mutated)})"

    prop()
    print(f"fuzz {kernel}: {examples} examples ok ({counts['accepted']} calls accepted, "
          f"{counts['refused']} refused, shrinking included)")


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
