"""Accuracy suite: DynSplit-KV vs rigid splitting and kvpress peers, through the real SGLang
server, on real pretrained models.

    python benchmarks/accuracy/run.py --quick --out benchmarks/accuracy/results/quick.json
    python benchmarks/accuracy/run.py --full  --out benchmarks/accuracy/results/full.json

Quick: SmolLM2-135M-Instruct, tasks passkey / niah_single / niah_multikey, contexts 2k and 4k,
budgets 1/4 and 1/8, 20 samples per cell. Full: + Qwen2.5-Coder-0.5B-Instruct (contexts 4k, 8k,
16k), all five tasks, budgets 1/4, 1/8, 1/16, 50 samples per cell.

SGLang methods (``none``, ``dynsplit``, ``fixed``, ``delimiter``, ``streaming`` and the DD-Select
ablations of ``--ablations``) all run on ONE radix-cached server started with
``--kv-compression dynsplit``, the method and budget in each request id
(``dynsplit_sglang.overrides``). Per prompt, the full-KV request runs first and alone: its dense
prefill puts the prompt in the radix cache. Then the compressed (method, budget) requests of
``--group`` prompts go in one batch, every one served from the cache (``cached_tokens`` is
recorded; the prefill is paid once per prompt). Samples of a task share their haystack up to the
first needle and are sent deepest-needle first, so most of a prompt is a cached prefix too.
That the cache hit is cheap on CPU relies on the plugin's ``patches/native_extend.py`` (SGLang's
torch_native extend otherwise pays a whole prompt's attention for a cached 1-token extend).

kvpress peers (SnapKV, ChunkKV, StreamingLLM) run in their own virtual environment
(``.cache/venv-kvpress``, created here on first use from ``requirements/kvpress.txt``) through HF
transformers on the same model folder and the same token ids (``kvpress_runner.py``), side by
side with the SGLang phase.

Results: ``--out`` (JSON: ``meta`` + ``rows`` of {model, task, context_len, method, budget, n,
accuracy, seed}), ``<out stem>.samples.jsonl`` (every output; makes a re-run resume where it
stopped), and the report (``<stem>.md``, ``<stem>-<model>.png``, ``README-section.md``) from
``report.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import tasks as T  # noqa: E402
from dynsplit_sglang.core.strategies import STRATEGIES  # noqa: E402

# Rows served by the SGLang server besides the registered strategies: a strategy with another
# block score (per-request override). "quest" is Quest itself (fixed pages of 16 scored by the
# min/max bound); "dynsplit-bound" is DynSplit with that bound (this project's score before the
# gauss score replaced it: docs/accuracy.md).
VARIANTS = {"quest": {"strategy": "fixed", "score": "bound"},
            "dynsplit-bound": {"strategy": "dynsplit", "score": "bound"}}
SGLANG_METHODS = ("none", *STRATEGIES, *VARIANTS)
KVPRESS_METHODS = ("kvpress-snapkv", "kvpress-snapkv-paper", "kvpress-chunkkv",
                   "kvpress-streamingllm")
ALL_METHODS = SGLANG_METHODS + KVPRESS_METHODS
from dynsplit_sglang.models import DEFAULT_MODEL as SMOL, QWEN_MODEL as QWEN  # noqa: E402
# Every request of the runner waits this long, not post_json's default 10 min: a batch of
# compressed requests on a busy 2-core host can take longer (Qwen at 4k, 12 requests, the CPU
# shared with a test run: one timed out), and so can one dense prefill of a Qwen 16k prompt.
BATCH_TIMEOUT_S = 3600
# Of host memory, for the server's weights and KV pool (SGLang's --mem-fraction-static).
MEM_FRACTION = 0.6
HEADLINE_METHODS = ["none", "dynsplit", "fixed", "delimiter", "streaming", "quest"]

MODES = {
    "quick": dict(
        models=[SMOL],
        tasks=["passkey", "niah_single", "niah_multikey"],
        contexts={SMOL: [2048, 4096]},
        budgets=[0.25, 0.125], n=20,
        methods=[m for m in ALL_METHODS if m != "dynsplit-bound"],
    ),
    "full": dict(
        models=[SMOL, QWEN],
        tasks=list(T.TASKS),
        contexts={SMOL: [2048, 4096], QWEN: [4096, 8192, 16384]},
        budgets=[0.25, 0.125, 0.0625], n=50,
        methods=list(ALL_METHODS),
    ),
    # The comparison the accuracy issue asks for: both models, budgets users set (fractions
    # and tokens), >= 50 samples per (model, budget) pooled over tasks and contexts, paired
    # statistics of dynsplit against fixed (the Quest-style pages, same score) and Quest.
    "headline": dict(
        models=[SMOL, QWEN],
        tasks=["niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "code_niah",
               "niah_multiturn"],
        contexts={SMOL: [4096, 7936], QWEN: [4096, 8192, 16384]},
        budgets=[0.25, 0.125, 512, 1024], n={SMOL: 4, QWEN: 3},
        methods=HEADLINE_METHODS,
    ),
}


def _sample_ids(path: Path, model: str) -> set:
    """The prompt ids an earlier run's <stem>.samples.jsonl holds for this model with full KV
    (method none: the prompts its comparisons pair on)."""
    with open(path) as f:
        return {r["sample"] for r in map(json.loads, filter(str.strip, f))
                if r["model"] == model and r["method"] == "none"}


def _generate_named(task: str, tok, ctx: int, seed: int, ids: set) -> list:
    """The prompts of this (task, context, seed) whose ids are in `ids`, each generated with its
    own n (an id says `<i>of<n>`; a cwe id `<i>` does not depend on n): --same-samples, so a
    re-run pairs with an earlier run on exactly its prompts."""
    head = f"{task}-{ctx}-{seed}-"
    tails = [i[len(head):] for i in ids if i.startswith(head)]
    ns = {int(t.split("of")[1]) if "of" in t else int(t) + 1 for t in tails}
    out = {}
    for n in sorted(ns):
        out.update({s.id: s for s in T.generate(task, tok, ctx, n, seed=seed) if s.id in ids})
    return list(out.values())


def budget_kind(budget) -> str:
    """A budget above 1 counts tokens attended per step; up to 1 it is a fraction of the
    context (1.0 = full KV)."""
    return "tokens" if budget > 1 else "fraction"


def budget_override(budget) -> tuple:
    return (("budget", int(budget)),) if budget_kind(budget) == "tokens" else \
        (("budget_fraction", float(budget)),)


# DD-Select ablations offered by --ablations default (per-request overrides of dynsplit).
# Blocks finer than the server's (block_size - tolerance < 12) are refused per request: run them
# server-wide instead (--server-arg=--dynsplit-block-size=8), which moves every strategy.
DEFAULT_ABLATIONS = ["alpha=0", "alpha=4", "block_size=32", "tolerance=0",
                     "block_size=20,tolerance=8", "candidates=all"]


@dataclass(frozen=True)
class Method:
    name: str  # row name: "dynsplit", "kvpress-snapkv", "dynsplit(alpha=0)", ...
    budget: float  # fraction of the context (<= 1; 1.0 = full KV) or tokens (> 1) per step
    engine: str  # "sglang" | "kvpress"
    overrides: tuple = field(default=())  # request-id overrides for the SGLang engine

    @property
    def key(self) -> str:
        return f"{self.name}@{self.budget:g}"


def parse_ablation(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        if not _:
            raise SystemExit(f"--ablations: {item!r} is not FIELD=VALUE")
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def build_methods(methods, budgets, ablations) -> list[Method]:
    out = []
    if "none" in methods:
        # Full KV: a budget covering the whole context runs dense.
        out.append(Method("none", 1.0, "sglang", (("budget_fraction", 1.0),)))
    for b in budgets:
        for m in methods:
            if m in ("none",) or m.startswith("kvpress-"):
                continue
            over = VARIANTS.get(m, {"strategy": m})
            out.append(Method(m, b, "sglang", tuple(sorted(over.items())) + budget_override(b)))
        for a in ablations:
            ov = parse_ablation(a)
            name = "dynsplit(" + ",".join(f"{k}={v}" for k, v in ov.items()) + ")"
            out.append(Method(name, b, "sglang",
                              tuple(sorted({"strategy": "dynsplit", **ov}.items()))
                              + budget_override(b)))
        for m in methods:
            if m.startswith("kvpress-") and budget_kind(b) == "fraction":
                out.append(Method(m, b, "kvpress"))
    return out


# -- results file ---------------------------------------------------------------------------------


class Results:
    """Per-output records in <stem>.samples.jsonl (append-only: resume), rows in <out>."""

    def __init__(self, out: Path):
        import threading

        self.lock = threading.RLock()  # the SGLang and kvpress phases run side by side
        self.out = out
        self.samples_path = out.with_name(out.stem + ".samples.jsonl")
        self.records: dict[tuple, dict] = {}
        if self.samples_path.exists():
            for line in self.samples_path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.records[(r["model"], r["sample"], r["method"], r["budget"])] = r
        self.meta: dict = {}
        if out.exists():
            try:
                self.meta = json.loads(out.read_text()).get("meta", {})
            except ValueError:
                pass

    def done(self, model: str, sample: str, m: Method) -> bool:
        return (model, sample, m.name, m.budget) in self.records

    def add(self, recs: list[dict]) -> None:
        with self.lock, open(self.samples_path, "a") as f:
            for r in recs:
                self.records[(r["model"], r["sample"], r["method"], r["budget"])] = r
                f.write(json.dumps(r) + "\n")

    def rows(self, keep=None) -> list[dict]:
        groups = defaultdict(list)
        for r in self.records.values():
            if keep is not None and not keep(r):
                continue
            groups[(r["model"], r["task"], r["context_len"], r["method"], r["budget"],
                    r["seed"])].append(r["score"])
        rows = []
        for (model, task, ctx, method, budget, seed), scores in sorted(groups.items()):
            rows.append(dict(model=model, task=task, context_len=ctx, method=method,
                             budget=budget, budget_kind=budget_kind(budget), n=len(scores),
                             accuracy=round(sum(scores) / len(scores), 4), seed=seed))
        return rows

    def paired(self, keep=None) -> list[dict]:
        """dynsplit against each rigid row, per model and budget, on the samples both answered:
        mean difference (points) and 95% bootstrap CI (stats.py)."""
        from stats import paired_summary

        recs = [r for r in self.records.values() if keep is None or keep(r)]
        out = []
        for model, budget in sorted({(r["model"], r["budget"]) for r in recs
                                     if r["method"] == "dynsplit"}):
            for other in ("fixed", "quest", "delimiter", "streaming"):
                ps = paired_summary(recs, model, budget, "dynsplit", other)
                if ps["n"]:
                    out.append(dict(ps, budget_kind=budget_kind(budget)))
        return out

    def fallback_records(self, keep=None) -> dict[str, int]:
        """Per model, the SGLang records answered in a batch where some compressed request fell
        back to dense attention (the counter is per batch, not per request): 0 means every
        compressed row attended its budget."""
        out: dict[str, int] = {}
        for r in self.records.values():
            if r.get("engine") == "sglang" and (keep is None or keep(r)):
                out[r["model"]] = out.get(r["model"], 0) + bool(r.get("fallback_rows_in_batch"))
        return out

    def degenerate(self, keep=None) -> list[dict]:
        """Per (model, method, budget): outputs with degenerate repetition (repetition.py); of
        the outputs whose prompt full KV also answered (`judged`), those where full KV's output
        has none (what compression added), by sample id."""
        from repetition import degenerate

        groups = defaultdict(list)  # (model, method, budget) -> [(record, loops)]
        for r in self.records.values():
            if keep is None or keep(r):
                key = (r["model"], r["method"], r["budget"])
                groups[key].append((r, degenerate(r["output"])))
        full = {(r["model"], r["sample"]): loops for (_, m, _), rs in groups.items()
                if m == "none" for r, loops in rs}
        out = []
        for (model, method, budget), pairs in sorted(groups.items()):
            rs = [r for r, _ in pairs]
            flagged = [r for r, loops in pairs if loops]
            added = sorted(r["sample"] for r in flagged if full.get((model, r["sample"])) is False)
            out.append(dict(model=model, method=method, budget=budget, n=len(rs),
                            judged=sum((model, r["sample"]) in full for r in rs),
                            degenerate=len(flagged), added=len(added), added_samples=added))
        return out

    def save(self, keep=None) -> None:
        with self.lock:
            data = {"meta": self.meta, "rows": self.rows(keep), "paired": self.paired(keep),
                    "fallback_records": self.fallback_records(keep),
                    "degenerate": self.degenerate(keep)}
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(self.out)


# -- models and environments ----------------------------------------------------------------------


def model_dir(name: str) -> Path:
    from dynsplit_sglang.models import ensure

    try:
        return ensure(name)  # built on first use (or: python -m dynsplit_sglang.models prepare)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def kvpress_python() -> Path:
    """The kvpress venv's interpreter, created on first use (CPU torch only)."""
    from dynsplit_sglang.models import cache_dir

    venv = cache_dir() / "venv-kvpress"
    py = venv / "bin" / "python"
    req = REPO / "requirements" / "kvpress.txt"
    stamp = venv / ".dynsplit-kvpress"
    want = req.read_text()
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return py
    print(f"[accuracy] creating {venv} (kvpress + CPU torch; about a minute)", file=sys.stderr)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if Path("/opt/wheels").is_dir():
        pip += ["--find-links", "/opt/wheels"]
    subprocess.run(pip + ["-r", str(req)], check=True)
    listing = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True).stdout
    bad = [ln for ln in listing.splitlines()
           if ln.lower().startswith("nvidia-") or ("torch " in ln.lower() and "+cu" in ln)]
    if bad:
        raise SystemExit(f"{venv}: pip pulled CUDA wheels ({bad}); delete the venv and check "
                         "requirements/kvpress.txt")
    stamp.write_text(want)
    return py


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("dynsplit-sglang", "sglang", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "dynsplit_sglang", "kernels", "patches"],
                               capture_output=True, text=True).stdout.strip()
        out["git"] = rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["git"] = None
    return out


