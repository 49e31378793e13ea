"""Test-environment stand-in for the compiled op library of SGLang's kernel package (sgl-kernel), used
only by the SGLang end-to-end tests on CPU (scripts/e2e_env.sh puts this folder on the e2e venv's path).

The registry's sgl-kernel 0.4.10 wheel is a CUDA build: on a machine without the CUDA driver its op
library fails to load (``libcuda.so.1``), and ``import sgl_kernel`` then tries a plain ``import
common_ops`` as its documented last resort (``sgl_kernel/load_utils.py``). SGLang 0.5.23 on CPU
(``SGLANG_USE_CPU_ENGINE=1``) imports sgl_kernel's pure-Python CPU wrappers at start-up; the CPU build
that would register their ``torch.ops.sgl_kernel.*_cpu`` ops is not on the registry (and needs AVX-512,
which this machine lacks). This module lets the real package import and defines no op: a dense model
served with ``torch_native`` or foresightkv calls none of them, and any op that were called would fail
loudly with torch's own "no attribute" error. It touches neither attention nor KV management."""

#: The ``torch.ops.sgl_kernel`` ops this stand-in defines (none; integration/sglang/README.md lists them).
STANDIN_OPS: tuple = ()
