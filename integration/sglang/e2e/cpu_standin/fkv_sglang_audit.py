"""Test-environment instrumentation of SGLang's token allocator for the end-to-end runs (loaded in every
process of the e2e venv by a .pth file; it does nothing unless ``FKV_E2E_AUDIT`` names a directory).

When SGLang's ``TokenToKVPoolAllocator`` module is imported, its ``alloc``/``free``/``clear`` are
wrapped to keep the exact set of slots handed out. A slot freed while not handed out (a double free,
or a free of a slot never allocated) or handed out while already held is recorded as a violation.
After every free the process writes ``<dir>/alloc-<pid>.json``: pool size, slots held now, the most
ever held at once, call counts and the violations (the first 20), so that a test in another process
can check that the pool returned to full and that no slot was freed twice. When foresightkv's SGLang
backend reserves its query rings at start-up, the state also records ``rings``: the request rows they
cover, their bytes and the engine's ``max_running_requests``."""

import json
import os
import threading
import importlib.abc
import importlib.util
import sys
from typing import Callable, Dict, List

_hooks: Dict[str, List[Callable]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs registered callbacks right after a module named in ``_hooks`` finished importing."""

    def find_spec(self, name, path=None, target=None):
        if name not in _hooks:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            for fn in _hooks.pop(name, []):
                fn(module)

        loader.exec_module = exec_then_hook
        return spec


_finder = _AfterImport()


def after_import(name: str, fn: Callable) -> None:
    """Calls ``fn(module)`` once module ``name`` has been imported (now, if it already is)."""
    if name in sys.modules:
        fn(sys.modules[name])
        return
    _hooks.setdefault(name, []).append(fn)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)



ENV = "FKV_E2E_AUDIT"
MODULE = "sglang.srt.mem_cache.allocator.token"
BATCH_MODULE = "sglang.srt.managers.schedule_batch"
RINGS_MODULE = "foresightkv_sglang.backend"


class AllocatorAudit:
    """The slots held from one allocator, and what went wrong."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.held = set()
        self.max_held = 0
        self.size = 0
        self.allocs = 0
        self.frees = 0
        self.freed_slots = 0
        self.violations = []
        self.retracted = 0
        self.rings = None

    def on_alloc(self, slots) -> None:
        """Records the slots ``alloc`` returned (None: the allocator had too few)."""
        if slots is None:
            return
        ids = [int(x) for x in slots.tolist()]
        with self.lock:
            self.allocs += 1
            again = [s for s in ids if s in self.held]
            if again:
                self.violations.append(f"alloc handed out held slots {again[:8]}")
            self.held.update(ids)
            self.max_held = max(self.max_held, len(self.held))

    def on_free(self, slots) -> None:
        """Records a ``free`` and writes the state file."""
        ids = [int(x) for x in slots.reshape(-1).tolist()]
        with self.lock:
            self.frees += 1
            self.freed_slots += len(ids)
            bad = [s for s in ids if s not in self.held]
            dup = len(ids) != len(set(ids))
            if bad:
                self.violations.append(f"freed slots not held (double free?) {bad[:8]}")
            if dup:
                self.violations.append("one free call named a slot twice")
            self.held.difference_update(ids)
            self.write()

    def on_clear(self, size: int) -> None:
        """``clear`` gives every slot back (start-up, flush)."""
        with self.lock:
            self.held.clear()
            self.size = size
            self.write()

    def write(self) -> None:
        """Writes the state atomically (the caller holds the lock)."""
        state = {
            "pid": os.getpid(),
            "size": self.size,
            "held": len(self.held),
            "max_held": self.max_held,
            "allocs": self.allocs,
            "frees": self.frees,
            "freed_slots": self.freed_slots,
            "retracted": self.retracted,
            "violations": self.violations[:20],
            "rings": self.rings,
        }
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.path)


_audit = None


def _the_audit() -> AllocatorAudit:
    """This process's audit (one state file per process)."""
    global _audit
    if _audit is None:
        _audit = AllocatorAudit(os.path.join(os.environ[ENV], f"alloc-{os.getpid()}.json"))
    return _audit


def _count_retractions(mod) -> None:
    """Wraps ``ScheduleBatch.retract_decode`` to count the requests SGLang retracts for memory."""
    cls = mod.ScheduleBatch
    retract = cls.retract_decode

    def counted_retract(self, *args, **kwargs):
        out = retract(self, *args, **kwargs)
        audit = _the_audit()
        with audit.lock:
            audit.retracted += len(out[0])
            audit.write()
        return out

    cls.retract_decode = counted_retract


def _instrument(mod) -> None:
    """Wraps the allocator class of ``mod`` (SGLang's token allocator module)."""
    cls = mod.TokenToKVPoolAllocator
    if getattr(cls, "_fkv_audited", False):
        return
    audit = _the_audit()
    alloc, free, clear, group_end = cls.alloc, cls.free, cls.clear, cls.free_group_end

    def audited_alloc(self, need_size):
        out = alloc(self, need_size)
        audit.on_alloc(out)
        return out

    def audited_free(self, free_index):
        # A free inside a free group counts when it is called; free_group_end frees the group again.
        if free_index.numel() and not getattr(self, "_fkv_group_end", False):
            audit.on_free(free_index)
        return free(self, free_index)

    def audited_group_end(self):
        self._fkv_group_end = True
        try:
            return group_end(self)
        finally:
            self._fkv_group_end = False

    def audited_clear(self):
        out = clear(self)
        audit.on_clear(int(self.size))
        return out

    cls.alloc, cls.free, cls.clear, cls.free_group_end = audited_alloc, audited_free, audited_clear, audited_group_end
    cls._fkv_audited = True
    cls._fkv_audit = audit


def _record_rings(mod) -> None:
    """Wraps foresightkv's ``backend._reserve_rings`` to record what the backend reserved."""
    reserve = mod._reserve_rings

    def recorded(engine, model_runner):
        out = reserve(engine, model_runner)
        audit = _the_audit()
        with audit.lock:
            audit.rings = {
                "rows": int(model_runner.req_to_token_pool.size),
                "bytes": int(engine.reserved_bytes() - engine.stats_bytes()),
                "max_running_requests": int(model_runner.max_running_requests),
            }
            audit.write()
        return out

    mod._reserve_rings = recorded


if os.environ.get(ENV):
    os.makedirs(os.environ[ENV], exist_ok=True)
    after_import(MODULE, _instrument)
    after_import(RINGS_MODULE, _record_rings)
    after_import(BATCH_MODULE, _count_retractions)