# -- SGLang phase ---------------------------------------------------------------------------------


def server_config(server_args: list[str]):
    """The server's DynSplit defaults: its --dynsplit-* flags in --server-arg, parsed as the
    server parses them."""
    from dynsplit_sglang.settings import strip_and_parse

    return strip_and_parse(["--kv-compression", "dynsplit", *server_args])[1].config


def check_overrides(methods: list[Method], base) -> None:
    """Refuse, before anything starts, an override the server would reject (it would then run
    the server's settings under the ablation's name)."""
    from dynsplit_sglang.core import ConfigError
    from dynsplit_sglang.overrides import parse_request_id, request_id

    for m in methods:
        if m.engine == "sglang" and m.overrides:
            try:
                parse_request_id(request_id(**dict(m.overrides)), base)
            except ConfigError as e:
                raise SystemExit(f"{m.name}: {e} (e.g. --server-arg=--dynsplit-block-size=8)")


def slots_for_group(methods: list[Method], base, max_ctx: int, rows: int, group: int) -> int:
    """KV slots a server needs so that its block store (sized from the slots) holds, besides the
    blocks registered on the cached prompts, the blocks of every request in a batch that splits
    a prompt its own way (all but the server's own dynsplit). A full store means dense fallback."""
    from dynsplit_sglang.runtime.store import BlockStore

    own = [dict(m.overrides) for m in methods if m.engine == "sglang"
           and m.name not in ("none", "dynsplit")
           and STRATEGIES[dict(m.overrides).get("strategy", base.strategy)].has_blocks]
    per_prompt = sum(-(-max_ctx // o.get("block_size", base.block_size)) for o in own)
    slots = 4096
    while (BlockStore.entry_capacity(slots, rows, base.min_block_len) - slots // base.block_size
           < 1.25 * group * per_prompt):
        slots += 4096
    return slots


def check_pool(log_path: Path, slots: int) -> None:
    """Refuse to measure when SGLang gave the server fewer KV slots than the batch needs: the
    block store is sized from the pool, and a full store means dense fallback rows."""
    found = re.search(r"KV budget of (\d+) dense tokens", Path(log_path).read_text(errors="replace"))
    if found is None or int(found[1]) < slots:
        got = "unknown" if found is None else found[1]
        raise SystemExit(f"the server's KV budget is {got} tokens, below the {slots} this batch "
                         "needs (a full block store means dense fallback): raise "
                         "--server-arg=--mem-fraction-static=F, or lower --group")


def run_sglang(model: str, path: Path, samples: list[T.Sample], methods: list[Method],
               results: Results, tok, args, bar, log_dir: Path) -> dict:
    from dynsplit_sglang.launcher import post_json, start_server
    from dynsplit_sglang.overrides import request_id

    todo = [s for s in samples if any(not results.done(model, s.id, m) for m in methods)]
    bar.update(len(samples) - len(todo))
    if not todo:
        return {}
    max_ctx = max(s.context_len for s in samples)
    stats_path = log_dir / f"dynsplit-stats-{model}.json"
    env = dict(os.environ, DYNSPLIT_STATS_PATH=str(stats_path))
    if args.threads:  # the kvpress runner works side by side: one core each, no spin-waiting
        env["OMP_NUM_THREADS"] = str(args.threads)
    n_req = len(methods) + 1
    group = max(1, args.group)
    rows = max(16, n_req * group)
    slots = args.max_total_tokens or max(
        (group + 3) * max_ctx + 4096,
        slots_for_group(methods, server_config(args.server_arg), max_ctx, rows, group))
    server_args = [
        "--kv-compression", "dynsplit",
        # The launcher's 0.2 of host memory caps Qwen at 8k far below `slots` (fp32 K/V: 24 KiB
        # per token); the pool is checked against `slots` once the server is up.
        "--mem-fraction-static", str(MEM_FRACTION),
        "--max-total-tokens", str(slots),
        "--chunked-prefill-size", str(args.chunked_prefill),
        "--max-running-requests", str(rows),
        "--context-length", str(max_ctx + 256),
        *args.server_arg,
    ]
    info = {"server_args": server_args, "cached_fraction": [], "warm_s": 0.0, "batch_s": 0.0,
            "group": group, "fallback_rows": 0}
    t0 = time.perf_counter()
    with start_server(path, server_args, log_path=log_dir / f"sglang-{model}.log", env=env,
                      health_timeout=600) as h:
        info["startup_s"] = round(time.perf_counter() - t0, 1)
        check_pool(h.log_path, slots)
        url = h.base_url + "/generate"
        fallback_seen = _counter(stats_path, "fallback_rows")
        for g0 in range(0, len(todo), group):
            chunk = todo[g0:g0 + group]
            t1 = time.perf_counter()
            # 1) per prompt, full KV alone: its dense prefill puts the prompt into the radix
            #    cache (deepest needle first, so most of it is already there). A dense request
            #    batched with compressed ones would make the batch's sparse decode plan as wide
            #    as the context. Without `none`, a 1-token warm request does the prefill.
            firsts, jobs = {}, []
            for s in chunk:
                ms = [m for m in methods if not results.done(model, s.id, m)]
                first = next((m for m in ms if m.name == "none"), None)
                gen = {"max_new_tokens": s.max_new_tokens if first else 1, "temperature": 0}
                firsts[s.id] = (first, post_json(url, timeout=BATCH_TIMEOUT_S, payload={
                    "input_ids": s.input_ids, "rid": request_id(budget_fraction=1.0),
                    "sampling_params": gen}))
                jobs += [(s, m) for m in ms if m is not first]
            t2 = time.perf_counter()
            # 2) every compressed (method, budget) of the chunk's prompts in one batch, each
            #    request served from the radix cache (checked through cached_tokens): its
            #    prompt's last token is recomputed as a dense one-token extend, so the first
            #    answer token comes from the prefill, as for any request
            out = []
            if jobs:
                out = post_json(url, timeout=BATCH_TIMEOUT_S, payload={
                    "input_ids": [s.input_ids for s, _ in jobs],
                    "rid": [request_id(**dict(m.overrides)) for _, m in jobs],
                    "sampling_params": [{"max_new_tokens": s.max_new_tokens, "temperature": 0}
                                        for s, _ in jobs]})
            pairs = list(zip(jobs, out)) + [((s, f), o) for s in chunk
                                            for f, o in [firsts[s.id]] if f is not None]
            # 3) later turns (niah_multiturn): each method continues its own conversation
            turns = later_turns(url, pairs, tok)
            t3 = time.perf_counter()
            fell_back = _counter(stats_path, "fallback_rows") - fallback_seen
            fallback_seen += fell_back
            info["fallback_rows"] += fell_back
            info["warm_s"] += t2 - t1
            info["batch_s"] += t3 - t2
            recs = []
            for j, ((s, m), o) in enumerate(pairs):
                meta = o.get("meta_info", {})
                cached = meta.get("cached_tokens", 0)
                if m.name != "none":
                    info["cached_fraction"].append(cached / len(s.input_ids))
                texts = [_text(tok, o)] + [_text(tok, t) for t in turns.get(j, [])]
                recs.append(_record(model, s, m, texts, engine="sglang", cached_tokens=cached,
                                    fallback_rows_in_batch=fell_back))
            results.add(recs)
            results.save(args.keep)
            bar.update(len(chunk))
            bar.set_postfix_str(f"sglang {chunk[-1].task} {chunk[-1].context_len}")
        from dynsplit_sglang.runtime.report import read_published

        info["counters"] = read_published(stats_path) or None
    cf = info.pop("cached_fraction")
    info["min_cached_fraction"] = round(min(cf), 4) if cf else None
    info["mean_cached_fraction"] = round(sum(cf) / len(cf), 4) if cf else None
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    info["warm_s"] = round(info["warm_s"], 1)
    info["batch_s"] = round(info["batch_s"], 1)
    return info


def _counter(stats_path: Path, name: str) -> int:
    from dynsplit_sglang.runtime.report import read_published

    return int(read_published(stats_path).get(name, 0))


def _text(tok, out: dict) -> str:
    ids = out.get("output_ids")
    return tok.decode(ids, skip_special_tokens=True) if ids is not None else out["text"]


def later_turns(url: str, pairs, tok) -> dict[int, list[dict]]:
    """Turns after the first, for the pairs whose sample has followups: turn k's prompt is turn
    k-1's prompt + the method's own answer + the next question. A compressed method's turn is
    put in the radix cache by a dense one-token request first, as its first turn was (the
    answer's first token comes from the prefill either way). Returns {pair index: [response per
    turn]}."""
    from dynsplit_sglang.launcher import post_json
    from dynsplit_sglang.overrides import request_id

    live = {j: (s, m, list(s.input_ids) + list(o.get("output_ids") or []))
            for j, ((s, m), o) in enumerate(pairs) if s.followups}
    out: dict[int, list[dict]] = {j: [] for j in live}
    for k in range(max((len(s.followups) for s, _, _ in live.values()), default=0)):
        step = {j: (s, m, ids + list(s.followups[k]["input_ids"]))
                for j, (s, m, ids) in live.items() if k < len(s.followups)}
        order = sorted(step)
        warm = [j for j in order if step[j][1].name != "none"]
        if warm:
            post_json(url, timeout=BATCH_TIMEOUT_S, payload={
                "input_ids": [step[j][2] for j in warm],
                "rid": [request_id(budget_fraction=1.0) for _ in warm],
                "sampling_params": [{"max_new_tokens": 1, "temperature": 0} for _ in warm]})
        resp = post_json(url, timeout=BATCH_TIMEOUT_S, payload={
            "input_ids": [step[j][2] for j in order],
            "rid": [request_id(**dict(step[j][1].overrides)) for j in order],
            "sampling_params": [{"max_new_tokens": step[j][0].followups[k]["max_new_tokens"],
                                 "temperature": 0} for j in order]})
        for j, r in zip(order, resp):
            out[j].append(r)
            s, m, ids = step[j]
            live[j] = (s, m, ids + list(r.get("output_ids") or []))
    return out


def sample_score(s: T.Sample, texts: list[str]) -> float:
    """Mean over the sample's turns of the fraction of that turn's answers found."""
    answers = [s.answers] + [f["answers"] for f in s.followups]
    return sum(T.score(t, a) for t, a in zip(texts, answers)) / len(answers)


def _record(model, s: T.Sample, m: Method, texts, **extra) -> dict:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) != 1 + len(s.followups):
        raise ValueError(f"{s.id} {m.key}: {len(texts)} turns answered, "
                         f"{1 + len(s.followups)} asked")
    return dict(model=model, sample=s.id, task=s.task, context_len=s.context_len, seed=s.seed,
                method=m.name, budget=m.budget, budget_kind=budget_kind(m.budget),
                score=sample_score(s, texts), output=texts[0] if len(texts) == 1 else texts,
                answers=s.answers, **extra)


# -- kvpress phase --------------------------------------------------------------------------------


def run_kvpress(model: str, path: Path, samples: list[T.Sample], methods: list[Method],
                results: Results, tok, args, bar, log_dir: Path) -> dict:
    kmethods = [m for m in methods if m.engine == "kvpress"]
    if not kmethods:
        return {}
    full = Method("hf-full", 1.0, "kvpress")
    # The runner answers one turn: multi-turn samples are the SGLang side's only.
    todo = [s for s in samples if not s.followups
            and any(not results.done(model, s.id, m) for m in kmethods)]
    bar.update(len(samples) - len(todo))
    if not todo or not kmethods:
        return {}
    py = kvpress_python()
    presses = sorted({m.name.removeprefix("kvpress-") for m in kmethods})
    budgets = sorted({m.budget for m in kmethods}, reverse=True)
    sfile = log_dir / f"kvpress-samples-{model}.json"
    sfile.write_text(json.dumps([s.to_dict() for s in todo]))
    cmd = [str(py), str(HERE / "kvpress_runner.py"), "--model", str(path), "--samples", str(sfile),
           "--presses", *presses, "--budgets", *map(str, budgets),
           "--dense-layers", str(args.kvpress_dense_layers), "--full-every", str(args.full_every),
           "--threads", str(args.threads)]
    by_id = {s.id: s for s in todo}
    by_key = {(m.name.removeprefix("kvpress-"), m.budget): m for m in kmethods}
    info = {"prefilled_tokens": 0, "prompt_tokens": 0}
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH="")  # the runner must not see the main venv's packages
    with open(log_dir / f"kvpress-{model}.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                cwd=log_dir)
        for line in proc.stdout:
            msg = json.loads(line)
            if "hello" in msg:
                info.update(msg["hello"])
                continue
            s = by_id[msg["sample"]]
            recs = []
            full_text = None
            for key, ids in msg["outputs"].items():
                press, _, b = key.partition("@")
                text = tok.decode(ids, skip_special_tokens=True)
                if press == "full":
                    full_text = text
                    continue
                m = by_key.get((press, float(b)))
                if m is not None and not results.done(model, s.id, m):
                    recs.append(_record(model, s, m, text, engine="kvpress",
                                        kept_per_layer=msg["kept_per_layer"].get(key)))
            if full_text is not None:
                recs.append(_record(model, s, full, full_text, engine="kvpress"))
            results.add(recs)
            results.save(args.keep)
            info["prefill_s"] = round(info.get("prefill_s", 0) + msg["prefill_s"], 1)
            info["runner_s"] = round(info.get("runner_s", 0) + msg["total_s"], 1)
            info["prefilled_tokens"] += msg["prefilled"]
            info["prompt_tokens"] += len(s.input_ids)
            bar.update(1)
            bar.set_postfix_str(f"kvpress {s.task} {s.context_len}")
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"kvpress runner failed (rc {rc}); see {log_dir}/kvpress-{model}.log")
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    return info


