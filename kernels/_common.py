"""Helpers shared by the Triton launchers (imported only by modules that import triton)."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_in_fp32(*dtypes: torch.dtype) -> bool:
    """Whether a kernel must upcast its tl.dot operands to fp32 (with IEEE precision).

    fp32 inputs: the twins accumulate in exact fp32, and Triton's default TF32 would lose ~3
    decimal digits. Mixed dtypes: no common tensor-core type. bf16 under the interpreter: its
    bf16 tl.dot returns garbage (loads and casts are fine), so the test path upcasts; on a GPU
    bf16/fp16 operands go to the tensor cores with fp32 accumulation.
    """
    if any(d == torch.float32 for d in dtypes) or len(set(dtypes)) > 1:
        return True
    return interpreting() and dtypes[0] == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (host query, cached: no sync). The interpreter
    runs programs one after another, so there it pretends to have one SM."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    # Kernels address the last dimension with unit stride (vectorised loads); everything else
    # goes through strides, so pool buffers are never copied.
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got {t.stride()}")
