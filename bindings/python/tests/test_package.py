"""The package surface: the stubs cover the native module (names and parameter names), py.typed
ships, and info() reports this build."""

import ast
import inspect
import pathlib

import foresightkv
from foresightkv import _native

STUB = pathlib.Path(foresightkv.__file__).with_name("_native.pyi")


def stub_tree():
    return ast.parse(STUB.read_text())


def runtime_params(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [p for p in sig.parameters if p not in ("self", "cls", "$self", "$cls")]


def stub_params(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return [n for n in names if n not in ("self", "cls")]


def test_py_typed_and_stub_ship_with_the_package():
    assert STUB.exists()
    assert STUB.with_name("py.typed").exists()


def test_stubs_name_exactly_the_native_public_api():
    tree = stub_tree()
    stubbed = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    stubbed |= {t.id for n in tree.body if isinstance(n, ast.AnnAssign) for t in [n.target] if isinstance(t, ast.Name)}
    runtime = {n for n in dir(_native) if not n.startswith("_")} | {"__version__"}
    aliases = {"TensorLike", "Tokens", "PathLike"}
    assert stubbed - aliases == runtime - aliases


def test_stub_parameters_match_the_runtime_signatures():
    tree = stub_tree()
    checked = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            got = runtime_params(getattr(_native, node.name))
            if got is not None:
                assert got == stub_params(node), node.name
                checked += 1
        if isinstance(node, ast.ClassDef):
            cls = getattr(_native, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.decorator_list and item.name != "__eq__":
                    target = cls if item.name == "__init__" else getattr(cls, item.name)
                    got = runtime_params(target)
                    if got is not None:
                        assert got == stub_params(item), f"{node.name}.{item.name}"
                        checked += 1
                if isinstance(item, ast.FunctionDef) and any(
                        isinstance(d, ast.Name) and d.id == "staticmethod" for d in item.decorator_list):
                    got = runtime_params(getattr(cls, item.name))
                    if got is not None:
                        assert got == stub_params(item), f"{node.name}.{item.name}"
                        checked += 1
    assert checked > 30


def test_info_reports_this_build():
    info = foresightkv.info()
    assert info["version"] == foresightkv.__version__
    assert info["kernels_embedded"] == foresightkv.kernels_compiled()
    assert isinstance(info["architectures"], list)
    if info["kernels_embedded"]:
        assert any("sm_80" in a for a in info["architectures"])
    assert foresightkv.gpu_available() == bool(info["gpus"])
