"""Fused CPU kernels (native.c): built with the host's C compiler on first use, loaded by ctypes.

No torch headers and no Python extension module: the C file is four plain functions (score,
keep, attend, and the three as one layer) over raw fp32 / int64 pointers, so it compiles in
about a second with `cc` and needs nothing from PyPI.
Built with ``-fopenmp`` where the compiler has it (else serial): its loops then run on the
OpenMP team torch already runs (the same ``libgomp.so.1``), with torch's thread count.
The shared object is cached under ``$DYNSPLIT_CACHE_DIR/native`` (default
``~/.cache/dynsplit_sglang/native``), named by a hash of the source, the flags and this CPU
(``-march=native``: a cached build never runs on another kind of CPU).

``load()`` returns the library, or None where it cannot be built (no compiler, a read-only
cache, ``DYNSPLIT_NATIVE=0``); the planned CPU step then keeps its torch formulation
(kernels/cpu.py). The wrappers below check every shape, dtype, layout and index range before
calling into C, so a bad argument raises here instead of reading outside a tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
# Reassociation lets the dot products keep several partial sums (finite-math is not assumed:
# masked logits are -inf).
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math", "-funroll-loops", "-shared", "-fPIC"]
THREADED = ["-fopenmp"]  # tried first; a compiler without OpenMP builds the serial loops

_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("DYNSPLIT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "dynsplit_sglang"
    return base / "native"


def _build(extra: list) -> Path:
    src = SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    flags = FLAGS + extra + os.environ.get("DYNSPLIT_NATIVE_CFLAGS", "").split()
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_id().encode())
    out = _cache_dir() / f"dsnative-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)  # atomic: a concurrent builder loads a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load():
    """The compiled library (ctypes.CDLL), or None where it cannot be built or is disabled."""
    if os.environ.get("DYNSPLIT_NATIVE", "1") == "0":
        return None
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"] = _load_once()
        return _STATE["lib"]


def _load_once():
    for extra in (THREADED, []):
        try:
            lib = ctypes.CDLL(str(_build(extra)))
            break
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or e
    else:
        warnings.warn(f"dynsplit: the fused CPU kernels could not be built ({detail}); the "
                      "torch formulation runs instead", RuntimeWarning, stacklevel=3)
        return None
    lib.threaded = bool(extra)
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.ds_score.argtypes = [p] * 6 + [i64] * 6
    lib.ds_score.restype = None
    lib.ds_attend.argtypes = [p] * 8 + [f32] + [i64] * 8
    lib.ds_attend.restype = None
    lib.ds_keep.argtypes = [p] * 11 + [i64] * 6
    lib.ds_keep.restype = None
    lib.ds_layer.argtypes = [ctypes.POINTER(LayerArgs)]
    lib.ds_layer.restype = None
    return lib


def threads(lib) -> int:
    """Threads a call splits its work over: torch's intra-op count, 1 for a serial build."""
    return torch.get_num_threads() if getattr(lib, "threaded", False) else 1


MIN_PART = 64  # entries: a shorter part costs more in its merge than its thread saves