# -- main -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="the < 45 min CPU configuration")
    mode.add_argument("--full", action="store_true", help="both models, all tasks, 50 samples")
    mode.add_argument("--headline", action="store_true",
                      help="the headline comparison: both models, budgets 1/4, 1/8, 512 and "
                           "1024 tokens, >= 50 samples per (model, budget), paired statistics "
                           "(hours on 2 cores; resumable with --resume)")
    ap.add_argument("--out", required=True, type=Path, help="results JSON (continued with --resume)")
    ap.add_argument("--models", nargs="+", help="override the mode's models")
    ap.add_argument("--tasks", nargs="+", choices=T.TASKS, help="override the mode's tasks")
    ap.add_argument("--contexts", nargs="+", type=int, help="override the contexts (all models)")
    ap.add_argument("--budgets", nargs="+", type=float,
                    help="override the budgets: fractions of the context (<= 1) or tokens (> 1)")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS,
                    help="override the mode's methods")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run whose results --out holds (without it, an existing "
                         "--out is refused)")
    ap.add_argument("-n", "--samples", type=int, help="samples per (task, context) cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablations", nargs="*", default=None, metavar="FIELD=V[,FIELD=V]",
                    help="DD-Select ablations as extra dynsplit methods (per-request overrides "
                         f"of alpha, block_size, tolerance, candidates, recent); bare flag: "
                         f"{' '.join(DEFAULT_ABLATIONS)}")
    ap.add_argument("--no-report", action="store_true", help="skip the markdown/PNG report")
    ap.add_argument("--report-only", action="store_true",
                    help="serve nothing: rebuild rows, paired statistics and the report of this "
                         "configuration from the records in <out stem>.samples.jsonl (e.g. after "
                         "runs of one model each were appended there)")
    ap.add_argument("--kvpress-dense-layers", type=int, default=None,
                    help="layers kvpress leaves uncompressed (default: the product's "
                         "dense_layers, so both sides compress the same layers)")
    ap.add_argument("--max-total-tokens", type=int, default=0)
    ap.add_argument("--chunked-prefill", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the SGLang server and of the kvpress runner, which "
                         "run side by side (default: 1 each when kvpress methods run, so that "
                         "they do not oversubscribe 2 cores; torch's default otherwise); "
                         "0 = torch's default")
    ap.add_argument("--group", type=int, default=3,
                    help="prompts whose compressed requests decode in one batch (SGLang)")
    ap.add_argument("--full-every", type=int, default=3,
                    help="kvpress runner: full-KV HF decode (the cross-check of SGLang's full "
                         "KV) on every k-th prompt; 0 = never")
    ap.add_argument("--same-samples", type=Path, default=None,
                    help="run exactly the prompts an earlier run's <stem>.samples.jsonl ran "
                         "with full KV for each model (of the asked tasks and contexts; each "
                         "generated with its own n), so that the two runs pair sample for sample")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra launch_server flag (repeat; e.g. --server-arg=--dynsplit-sink=4)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # SIGTERM -> SystemExit, so the server's `with` block stops it (no orphaned scheduler).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from dynsplit_sglang.core import DynSplitConfig

    mode_name = next(m for m in MODES if getattr(args, m))
    cfg = MODES[mode_name]
    models = args.models or cfg["models"]
    task_names = args.tasks or cfg["tasks"]
    budgets = args.budgets or cfg["budgets"]
    n_of = lambda model: args.samples or (cfg["n"][model] if isinstance(cfg["n"], dict)  # noqa
                                          else cfg["n"])
    budgets = [int(b) if b > 1 else b for b in budgets]
    if args.out.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{args.out} exists: pass --resume to continue that run, or choose "
                         "another --out")
    ablations = [] if args.ablations is None else (args.ablations or DEFAULT_ABLATIONS)
    if args.kvpress_dense_layers is None:
        args.kvpress_dense_layers = DynSplitConfig().dense_layers
    methods = build_methods(args.methods or cfg["methods"], budgets, ablations)
    check_overrides(methods, server_config(args.server_arg))
    sg_methods = [m for m in methods if m.engine == "sglang"]
    if args.threads is None:
        args.threads = 1 if len(sg_methods) < len(methods) else 0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = Results(args.out)
    # Rows only for what this invocation asks (a results file may hold other configurations).
    wanted = {(m.name, m.budget) for m in methods}
    contexts_of = {m: args.contexts or cfg["contexts"].get(m, [4096]) for m in models}
    args.keep = lambda r: (r["model"] in models and r["task"] in task_names
                           and r["context_len"] in contexts_of[r["model"]]
                           and (r["method"], r["budget"]) in wanted and r["seed"] == args.seed)
    from dynsplit_sglang.models import cache_dir

    log_dir = cache_dir() / "logs" / "accuracy"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta = results.meta
    if args.report_only:  # rows, paired statistics and report from the records already there
        meta.update(command=" ".join(["python"] + sys.argv) + "  # from the records of earlier "
                    "runs in " + results.samples_path.name,
                    date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        results.save(args.keep)
        if not args.no_report:
            import report

            report.write(args.out)
        return 0
    meta.update(
        mode=mode_name, command=" ".join(["python"] + sys.argv),
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions(), machine={"cpus": os.cpu_count(), "platform": platform.platform()},
        config=dict(models=models, tasks=task_names, budgets=budgets,
                    n={m: n_of(m) for m in models}, seed=args.seed, first_token="dense",
                    methods=[m.key for m in methods], ablations=ablations,
                    contexts=contexts_of,
                    dynsplit_defaults=DynSplitConfig().to_dict(),
                    kvpress_dense_layers=args.kvpress_dense_layers,
                    kvpress_setting="presses applied to the whole prompt (context + question) "
                                    "after a dense prefill; first answer token from the dense "
                                    "prefill, as on the SGLang side"),
    )
    meta.setdefault("phases", {})

    # Samples per model (tokenizer-specific), in serving order: per task, deepest first needle
    # first, so each prompt's haystack prefix is already in the cache.
    plan = []
    for model in models:
        path = model_dir(model)
        tok = AutoTokenizer.from_pretrained(path)
        samples = []
        same = None if args.same_samples is None else _sample_ids(args.same_samples, model)
        for task in task_names:
            ts = []
            for ctx in contexts_of[model]:
                if same is None:
                    ts += T.generate(task, tok, ctx, n_of(model), seed=args.seed)
                else:
                    ts += _generate_named(task, tok, ctx, args.seed, same)
            samples += sorted(ts, key=lambda s: (-s.needle_pos, s.context_len, s.id))
        plan.append((model, path, tok, samples))

    total = sum(len(s) for *_, s in plan) * (1 + any(m.engine == "kvpress" for m in methods))
    with tqdm(total=total, desc="accuracy", unit="prompt", dynamic_ncols=True) as bar:
        for model, path, tok, samples in plan:
            ph = meta["phases"].setdefault(model, {})
            # The kvpress runner (its own process) works side by side with the SGLang server.
            kv_info, kv_err = {}, []

            def kv_phase():
                try:
                    kv_info.update(run_kvpress(model, path, samples, methods, results, tok, args,
                                               bar, log_dir))
                except BaseException as e:  # re-raised below
                    kv_err.append(e)

            import threading

            kv_thread = threading.Thread(target=kv_phase, daemon=True)
            kv_thread.start()
            if sg_methods:
                info = run_sglang(model, path, samples, sg_methods, results, tok, args, bar,
                                  log_dir)
                if info:
                    ph["sglang"] = info
            kv_thread.join()
            if kv_err:
                raise kv_err[0]
            if kv_info:
                ph["kvpress"] = kv_info
                meta["versions"]["kvpress"] = kv_info.get("kvpress")
                meta["versions"]["transformers (kvpress venv)"] = kv_info.get("transformers")
            # Agreement of the two full-KV paths (SGLang vs HF transformers) on the same ids.
            agree = [results.records.get((model, s.id, "none", 1.0)) for s in samples]
            hf = [results.records.get((model, s.id, "hf-full", 1.0)) for s in samples]
            pairs = [(a, b) for a, b in zip(agree, hf) if a and b]
            if pairs:
                ph["full_kv_agreement"] = {
                    "n": len(pairs),
                    "same_score": sum(a["score"] == b["score"] for a, b in pairs) / len(pairs),
                    "same_text": sum(a["output"].strip() == b["output"].strip()
                                     for a, b in pairs) / len(pairs),
                    "hf_full_accuracy": sum(b["score"] for _, b in pairs) / len(pairs),
                }
            results.save(args.keep)
    meta["wall_s_this_invocation"] = round(time.perf_counter() - started, 1)
    # A resumed run adds up its invocations (what the results cost in all).
    meta["wall_s_total"] = round(meta.get("wall_s_total", 0) + meta["wall_s_this_invocation"], 1)
    results.save(args.keep)
    print(f"[accuracy] {len(results.rows(args.keep))} rows -> {args.out} "
          f"({meta['wall_s_this_invocation']:.0f} s)", file=sys.stderr)
    if not args.no_report:
        import report

        report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
