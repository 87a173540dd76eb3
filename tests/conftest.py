"""Session-wide set-up that must precede the collection of any test module.

Triton reads TRITON_INTERPRET when a @triton.jit function is *defined*, its own standard library
(``tl.sum``, ...) included, and collecting a module that imports transformers or SGLang (e.g.
tests/accuracy/test_diagnose.py through benchmarks/accuracy/core_eval.py) imports Triton. The
kernel tests run the Triton kernels through the interpreter on a host without CUDA
(tests/kernels/conftest.py, same condition); set there only, it came after such an import in a
full run, and every interpreted kernel failed with "Cannot call @triton.jit'd outside of the
scope of a kernel". The servers never inherit it (tests/integration/conftest.py).
"""

import os

import torch

if not (torch.cuda.is_available() and os.environ.get("DYNSPLIT_TEST_INTERPRET", "0") == "0"):
    os.environ["TRITON_INTERPRET"] = "1"
