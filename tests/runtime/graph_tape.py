"""A CPU stand-in for CUDA-graph capture and replay, for testing code meant to be captured.

``GraphTape`` records every aten op run inside it (a TorchDispatchMode). ``replay()`` runs the
recorded ops again on the very same tensors and writes each result into the tensor the capture
produced: what a CUDA graph replay does. No Python of the captured code runs at replay, so
anything it decided on the host at capture (a shape, a branch, a Python int read from a tensor)
stays frozen, and anything it reads must be refreshed in place before the replay.

Capture records as violations what a real capture would reject or silently freeze: host reads
of device values (``.item()``, ``.tolist()``, ``bool(t)``), data-dependent output shapes
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``) and tensors built from host
data (``torch.tensor(list)``).
"""

from __future__ import annotations

import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_HOST_OR_DYNAMIC = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.lift_fresh.default, aten._unique2.default, aten.unique_consecutive.default,
    aten.unique_dim.default, aten.argwhere.default,
}


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _write(recorded, result) -> None:
    if isinstance(recorded, torch.Tensor):
        if recorded is not result and not _same_memory(recorded, result):
            recorded.copy_(result)
    elif isinstance(recorded, (tuple, list)):
        for r, x in zip(recorded, result):
            _write(r, x)


class GraphTape(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []
        self.violations: list[str] = []
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_OR_DYNAMIC or (
                func is aten.index.Tensor
                and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.violations.append(str(func))
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def __enter__(self):
        # Only the capturing thread's reads count: the counters' writer thread (runtime/report.py)
        # reads its own snapshot whenever it runs, outside any capture.
        capturing = threading.get_ident()
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def flagged(t, *a, _name=name, _original=original, **k):
                if threading.get_ident() == capturing:
                    self.violations.append(f"Tensor.{_name}")
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, flagged)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                _write(out, func(*args, **kwargs))