def attend_splits(lists: int, n: int, t: int) -> int:
    """Parts per attention list (ds_attend's S): 1 where the lists alone keep the t threads
    evenly busy; else the fewest parts that do (a multiple of t, or 4 per thread), each at
    least MIN_PART entries. 3 KV heads of one request on 2 threads: 2 parts each."""
    s = 1
    while (t > 1 and (lists * s) % t and lists * s < 4 * t and n // (s + 1) >= MIN_PART):
        s += 1
    return s


def attend_work(lib, b: int, hkv: int, g: int, n: int, dv: int) -> int:
    """float32 elements of ds_attend's work buffer for these shapes."""
    t = threads(lib)
    s = attend_splits(b * hkv, n, t)
    chunk = -(-n // s)
    return t * g * (chunk + 2) + (b * hkv * s * g * (dv + 2) if s > 1 else 0)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors: fp32 on the CPU, each contiguous."""
    # is_cpu, not device.type: no device object per tensor (this runs twice per layer)
    return all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check_rows(index_max: int, limit: int, what: str) -> None:
    """index_max: the largest index the call can read (taken by the caller at plan time, so the
    per-layer call reads nothing back from a tensor)."""
    if index_max >= limit:
        raise IndexError(f"dynsplit native kernel: {what} index {index_max} out of range "
                         f"[0, {limit})")


def index_max(index: torch.Tensor) -> int:
    """The largest entry of an index tensor, -1 if none (plan time: reads the tensor)."""
    return int(index.max()) if index.numel() else -1


def score(lib, q, center, radius, index, l2, top: int) -> torch.Tensor:
    """float32 [B, Hkv, NB]: core.selection.score_blocks without the -inf mask (0 where
    index < 0). q [B, Hq, D]; center, radius [M, Hkv, D]; index int64 [B, NB] (entries >= -1,
    at most `top`: index_max); l2 uint8 [B]."""
    b, hq, d = q.shape
    m, hkv, _ = center.shape
    nb = index.shape[1]
    if not (supports(q, center, radius) and radius.shape == center.shape
            and center.shape[2] == d and hq % hkv == 0 and index.dtype == torch.int64
            and index.is_contiguous() and index.shape[0] == b and l2.dtype == torch.uint8
            and l2.shape == (b,) and l2.is_contiguous()):
        raise ValueError("dynsplit native score: unsupported shapes, dtypes or layout")
    _check_rows(top, m, "summary")
    out = torch.empty(b, hkv, nb, dtype=torch.float32)
    lib.ds_score(_ptr(q), _ptr(center), _ptr(radius), _ptr(index), _ptr(l2), _ptr(out), b, hkv,
                 hq // hkv, d, nb, threads(lib))
    return out


def attend(lib, q, k_rows, v_rows, rows, valid, scale: float, work: torch.Tensor, top: int):
    """(out [B, Hq, Dv] float32, lse [B, Hq]): attention of each (request, KV head) over the
    pool rows rows[b, h, :] (int64, at most top, a negative one is padding; k_rows [R, D],
    v_rows [R, Dv]) where valid (bool or uint8). work: float32 scratch of at least
    attend_work(...) elements."""
    b, hq, d = q.shape
    hkv, n = rows.shape[1], rows.shape[2]
    g = hq // hkv
    dv = v_rows.shape[1]
    if not (supports(q, k_rows, v_rows, work) and k_rows.shape[1] == d
            and k_rows.shape[0] == v_rows.shape[0] and hq % hkv == 0
            and rows.dtype == torch.int64 and rows.is_contiguous() and rows.shape[0] == b
            and valid.dtype in (torch.uint8, torch.bool) and valid.shape == rows.shape
            and valid.is_contiguous() and work.numel() >= attend_work(lib, b, hkv, g, n, dv)):
        raise ValueError("dynsplit native attend: unsupported shapes, dtypes or layout")
    _check_rows(top, k_rows.shape[0], "pool row")
    out = torch.empty(b, hq, dv, dtype=torch.float32)
    lse = torch.empty(b, hq, dtype=torch.float32)
    t = threads(lib)
    lib.ds_attend(_ptr(q), _ptr(k_rows), _ptr(v_rows), _ptr(rows), _ptr(valid), _ptr(out),
                  _ptr(lse), _ptr(work), scale, b, hkv, g, d, dv, n, attend_splits(b * hkv, n, t),
                  t)
    return out, lse


def keep(lib, scores, clen, cstart, budget, fixed, front, k: int, heap: torch.Tensor):
    """core.selection.lay_out_blocks over the top k of each score order (kernels/cpu.py
    DecodeStep.keep): (positions [B, Hkv, cap], counts [B, Hkv], order and kept_len
    [B, Hkv, k]). scores float32 [B, Hkv, NB] (no -0.0 needed); clen, cstart int64
    [B, Hkv, NB]; budget, front int64 [B]; fixed int64 [B, Hkv, cap + 1]; heap: int64 scratch
    of at least threads(lib) * k."""
    b, hkv, nb = scores.shape
    cap = fixed.shape[2] - 1
    i64 = torch.int64
    t = threads(lib)
    if not (supports(scores) and 0 <= k <= nb and heap.numel() >= t * k and heap.dtype == i64
            and all(t.dtype == i64 and t.is_contiguous() and t.device.type == "cpu"
                    for t in (clen, cstart, budget, fixed, front, heap))
            and clen.shape == scores.shape and cstart.shape == scores.shape
            and budget.shape == (b,) and front.shape == (b,) and fixed.shape[:2] == (b, hkv)):
        raise ValueError("dynsplit native keep: unsupported shapes, dtypes or layout")
    positions = torch.empty(b, hkv, cap, dtype=i64)
    counts = torch.empty(b, hkv, dtype=i64)
    order = torch.empty(b, hkv, k, dtype=i64)
    kept = torch.empty(b, hkv, k, dtype=i64)
    lib.ds_keep(_ptr(scores), _ptr(clen), _ptr(cstart), _ptr(budget), _ptr(fixed), _ptr(front),
                _ptr(positions), _ptr(counts), _ptr(order), _ptr(kept), _ptr(heap), b, hkv, nb,
                k, cap, t)
    return positions, counts, order, kept


_POINTERS = ("q", "center", "radius", "k", "v", "out", "lse", "positions", "counts", "order",
             "kept", "index", "l2", "bias", "clen", "cstart", "budget", "fixed", "front",
             "pool_rows", "slot_ok", "scores", "work", "heaps", "rows", "valid", "cbudget", "exact",
             "clog", "pre", "cheaps", "coff", "has", "cord", "cnt", "crow", "ctok")
_SIZES = ("B", "Hkv", "G", "D", "Dv", "NB", "K", "cap", "P", "S", "T", "Kc", "CL", "attend")


class LayerArgs(ctypes.Structure):
    """native.c's ds_layer_args, field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in _POINTERS] + [("scale", ctypes.c_float)]
                + [(n, ctypes.c_int64) for n in _SIZES])


class Layer:
    """ds_layer bound to one planned step (kernels/cpu.py DecodeStep): score, keep, pool rows
    and attention of a compressed layer in one call and one parallel region. The plan's tensors
    are checked and bound once; a layer passes only its query, summaries and pools, so a call
    costs one ctypes call and a few checks instead of three wrappers' worth.

    index, l2, bias [B, NB] (0 / -inf), clen, cstart [B, Hkv, NB], budget, front [B], fixed
    [B, Hkv, cap + 1], pool_rows [B, Hkv, P] (position p's pool row at column p + 1), slot_ok
    (bool [B, Hkv, P] or None), index_top / rows_top: the largest summary / pool row they name
    (plan time). take(name, shape, dtype): work buffers (kernels/cpu.py Scratch.take).
    cbudget (int64 [B]) and kc: two-stage selection (core.selection.select_refined): the
    candidates' block budget and the most candidates it can keep (max_kept_blocks of the
    candidate plan); the selection then reads the pool's keys, so select() takes k_rows."""

    def __init__(self, lib, *, hq: int, d: int, dv: int, k: int, index, index_top: int, l2, bias,
                 clen, cstart, budget, fixed, front, pool_rows, rows_top: int, slot_ok, take,
                 cbudget=None, kc: int = 0):
        b, hkv, nb = clen.shape
        cap, p = fixed.shape[2] - 1, pool_rows.shape[2]
        i64 = torch.int64
        ints = (index, clen, cstart, budget, fixed, front, pool_rows)
        if not (hq % hkv == 0 and 0 <= k <= nb and index.shape == (b, nb) and l2.shape == (b,)
                and l2.dtype == torch.uint8 and bias.shape == (b, nb) and supports(bias)
                and cstart.shape == clen.shape and budget.shape == (b,) and front.shape == (b,)
                and fixed.shape[:2] == (b, hkv) and pool_rows.shape[:2] == (b, hkv)
                and (slot_ok is None or (slot_ok.shape == pool_rows.shape
                                         and slot_ok.dtype == torch.bool
                                         and slot_ok.is_contiguous()))
                and l2.is_contiguous() and l2.device.type == "cpu"
                and (cbudget is None or (cbudget.shape == (b,) and 0 <= kc <= nb))
                and all(t.dtype == i64 and t.is_contiguous() and t.device.type == "cpu"
                        for t in ints + (() if cbudget is None else (cbudget,)))):
            raise ValueError("dynsplit native layer: unsupported plan shapes, dtypes or layout")
        self.lib, self.hq, self.d, self.dv = lib, hq, d, dv
        self.shape = (b, hkv, nb, cap)
        self.index_top, self.rows_top = index_top, rows_top
        t = threads(lib)
        g = hq // hkv
        s = attend_splits(b * hkv, cap, t)
        self.keep_alive = [index, l2, bias, *ints, slot_ok,
                           take("layer_scores", (b, hkv, nb), torch.float32),
                           take("layer_work", (attend_work(lib, b, hkv, g, cap, dv),),
                                torch.float32),
                           take("layer_heaps", (t * max(k, 1),), i64),
                           take("layer_rows", (b, hkv, cap), i64),
                           take("layer_valid", (b, hkv, cap), torch.uint8)]
        scores, work, heaps, rows, valid = self.keep_alive[-5:]
        ptrs = dict(index=index, l2=l2, bias=bias, clen=clen, cstart=cstart, budget=budget,
                    fixed=fixed, front=front, pool_rows=pool_rows, scores=scores, work=work,
                    heaps=heaps, rows=rows, valid=valid)
        self.refine = cbudget is not None
        cl = max(int(cbudget.max()), 1) if self.refine and cbudget.numel() else 1  # plan time
        if self.refine:  # the candidate stage's buffers (native.c candidates, reuse_logits)
            f32 = torch.float32
            names = ("cbudget", "exact", "clog", "pre", "cheaps", "coff", "has", "cord", "cnt",
                     "crow", "ctok")
            self.keep_alive += [cbudget, take("layer_exact", (b, hkv, nb), f32),
                                take("layer_clog", (b, hkv, cl, g), f32),
                                take("layer_pre", (b, hkv, cap, g), f32),
                                take("layer_cheaps", (t * max(kc, 1),), i64),
                                take("layer_coff", (b, hkv, nb), i64),
                                take("layer_has", (b, hkv, cap), torch.uint8),
                                take("layer_cord", (b, hkv, max(kc, 1)), i64),
                                take("layer_cnt", (b, hkv), i64),
                                take("layer_crow", (b, hkv, cl), i64),
                                take("layer_ctok", (b, hkv), i64)]
            ptrs.update(zip(names, self.keep_alive[-len(names):]))
        self.args = LayerArgs(**{n: _ptr(x) for n, x in ptrs.items()},
                              slot_ok=None if slot_ok is None else _ptr(slot_ok),
                              B=b, Hkv=hkv, G=g, D=d, Dv=dv, NB=nb, K=k, cap=cap, P=p, S=s, T=t,
                              Kc=kc if self.refine else 0, CL=cl)

    def __call__(self, q, center, radius, k_rows, v_rows, scale: float):
        """(out [B, Hq, Dv], lse [B, Hq], positions [B, Hkv, cap], counts [B, Hkv], order and
        kept [B, Hkv, K]) for this layer; q [B, Hq, D], center / radius [M, Hkv, D], k_rows
        [R, D], v_rows [R, Dv] (the pools as rows slot * Hkv + head), all fp32 contiguous."""
        if not supports(q, center, radius, k_rows, v_rows):
            raise ValueError("dynsplit native layer: unsupported shapes, dtypes or layout")
        return self.run_supported(q, center, radius, k_rows, v_rows, scale)

    def run_supported(self, q, center, radius, k_rows, v_rows, scale: float):
        """__call__ for a caller that has just checked supports() on these tensors (the decode
        step decides its path with it); the shapes and row bounds are checked here."""
        b, hkv, nb, cap = self.shape
        if not (q.shape == (b, self.hq, self.d)
                and center.shape == radius.shape and center.shape[1:] == (hkv, self.d)
                and k_rows.shape[1] == self.d and v_rows.shape == (k_rows.shape[0], self.dv)):
            raise ValueError("dynsplit native layer: unsupported shapes, dtypes or layout")
        _check_rows(self.index_top, center.shape[0], "summary")
        _check_rows(self.rows_top, k_rows.shape[0], "pool row")
        a = self.args
        out = torch.empty(b, self.hq, self.dv, dtype=torch.float32)
        lse = torch.empty(b, self.hq, dtype=torch.float32)
        a.k, a.v = k_rows.data_ptr(), v_rows.data_ptr()
        a.out, a.lse = out.data_ptr(), lse.data_ptr()
        a.scale, a.attend = scale, 1
        return (out, lse, *self._select(q, center, radius))

    def select(self, q, center, radius, k_rows=None):
        """(positions, counts, order, kept) alone: the layer's score and block choice in one
        call (no pool read, but for the keys [R, D] a two-stage selection reads)."""
        b, hkv, nb, cap = self.shape
        if not (supports(q, center, radius) and q.shape == (b, self.hq, self.d)
                and center.shape == radius.shape and center.shape[1:] == (hkv, self.d)
                and (not self.refine or (k_rows is not None and supports(k_rows)
                                         and k_rows.dim() == 2 and k_rows.shape[1] == self.d))):
            raise ValueError("dynsplit native layer: unsupported shapes, dtypes or layout")
        _check_rows(self.index_top, center.shape[0], "summary")
        a = self.args
        a.k = a.v = a.out = a.lse = None
        if self.refine:
            _check_rows(self.rows_top, k_rows.shape[0], "pool row")
            a.k = k_rows.data_ptr()
        a.attend = 0
        return self._select(q, center, radius)

    def _select(self, q, center, radius):
        b, hkv, nb, cap = self.shape
        a, k, i64 = self.args, self.args.K, torch.int64
        positions = torch.empty(b, hkv, cap, dtype=i64)
        counts = torch.empty(b, hkv, dtype=i64)
        order = torch.empty(b, hkv, k, dtype=i64)
        kept = torch.empty(b, hkv, k, dtype=i64)
        a.q, a.center, a.radius = q.data_ptr(), center.data_ptr(), radius.data_ptr()
        a.positions, a.counts = positions.data_ptr(), counts.data_ptr()
        a.order, a.kept = order.data_ptr(), kept.data_ptr()
        self.lib.ds_layer(ctypes.byref(a))
        return positions, counts, order, kept


class LayerSet:
    """ds_layer for every compressed layer of one planned step, the server's hot path
    (kernels/cpu.py DecodeStep.layer_set): the plan, every layer's summaries and the work
    buffers are bound once per step, each layer's pools once, so a layer's call checks its
    query, sets a few pointers and makes one ctypes call. In the 8k server the wrapper around a
    0.25-0.27 ms kernel took 0.355 ms per layer through SparseDecodeWrapper.run and takes 0.29
    through this (the interpreter runs cache-cold after the kernel and the model's matmuls, so
    each Python op costs several times its hot cost).

    center, radius: [L, M, Hkv, D] fp32, every compressed layer's summaries (the block store's,
    fixed for the step); counts: int64 [L, B, Hkv], tokens attended (layer li writes row li);
    out: fp32 [L, B, Hq, Dv], layer li's output (returned as a view). Only the selection's other
    outputs (positions, order, kept) and the LSE go to reused work buffers: nothing read later.
    pools: a dict the caller keeps across steps (SGLang's pool tensors live as long as the
    server), so each layer's pools are checked once, not once per step."""

    def __init__(self, layer: Layer, center, radius, counts, out, take, pools: dict):
        b, hkv, nb, cap = layer.shape
        i64 = torch.int64
        if not (supports(center, radius, out) and center.dim() == 4
                and center.shape == radius.shape and center.shape[2:] == (hkv, layer.d)
                and counts.shape == (center.shape[0], b, hkv) and counts.dtype == i64
                and counts.is_contiguous() and counts.is_cpu
                and out.shape == (center.shape[0], b, layer.hq, layer.dv)):
            raise ValueError("dynsplit native layer set: unsupported shapes, dtypes or layout")
        layers, m = center.shape[:2]
        _check_rows(layer.index_top, m, "summary")
        k = layer.args.K
        self.args = a = LayerArgs.from_buffer_copy(layer.args)
        work = [take("set_lse", (b, layer.hq), torch.float32),
                take("set_positions", (b, hkv, cap), i64), take("set_order", (b, hkv, k), i64),
                take("set_kept", (b, hkv, k), i64)]
        a.lse, a.positions, a.order, a.kept = (t.data_ptr() for t in work)
        a.attend = 1
        self.keep_alive = [layer, center, radius, counts, out, *work]
        self.call, self.ref = layer.lib.ds_layer, ctypes.byref(a)
        self.layers, self.out, self.qshape = layers, out, (b, layer.hq, layer.d)
        self.dims, self.rows_top = (layer.d, layer.dv), layer.rows_top
        self.default_scale = 1.0 / math.sqrt(layer.d)
        step = m * hkv * layer.d * 4  # bytes between two layers' summaries
        self.summaries = (center.data_ptr(), radius.data_ptr(), step)
        self.counts = (counts.data_ptr(), b * hkv * 8)
        self.outs = (out.data_ptr(), b * layer.hq * layer.dv * 4)
        # li -> (k_buffer, v_buffer, k pointer, v pointer, pool rows); this step's plan may
        # name rows a pool checked in an earlier step does not have
        self.pools = pools
        for li in [li for li, p in pools.items() if self.rows_top >= p[4]]:
            del pools[li]

    def __call__(self, li: int, q, k_buffer, v_buffer, scale=None):
        """Layer li's output (out[li]: [B, Hq, Dv]), or None where the fused call cannot take
        q or the pools (then the caller runs the layer another way). k_buffer / v_buffer: the
        layer's pools [S, Hkv, D(v)]."""
        if not 0 <= li < self.layers:
            raise IndexError(f"dynsplit native layer set: layer {li} of {self.layers}")
        pool = self.pools.get(li)
        if pool is None or pool[0] is not k_buffer or pool[1] is not v_buffer:
            pool = self._bind(li, k_buffer, v_buffer)
            if pool is None:
                return None
        if not (q.dtype == torch.float32 and q.is_cpu and q.is_contiguous()
                and q.shape == self.qshape):
            return None
        a = self.args
        c0, r0, step = self.summaries
        a.q, a.center, a.radius = q.data_ptr(), c0 + li * step, r0 + li * step
        a.k, a.v = pool[2], pool[3]
        a.counts = self.counts[0] + li * self.counts[1]
        a.out = self.outs[0] + li * self.outs[1]
        a.scale = self.default_scale if scale is None else scale
        self.call(self.ref)
        return self.out[li]

    def _bind(self, li: int, k_buffer, v_buffer):
        d, dv = self.dims
        if not (supports(k_buffer, v_buffer) and k_buffer.dim() == 3 and v_buffer.dim() == 3
                and k_buffer.shape[:2] == v_buffer.shape[:2] and k_buffer.shape[1] == self.args.Hkv
                and k_buffer.shape[2] == d and v_buffer.shape[2] == dv):
            return None
        rows = k_buffer.shape[0] * k_buffer.shape[1]
        _check_rows(self.rows_top, rows, "pool row")
        pool = self.pools[li] = (k_buffer, v_buffer, k_buffer.data_ptr(), v_buffer.data_ptr(),
                                 rows)
        return pool


def describe() -> dict:
    """What a benchmark's CPU rows ran on, for its JSON: the decode step's formulation and the
    huge-page setting (the CPU-host boot sets THP_MEM_ALLOC_ENABLE; dense runs under it too)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        mode = "unknown"
    return {"cpu_path": ("fused C kernels (kernels/native.c)" if load() is not None
                         else "torch ops (kernels/cpu.py)"),
            "huge_pages": f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
                          f", THP {mode}"}
