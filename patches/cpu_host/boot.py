"""Start-up workarounds that let stock SGLang 0.5.23 run on a CPU-only host.

Runs in every Python process of the venv (including SGLang's spawn-started scheduler and
detokenizer) from the ``.pth`` file that ``python -m dynsplit_sglang.patches.cpu_host install``
writes. It must run before SGLang imports ``sglang.srt.mem_cache.memory_pool``, which is why
SGLang's plugin loader (``sglang.srt.plugins.load_plugins``) cannot carry it: launch_server.py
and scheduler.py have imported memory_pool by the time plugins load. It imports neither torch
nor sglang, and never raises.

What it does, only on a CPU host (no ``/dev/nvidia0``, ``/dev/kfd`` or ``nvidia-smi``;
``DYNSPLIT_CPU_HOST=1``/``0`` forces it on/off):

1. ``SGLANG_USE_CPU_ENGINE=1`` (setdefault). SGLang 0.5.23's ``sglang.srt.utils.common.is_cpu``
   and ``sglang.srt.platforms._resolve_platform`` only pick the CPU platform with it; without it
   model construction fails in ``get_rope`` (``ModuleNotFoundError: vllm``).
2. The ``sgl_kernel`` stand-in (``shim/sgl_kernel``) is appended to ``sys.path`` when no real
   ``sgl_kernel`` is installed. SGLang 0.5.23 imports ``sgl_kernel.*_cpu`` ops at module level on
   its CPU path (e.g. ``sglang.srt.mem_cache.allocation``, ``sglang.kernels.ops.kvcache.cache_move``,
   ``sglang.kernels.ops.speculative.reconstruct_tree``); the real CPU build needs AMX/AVX-512 and
   the PyPI wheels are CUDA-only.
3. ``sys.modules["torchvision._meta_registrations"]`` is pre-seeded with an empty module. The PyPI
   torchvision 0.28.0 wheel is CUDA-linked; with CPU torch 2.13 its ops do not load and
   ``torchvision/__init__.py`` dies registering meta kernels for ``torchvision::nms``, which breaks
   ``import sglang.srt...`` and ``transformers.LlamaConfig``.
4. ``THP_MEM_ALLOC_ENABLE=1`` (setdefault): torch's CPU allocator then asks for transparent huge
   pages (``madvise``) for tensors of 2 MiB and more, the KV pool among them. Not a fix but the
   one setting that must also be in place before torch allocates: a decode step that reads
   selected rows scattered over the pool takes a TLB miss per 4 KiB page otherwise (32k tokens,
   1/16, 8 KV heads, d128: fused attention 8.0 ms with 4 KiB pages, 5.0 ms with huge pages).
   Dense attention runs under the same setting.
"""

import importlib.util
import os
import shutil
import sys
import types

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")
_TV_META = "torchvision._meta_registrations"


def is_cpu_host() -> bool:
    forced = os.environ.get("DYNSPLIT_CPU_HOST")
    if forced in ("0", "1"):
        return forced == "1"
    has_gpu = (
        os.path.exists("/dev/nvidia0")
        or os.path.exists("/dev/kfd")
        or shutil.which("nvidia-smi") is not None
    )
    return not has_gpu


def in_effect() -> list[str]:
    """Names of the workarounds active in this process (derived from state, so it is the same
    whether the boot ran from the .pth file or from a normal import)."""
    names = []
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        names.append("SGLANG_USE_CPU_ENGINE")
    if SHIM_DIR in sys.path:
        names.append("sgl_kernel-shim")
    if getattr(sys.modules.get(_TV_META), "__dynsplit_stub__", False):
        names.append("torchvision-meta-registrations")
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        names.append("THP_MEM_ALLOC_ENABLE")
    return names


def apply() -> list[str]:
    """Apply the workarounds (idempotent); return the names of those in effect."""
    if not is_cpu_host():
        return in_effect()
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if SHIM_DIR not in sys.path and importlib.util.find_spec("sgl_kernel") is None:
        sys.path.append(SHIM_DIR)
    if "torchvision" not in sys.modules and _TV_META not in sys.modules:
        stub = types.ModuleType(_TV_META, "empty stand-in, see dynsplit_sglang.patches.cpu_host.boot")
        stub.__dynsplit_stub__ = True
        sys.modules[_TV_META] = stub
    return in_effect()


try:
    apply()
except Exception as exc:  # a broken start-up hook must not take down every Python process
    print(f"dynsplit-sglang cpu_host boot failed: {exc!r}", file=sys.stderr)
