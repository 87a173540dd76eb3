"""Compressed decode attention vs dense decode, one layer, batch 1.

CPU (always): the kernels' CPU dispatch path (SparseDecodeWrapper: plan once, time run) vs
`dense` (SDPA over contiguous K/V, query heads folded per KV group) and `dense-gather` (the core's
dense_decode_attention: gather the request's slots from the pool, then SDPA, like SGLang's
torch_native backend); selection alone (`select-uniform`: scoring + top-k) and the naive
variable-length path (`select-ragged`). CUDA (if present): the Triton path vs FlashAttention /
FlashInfer / SDPA (`dense`) and SGLang's Triton decode kernel (`dense-gather`), CUDA events.

Methods are timed interleaved (round-robin), median of repeats after warm-up (the slow
`dense-gather` and `select-ragged` references on their own, with fewer repeats); speedups are
ratios to `dense` from the same run. On CPU the default is one torch thread timed on the
thread's CPU clock, which keeps other processes on a shared host out of the numbers (--threads,
--clock), and every CPU call starts with cold caches. ideal_speedup = N / (B + R·N/C), R = 2 summary vectors per
block, C = mean block length. bandwidth_fraction = (selected K/V + summaries read) / time / the
copy bandwidth of a large tensor copy (bytes read + written) timed interleaved with each case.

    python benchmarks/kernels/run.py --quick --out benchmarks/kernels/results/cpu-quick.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dynsplit_sglang.core import (
    BlockTable, DynSplitConfig, dense_decode_attention, plan_selection, score_blocks_ragged,
    segment, select, summarize_ragged,
)
from dynsplit_sglang.kernels import SparseDecodeWrapper, implementation

LAYOUTS = {"default-9/3/64": (9, 3, 64), "llama8b-32/8/128": (32, 8, 128)}
TARGET_LAYOUT = "llama8b-32/8/128"
SINK, RECENT, R = 4, 64, 2
CFG = DynSplitConfig()  # C = 16, Δ = 4, dynsplit segmentation
L2 = CFG.summary_spread is not None  # the default (gauss) score's radius norm


# -- timing ------------------------------------------------------------------------------------

def interleaved(fns: dict, repeats: int, warmup: int, timer) -> dict:
    """Median ms per named callable, timed round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timer(fn))
    return {k: statistics.median(v) for k, v in times.items()}


CLOCK = {"now": time.perf_counter_ns}
# Rewritten before every timed CPU call (untimed): each call starts with cold caches, as a
# layer's decode step does after the other layers' work. Twice a 32 MiB L3.
_FLUSH = {}


def cpu_timer(fn) -> float:
    """ms on CLOCK: wall time, or this thread's CPU time (see --clock), and every CPU call starts with cold caches."""
    flush = _FLUSH.setdefault("buf", torch.zeros(16 << 20))
    flush.add_(1.0)
    now = CLOCK["now"]
    t = now()
    fn()
    return (now() - t) / 1e6


