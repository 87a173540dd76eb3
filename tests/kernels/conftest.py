"""Kernel tests run the Triton kernels through the interpreter on CPU tensors (no GPU here).

TRITON_INTERPRET is read when a @triton.jit function is *defined*, so it is set at import of
this conftest, before any kernel module is imported; kernel modules imported earlier in the
session (by other test folders) are dropped so they are redefined under the interpreter.
On a host with CUDA the same tests run on the GPU instead (compiled kernels).
"""

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("DYNSPLIT_TEST_INTERPRET", "0") == "0"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("summaries", "scoring", "sparse_decode"):
        full = f"dynsplit_sglang.kernels.{name}"
        if full in sys.modules:
            del sys.modules[full]
            parent = sys.modules.get("dynsplit_sglang.kernels")
            if parent is not None and hasattr(parent, name):
                delattr(parent, name)


@pytest.fixture
def device():
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def triton_side(monkeypatch):
    """Kernels chosen during the test (backend "auto") are the Triton ones (on CPU tensors:
    the interpreter)."""
    monkeypatch.setenv("DYNSPLIT_KERNELS", "triton")


@pytest.fixture(params=[1, 2, 3], ids=lambda t: f"{t}threads")
def threads(request):
    """torch's thread count, which the threaded build splits its loops over."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
