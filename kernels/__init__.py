"""Kernels of DynSplit-KV, installed as ``dynsplit_sglang.kernels``.

Public API (Triton on CUDA tensors, torch on CPU tensors; ``DYNSPLIT_KERNELS`` forces a side):
``block_summaries``, ``score_blocks``, ``sparse_decode_attention`` and the plan/run
``SparseDecodeWrapper``. Importing this package does not import Triton.
"""

from .dispatch import backend, block_summaries, score_blocks, sparse_decode_attention
from .wrapper import SparseDecodeWrapper

__all__ = [
    "SparseDecodeWrapper", "backend", "block_summaries", "score_blocks",
    "sparse_decode_attention",
]
