"""Choose the kernel implementation once, for a device, as FlashInfer's ``backend="auto"`` does.

``implementation(device, backend)`` returns the ``Kernels`` of one side; whoever runs kernels
every step (the SparseDecodeWrapper, the compressor) resolves it once, when it is built:

* ``triton``: the Triton kernels (``summaries``, ``scoring``, ``sparse_decode``);
* ``torch``: ``kernels.cpu``, faster CPU formulations checked against the core's twins;
* ``twin``: the core's torch twins themselves;
* ``auto`` (default): ``DYNSPLIT_KERNELS`` if set (e.g. ``DYNSPLIT_KERNELS=triton
  TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors in the tests), else Triton on a
  CUDA device and torch elsewhere.

Triton is imported only when a Triton side is built, so the core and CPU users never pay for it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch

SIDES = ("triton", "torch", "twin")
ENV = "DYNSPLIT_KERNELS"


def resolve(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """The side `backend` means on `device`: 'triton', 'torch' or 'twin'."""
    mode = backend.strip().lower()
    if mode == "auto":
        mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if mode not in SIDES + ("auto",):
            raise ValueError(f"{ENV}={mode!r}: expected one of {('auto',) + SIDES}")
    elif mode not in SIDES:
        raise ValueError(f"kernel backend {backend!r}: expected one of {('auto',) + SIDES}")
    if mode == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return mode


@dataclass(frozen=True)
class Kernels:
    """The kernels of one side. Keyword options (counts, num_splits, mid, ...) steer the Triton
    launchers only; they never change a result, so the torch sides ignore them."""

    side: str
    block_summaries: Callable  # see core.mapping.block_summaries
    score_blocks: Callable  # see core.selection.score_blocks
    sparse_decode_attention: Callable  # see core.attention.sparse_decode_attention
    block_summaries_layers: Callable  # see core.mapping.block_summaries_layers


def _per_layer(block_summaries: Callable) -> Callable:
    """block_summaries_layers as one launch per layer (the Triton side: each launch is already
    one kernel over every block)."""

    def layers(k_buffers, token_slots, table, out_center, out_radius, out_index, max_block_len,
               spread=None):
        for li, k in enumerate(k_buffers):
            block_summaries(k, token_slots, table, out_center[li], out_radius[li], out_index,
                            max_block_len, spread)

    return layers


def _ignoring_triton_options(fn: Callable) -> Callable:
    accepted = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    return call


def implementation(device: torch.device | str = "cpu", backend: str = "auto") -> Kernels:
    side = resolve(backend, device)
    if side == "triton":
        mod = functools.partial(importlib.import_module, package=__package__)
        summaries = mod(".summaries").block_summaries
        return Kernels(side, summaries, mod(".scoring").score_blocks,
                       mod(".sparse_decode").sparse_decode_attention, _per_layer(summaries))
    from . import cpu

    impl = cpu if side == "torch" else cpu.twins
    return Kernels(side, *(_ignoring_triton_options(f) for f in (
        impl.block_summaries, impl.score_blocks, impl.sparse_decode_attention,
        impl.block_summaries_layers)))