def cuda_timer(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def copy_fn(device: str, mib: int):
    """A large tensor copy and the bytes it moves (read + written)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.nbytes


def copy_bandwidth(device: str, timer, mib: int = 512) -> float:
    """GB/s of a large tensor copy, counting bytes read + written."""
    fn, nbytes = copy_fn(device, mib)
    return nbytes / interleaved({"copy": fn}, 7, 2, timer)["copy"] / 1e6


# -- one problem: a pool, a segmented request, its summaries -----------------------------------

@dataclass
class Case:
    ctx: int
    hq: int
    hkv: int
    d: int
    k: torch.Tensor  # pool [S, Hkv, D], the request's slots scattered in it
    v: torch.Tensor
    token_slots: torch.Tensor  # [1, ctx]
    seq_lens: torch.Tensor
    table: BlockTable
    ends: torch.Tensor
    center: torch.Tensor
    radius: torch.Tensor
    index: torch.Tensor
    q: torch.Tensor

    @property
    def mean_block_len(self) -> float:
        return self.ctx / self.ends.numel()


def make_case(ctx, hq, hkv, d, dtype, device, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    size = ctx + ctx // 8  # other requests' slots in between
    k = torch.randn(size, hkv, d, generator=g).to(dtype)
    v = torch.randn(size, hkv, d, generator=g).to(dtype)
    slots = torch.randperm(size, generator=g)[:ctx].view(1, ctx)
    ends = segment(CFG, ctx, torch.randn(ctx, generator=g), torch.rand(ctx, generator=g) < 0.3).ends
    table = BlockTable.from_ends([ends])
    nb = table.capacity
    center = torch.empty(nb, hkv, d, dtype=dtype)
    radius = torch.empty(nb, hkv, d, dtype=dtype)
    index = torch.arange(nb).view(1, nb)
    implementation("cpu").block_summaries(k, slots, table, center, radius, index,
                                          CFG.max_block_len, CFG.summary_spread)
    q = torch.randn(1, hq, d, generator=g).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return Case(ctx, hq, hkv, d, to(k), to(v), to(slots), to(torch.tensor([ctx])),
                BlockTable(to(table.starts), to(table.lens)), ends, to(center), to(radius), to(index),
                to(q))


def ideal_speedup(ctx, budget, mean_len) -> float:
    return ctx / (budget + R * ctx / mean_len)


def moved_bytes(case: Case, tokens_attended: int) -> int:
    """Bytes a compressed step must read: the selected K and V rows + both summaries."""
    el = case.k.element_size()
    nb = case.ends.numel()
    return tokens_attended * case.d * 2 * el + nb * case.hkv * case.d * 2 * el


# -- the naive variable-length selection (the uniform mapping's baseline) ----------------------

def ragged_select(k_contig, ends_list, q, ctx, budget, summaries=None):
    """summarize_ragged + score_blocks_ragged + a Python greedy top-k over blocks, per KV head.
    summaries: precomputed (centers, radii) lists, to time the variable-length scoring alone."""
    centers, radii = summaries or summarize_ragged(k_contig, torch.tensor(ends_list),
                                                   CFG.summary_spread)
    l2 = CFG.summary_spread is not None
    scores = score_blocks_ragged(q[0], centers, radii, l2).tolist()  # [Hkv][NB]
    r0 = max(ctx - RECENT, SINK)
    left = budget - SINK - (ctx - r0)
    out = []
    for head_scores in scores:
        order = sorted(range(len(ends_list)), key=lambda j: -head_scores[j])
        fill, pos = 0, list(range(SINK))
        for j in order:
            s = max(ends_list[j - 1] + 1 if j else 0, SINK)
            n = min(ends_list[j] + 1, r0) - s
            if n <= 0:
                continue
            if fill + n > left:
                break
            fill += n
            pos.extend(range(s, s + n))
        out.append(pos + list(range(r0, ctx)))
    return out


# -- per device --------------------------------------------------------------------------------

def dense_cpu(case: Case):
    """SDPA on contiguous K/V; the G query heads of a KV group form the query length, which is
    what makes CPU SDPA fast for GQA decode (enable_gqa repeats K/V per query head)."""
    kc = case.k[case.token_slots[0]].transpose(0, 1).contiguous()
    vc = case.v[case.token_slots[0]].transpose(0, 1).contiguous()
    qf = case.q[0].view(case.hkv, case.hq // case.hkv, case.d)
    return lambda: F.scaled_dot_product_attention(qf, kc, vc)


def dense_cuda(case: Case):
    """Fastest installed dense decode: FlashAttention, FlashInfer, else SDPA (flash backend)."""
    kc = case.k[case.token_slots[0]].contiguous()  # [L, Hkv, D]
    vc = case.v[case.token_slots[0]].contiguous()
    try:
        from flash_attn import flash_attn_with_kvcache
        q4, seqlens = case.q[:, None], torch.tensor([case.ctx], dtype=torch.int32, device="cuda")
        return "flash-attn", lambda: flash_attn_with_kvcache(q4, kc[None], vc[None],
                                                             cache_seqlens=seqlens)
    except ImportError:
        pass
    try:
        import flashinfer
        return "flashinfer", lambda: flashinfer.single_decode_with_kv_cache(case.q[0], kc, vc)
    except ImportError:
        pass
    kt, vt = kc.transpose(0, 1).contiguous(), vc.transpose(0, 1).contiguous()
    qf = case.q[0].view(case.hkv, case.hq // case.hkv, case.d)[None]
    return "sdpa", lambda: F.scaled_dot_product_attention(qf, kt[None], vt[None])


def sglang_triton_cuda(case: Case, max_splits: int = 16):
    """SGLang's own Triton decode kernel over the request's (scattered) slots."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    dev = case.q.device
    o = torch.empty(1, case.hq, case.d, dtype=case.q.dtype, device=dev)
    indptr = torch.tensor([0, case.ctx], dtype=torch.int32, device=dev)
    indices = case.token_slots[0].to(torch.int64)
    logits = torch.empty(1, case.hq, max_splits, case.d, dtype=torch.float32, device=dev)
    lse = torch.empty(1, case.hq, max_splits, dtype=torch.float32, device=dev)
    splits = torch.full((1,), max_splits, dtype=torch.int32, device=dev)
    return lambda: decode_attention_fwd(case.q, case.k, case.v, o, indptr, indices, logits, lse,
                                        splits, max_splits, case.d ** -0.5, 1.0, 1.0)


def maybe_graph(fn):
    """Replay fn from a CUDA graph (decode runs graphed in SGLang); eager if capture fails."""
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception:  # noqa: BLE001 - a baseline that cannot be captured is timed eagerly
        return fn


def bench_case(case: Case, budgets, device, repeats, warmup, copy, ragged: bool) -> list[dict]:
    """copy: (callable, bytes) of a large copy, timed interleaved with the methods so the
    bandwidth fractions use the bandwidth the machine gave while they ran (a shared host's
    load drifts during a run)."""
    cuda = device == "cuda"
    timer = cuda_timer if cuda else cpu_timer
    base = dict(device=torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}",
                context_len=case.ctx, q_heads=case.hq, kv_heads=case.hkv, head_dim=case.d)
    fns, impl = {"copy": copy[0]}, {}
    if cuda:
        impl["dense"], fn = dense_cuda(case)
        fns["dense"] = maybe_graph(fn)
        try:
            fns["dense-gather"] = maybe_graph(sglang_triton_cuda(case))
            impl["dense-gather"] = "sglang-triton"
        except Exception as e:  # noqa: BLE001 - an optional baseline; say why it is missing
            print(f"no sglang-triton baseline: {type(e).__name__}: {e}")
    else:
        fns["dense"] = dense_cpu(case)
        impl["dense"] = "sdpa-folded-gqa"
        impl["dense-gather"] = "core.dense_decode_attention"
    wrappers = {}
    for budget in budgets:
        w = SparseDecodeWrapper(case.hq, case.hkv, case.d, device=case.q.device)
        w.plan(plan_selection(case.table, case.seq_lens, budget, SINK, RECENT,
                              max_block_len=CFG.max_block_len), case.index, case.token_slots, L2)
        wrappers[budget] = w
        run = lambda w=w: w.run(case.q, case.k, case.v, case.center, case.radius)  # noqa: E731
        fns[("dynsplit", budget)] = maybe_graph(run) if cuda else run
        sel = lambda w=w: w.select(case.q, case.center, case.radius)  # noqa: E731
        fns[("select-uniform", budget)] = maybe_graph(sel) if cuda else sel
    med = interleaved(fns, repeats, warmup, timer)
    if not cuda:  # seconds per call at long contexts: a reference point, timed on its own
        gather = lambda: dense_decode_attention(case.q, case.k, case.v, case.token_slots,  # noqa: E731
                                                case.seq_lens)
        med["dense-gather"] = interleaved({0: gather}, max(5, repeats // 2), 1, timer)[0]
    ragged_cached = {}
    if ragged:  # slow (Python loops): timed on its own
        kc = case.k[case.token_slots[0]]
        ends = case.ends.tolist()
        summ = summarize_ragged(kc, case.ends, CFG.summary_spread)
        for budget in budgets:
            fn = lambda b=budget: ragged_select(kc, ends, case.q, case.ctx, b)  # noqa: E731
            cached = lambda b=budget: ragged_select(kc, ends, case.q, case.ctx, b, summ)  # noqa: E731
            t = interleaved({0: fn, 1: cached}, max(5, repeats // 2), 1, timer)
            med[("select-ragged", budget)], ragged_cached[budget] = t[0], t[1]

    rows = []
    dense = med["dense"]
    bw = copy[1] / med["copy"] / 1e6
    base["copy_gbps"] = bw
    for name in ("dense", "dense-gather"):
        if name in med:
            rows.append(dict(base, budget=case.ctx, method=name, impl=impl[name],
                             median_ms=med[name], ideal_speedup=1.0,
                             speedup=dense / med[name]))
    for budget in budgets:
        ideal = ideal_speedup(case.ctx, budget, case.mean_block_len)
        for name in ("dynsplit", "select-uniform", "select-ragged"):
            if (name, budget) not in med:
                continue
            ms = med[(name, budget)]
            row = dict(base, budget=budget, method=name, median_ms=ms, ideal_speedup=ideal,
                       speedup=dense / ms)
            if name == "select-ragged":  # the same path with summaries kept between steps
                row["median_ms_summaries_cached"] = ragged_cached[budget]
            if name == "dynsplit":
                attended = int(wrappers[budget].tokens_attended().sum())
                row["tokens_attended"] = attended
                row["bandwidth_fraction"] = moved_bytes(case, attended) / ms / 1e6 / bw
                row["fraction_of_ideal"] = row["speedup"] / ideal
            rows.append(row)
    if not cuda and budgets:  # where the compressed step spends its time (first budget)
        rows.append(dict(base, budget=budgets[0], method="dynsplit-stages",
                         stages_ms=stage_times(case, wrappers[budgets[0]], repeats, timer)))
    return rows


def stage_times(case: Case, w: SparseDecodeWrapper, repeats, timer) -> dict:
    from dynsplit_sglang.core import positions_to_slots
    from dynsplit_sglang.kernels import cpu
    kern = w.kernels  # the side the wrapper chose
    scores = kern.score_blocks(case.q, case.center, case.radius, case.index, L2)
    sel = w.select(case.q, case.center, case.radius)
    slots = positions_to_slots(sel.positions, case.token_slots)
    return interleaved({
        "score": lambda: kern.score_blocks(case.q, case.center, case.radius, case.index, L2),
        "select (top-k)": lambda: cpu.select(scores, w.selection_plan, w._max_kept),
        "select (core sort)": lambda: select(scores, w.selection_plan),
        "positions_to_slots": lambda: positions_to_slots(sel.positions, case.token_slots),
        "attention": lambda: kern.sparse_decode_attention(case.q, case.k, case.v, slots),
    }, repeats, 2, timer)


# -- report ------------------------------------------------------------------------------------

def targets(rows) -> list[dict]:
    """The three targets at 32k and a 1/16 budget, per head layout (the Llama-like one is the
    headline: the reference points are for it)."""
    out = []
    for layout, (hq, hkv, d) in LAYOUTS.items():
        at = [r for r in rows if r["context_len"] == 32768 and r["q_heads"] == hq
              and r["kv_heads"] == hkv and r["head_dim"] == d]
        pick = lambda m: next((r for r in at if r["method"] == m  # noqa: E731
                               and (m.startswith("dense") or r["budget"] == 2048)), None)
        comp, dense = pick("dynsplit"), pick("dense")
        uni, rag = pick("select-uniform"), pick("select-ragged")
        if comp:
            out.append(dict(layout=layout, target="compressed decode: speedup / ideal >= 0.7",
                            value=comp["fraction_of_ideal"],
                            passed=comp["fraction_of_ideal"] >= 0.7,
                            detail=f"{comp['speedup']:.2f}x of ideal {comp['ideal_speedup']:.2f}x"))
            out.append(dict(layout=layout, target="compressed decode: copy-bandwidth fraction >= 0.25",
                            value=comp["bandwidth_fraction"],
                            passed=comp["bandwidth_fraction"] >= 0.25,
                            detail=f"{comp['median_ms']:.2f} ms at {comp['copy_gbps']:.1f} GB/s copy"))
        if uni and dense:
            frac = uni["median_ms"] / dense["median_ms"]
            out.append(dict(layout=layout, target="selection <= 10% of dense attention",
                            value=frac, passed=frac <= 0.10,
                            detail=f"{uni['median_ms']:.2f} ms vs {dense['median_ms']:.2f} ms"))
        if uni and rag:
            ratio = rag["median_ms"] / uni["median_ms"]
            out.append(dict(layout=layout, target="uniform selection >= 4.9x faster than ragged",
                            value=ratio, passed=ratio >= 4.9,
                            detail=f"{uni['median_ms']:.2f} ms vs {rag['median_ms']:.1f} ms "
                                   f"({rag['median_ms_summaries_cached']:.1f} ms with the ragged "
                                   "summaries cached)"))
    return out


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["device"], r["q_heads"], r["kv_heads"], r["head_dim"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (dev, hq, hkv, d) in zip(axes[0], groups):
        mine = [r for r in rows if (r["device"], r["q_heads"], r["kv_heads"], r["head_dim"])
                == (dev, hq, hkv, d) and r["method"] == "dynsplit"]
        for frac in sorted({round(r["context_len"] / r["budget"]) for r in mine}):
            pts = sorted((r["context_len"], r["speedup"], r["ideal_speedup"]) for r in mine
                         if round(r["context_len"] / r["budget"]) == frac)
            x = [p[0] for p in pts]
            line, = ax.plot(x, [p[1] for p in pts], "o-", label=f"budget 1/{frac}")
            ax.plot(x, [p[2] for p in pts], "--", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("speedup over dense (dashed: ideal)")
        ax.set_title(f"{dev}: {hq}/{hkv} heads, d{d}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file; the plot goes next to it (.png)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and budgets (< 10 min)")
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default). Default 1: on a shared host, "
                         "a multi-threaded op waits at an OpenMP barrier for whichever thread "
                         "another process has descheduled, a stall of a scheduler slice that "
                         "swamps millisecond ops; dense and compressed use the same count")
    ap.add_argument("--clock", choices=["auto", "wall", "thread"], default="auto",
                    help="CPU timing clock. 'thread' = CPU time of the calling thread: it leaves "
                         "out the time another process held the core, and is complete only when "
                         "torch runs single-threaded (all work on the calling thread). "
                         "auto: thread with --threads 1, else wall")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock
    if clock == "auto":
        clock = "thread" if torch.get_num_threads() == 1 else "wall"
    CLOCK["now"] = time.thread_time_ns if clock == "thread" else time.perf_counter_ns
    os.environ.setdefault("DYNSPLIT_KERNELS", "auto")
    contexts = args.contexts or [4096, 16384, 32768, 65536, 131072]
    fracs = [16] if args.quick else [4, 8, 16, 32]
    repeats, warmup = (9, 2) if args.quick else (15, 3)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    result = {"meta": dict(quick=args.quick, torch=torch.__version__, threads=torch.get_num_threads(),
                           cpu_clock=clock, load_avg_start=os.getloadavg(),
                           sink=SINK, recent=RECENT, block_size=CFG.block_size,
                           tolerance=CFG.tolerance, batch=1),
              "bandwidth_gbps": {}, "rows": [], "targets": {}}
    work = [(dev, name, ctx) for dev in devices for name in LAYOUTS for ctx in contexts]
    bar = tqdm(work, desc="kernels bench", unit="case")
    for dev in devices:
        timer = cuda_timer if dev == "cuda" else cpu_timer
        mib = 2048 if dev == "cuda" else 256
        result["bandwidth_gbps"][dev] = copy_bandwidth(dev, timer, mib)
        copy = copy_fn(dev, mib)
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        for name, (hq, hkv, d) in LAYOUTS.items():
            for ctx in contexts:
                bar.set_postfix_str(f"{dev} {name} {ctx // 1024}k")
                # Peak: pool (1.125x), contiguous dense copy, dense-gather's gathered K/V and
                # its GQA expansion to hq heads (G x), in units of one layer's K+V.
                need = int(ctx * hkv * d * 4 * 2 * (hq // hkv + 3.5))
                if dev == "cpu" and need > _available_bytes():
                    bar.write(f"skip {name} {ctx}: needs ~{need / 2**30:.1f} GiB")
                    bar.update()
                    continue
                case = make_case(ctx, hq, hkv, d, dtype, dev)
                budgets = [ctx // f for f in fracs]
                result["rows"] += bench_case(case, budgets, dev, repeats, warmup, copy,
                                             ragged=ctx == 32768)
                del case
                gc.collect()
                bar.update()
        result["targets"][dev] = targets([r for r in result["rows"]
                                          if r["device"].startswith("cpu") == (dev == "cpu")])
    bar.close()
    result["meta"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot([r for r in result["rows"] if r["method"] == "dynsplit" or r["method"] == "dense"],
         out.with_suffix(".png"))
    summary(result)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _available_bytes() -> int:
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def summary(result) -> None:
    for dev, bw in result["bandwidth_gbps"].items():
        meta = result["meta"]
        print(f"\n[{dev}] threads {meta['threads']}, clock {meta['cpu_clock'] if dev == 'cpu' else 'cuda events'}, "
              f"load average {meta['load_avg_start'][0]:.1f} -> {meta['load_avg_end'][0]:.1f}")
        print(f"copy bandwidth {bw:.1f} GB/s at start (per case: column 'copy')")
        print(f"{'layout':>12} {'ctx':>7} {'budget':>7} {'method':>15} {'ms':>9} {'speedup':>8} "
              f"{'ideal':>6} {'bw frac':>7} {'copy':>5}")
        for r in result["rows"]:
            if r["device"].startswith("cpu") != (dev == "cpu") or "median_ms" not in r:
                continue
            bwf = r.get("bandwidth_fraction")
            print(f"{r['q_heads']:>5}/{r['kv_heads']}/{r['head_dim']:<4} {r['context_len']:>7} "
                  f"{r['budget']:>7} {r['method']:>15} {r['median_ms']:>9.2f} "
                  f"{r['speedup']:>8.2f} {r['ideal_speedup']:>6.2f} "
                  f"{'' if bwf is None else f'{bwf:.2f}':>7} {r['copy_gbps']:>5.1f}")
        print(f"\ntargets at 32k, budget 1/16 ({dev}; headline layout {TARGET_LAYOUT}):")
        for t in result["targets"].get(dev, []):
            print(f"  [{'pass' if t['passed'] else 'MISS'}] {t['layout']:>17} {t['target']}: "
                  f"{t['value']:.3f} ({t['detail']})")


if __name__ == "__main__":
    main()
