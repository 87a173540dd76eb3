"""Kernels of DynSplit-KV, installed as ``dynsplit_sglang.kernels``.

Public API: ``implementation(device, backend="auto")`` gives the ``Kernels`` of one side
(``block_summaries``, ``score_blocks``, ``sparse_decode_attention``: Triton on CUDA, torch on
CPU; ``DYNSPLIT_KERNELS`` forces a side), chosen once; the plan/run ``SparseDecodeWrapper``
chooses its own when it is built. Importing this package does not import Triton.
"""

from .dispatch import Kernels, implementation, resolve
from .wrapper import SparseDecodeWrapper

__all__ = ["Kernels", "SparseDecodeWrapper", "implementation", "resolve"]
