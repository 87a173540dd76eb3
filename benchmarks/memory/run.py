"""KV memory with eviction: peak KV slots per request, concurrent requests at a fixed pool, accuracy.

    python benchmarks/memory/run.py --out benchmarks/memory/results/quick.json

For each context length (default 4k and 7.5k tokens, the default model) and each configuration
— full KV (``none``), selection-only DynSplit (``dynsplit``: attends to the budget, keeps every
slot) and eviction (``dynsplit-evict``: frees the slots of the least important blocks) at
budgets 1/4 and 1/8 — one SGLang server with the same ``--max-total-tokens`` and
``--chunked-prefill-size`` is started, and:

1. peak: one request of the context length alone; the plugin's ``peak_slots_in_use`` (allocator
   slots in use, read at the end of every prefill chunk before eviction and at every decode
   step) is its peak, since nothing else is cached;
2. concurrency: after ``/flush_cache``, N prompts sharing no prefix of that length at once (N a few more
   than the pool can hold by the single request's footprint); the largest decode batch SGLang
   ran (``max_decode_batch``) is the number served together. SGLang prefills every request it
   can admit before decoding, so the others queued; a "Retract" in the server log (KV pool full
   during decode) is recorded, and such a run counts only the batch before it.
3. accuracy (``--accuracy-samples`` per cell, default 10): the accuracy suite's quick tasks
   (passkey, niah_single, niah_multikey at 2k and 4k, seed 0, the same samples) through the
   eviction servers of the first context; full KV and selection-only DynSplit are read from
   ``benchmarks/accuracy/results/quick.samples.jsonl`` for exactly the same sample ids.

``none`` is served as ``--kv-compression dynsplit --dynsplit-budget-fraction 1.0``: every request
is within its budget, so SGLang's own dense attention runs and every slot is kept — the same
memory as no plugin, measured with the same counters.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "accuracy"))

import tasks as T  # noqa: E402
from dynsplit_sglang.runtime.report import read_published  # noqa: E402

ACC_TASKS = ["passkey", "niah_single", "niah_multikey"]
ACC_CONTEXTS = [2048, 4096]
TARGETS = {0.25: 2.6, 0.125: 4.0}  # peak-slot reduction vs full KV (the targets)


# Server configurations: selection only, eviction decided over the whole prompt (the default
# scope), the same with the prompt held to its budget chunk by chunk until the question decides
# (--dynsplit-evict-hold 1: a peak of about the budget plus one chunk) and eviction decided per
# prefill chunk among its new tokens (query-agnostic).
METHOD_FLAGS = {"dynsplit": [], "dynsplit-evict": ["--dynsplit-evict"],
                "dynsplit-evict-hold": ["--dynsplit-evict", "--dynsplit-evict-hold", "1"],
                "dynsplit-evict-chunk": ["--dynsplit-evict", "--dynsplit-evict-scope", "chunk"]}
METHODS = ("none", *METHOD_FLAGS)
EVICTING = [m for m in METHOD_FLAGS if m.startswith("dynsplit-evict")]
DEFAULT_METHODS = ["none", "dynsplit-evict", "dynsplit-evict-hold", "dynsplit-evict-chunk"]
# Peers that evict once and for good (kvpress, through the accuracy suite's runner on the same
# samples): SnapKV with kvpress's defaults and with its paper's window 32 / max-pool 7, ChunkKV,
# StreamingLLM.
KVPRESS = ["kvpress-snapkv", "kvpress-snapkv-paper", "kvpress-chunkkv", "kvpress-streamingllm"]


def configs(budgets, methods=DEFAULT_METHODS):
    out = [("none", 1.0, ["--dynsplit-budget-fraction", "1.0"])] if "none" in methods else []
    for m in methods:
        if m != "none":
            out += [(m, b, ["--dynsplit-budget-fraction", str(b), *METHOD_FLAGS[m]])
                    for b in budgets]
    return out


def prompts(tok, context_len: int, n: int, offset: int) -> list[list[int]]:
    """n prompts of exactly context_len tokens sharing no prefix: the essays, each prompt
    starting at a different sentence."""
    sentences = T.essay_sentences()
    out = []
    for i in range(n):
        ids, k = [], offset + 97 * i
        while len(ids) < context_len:
            ids += tok(" " + sentences[k % len(sentences)], add_special_tokens=False).input_ids
            k += 1
        out.append(ids[:context_len])
    return out


def generate(url: str, ids: list[int], max_new: int) -> dict:
    from dynsplit_sglang.launcher import post_json

    # Queued requests wait for every prompt before them to be prefilled (on 2 cores, tens of
    # thousands of tokens): the answer may take long.
    return post_json(url + "/generate", {
        "input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}},
        timeout=7200)


def flush(url: str) -> None:
    import urllib.request

    req = urllib.request.Request(url + "/flush_cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        if r.status != 200:
            raise RuntimeError(f"/flush_cache answered {r.status}")


def retractions(log_path: Path) -> int:
    try:
        return log_path.read_text(errors="replace").count("Retract requests")
    except OSError:
        return 0


def measure(model_path, tok, method, budget, flags, context_len, args, log_dir, acc_samples):
    from dynsplit_sglang.launcher import start_server

    tag = f"{method}-{budget}-{context_len}"
    stats = log_dir / f"stats-{tag}.json"
    log = log_dir / f"server-{tag}.log"
    stats.unlink(missing_ok=True)
    env = dict(os.environ, DYNSPLIT_STATS_PATH=str(stats))
    server_args = ["--kv-compression", "dynsplit", *flags,
                   "--max-total-tokens", str(args.max_total_tokens),
                   "--chunked-prefill-size", str(args.chunked_prefill),
                   "--max-running-requests", str(args.max_offered),
                   "--context-length", str(max(context_len, max(ACC_CONTEXTS)) + 256)]
    row = dict(context_len=context_len, method=method, budget=budget, server_args=server_args)
    with start_server(model_path, server_args, log, env=env, health_timeout=600) as h:
        # 1) one request alone
        one = prompts(tok, context_len, 1, offset=11)[0]
        t0 = time.perf_counter()
        generate(h.base_url, one, args.max_new_tokens)
        row["single_request_s"] = round(time.perf_counter() - t0, 1)
        st = read_published(stats)
        row["peak_kv_slots_per_request"] = int(st.get("peak_slots_in_use", 0))
        row["kv_slots_after_prefill"] = int(st.get("slots_in_use", 0))
        row["slots_evicted_single"] = int(st.get("slots_evicted", 0))
        # 2) concurrency at the fixed pool
        flush(h.base_url)
        held = max(row["kv_slots_after_prefill"], 1)
        fit = (args.max_total_tokens - context_len) // held + 1
        n = max(2, min(args.max_offered, fit + args.extra_offered))
        batch = prompts(tok, context_len, n, offset=0)
        before = retractions(log)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(n) as ex:
            list(ex.map(lambda ids: generate(h.base_url, ids, args.concurrent_new_tokens), batch))
        row["concurrency_s"] = round(time.perf_counter() - t0, 1)
        st = read_published(stats)
        row["offered_requests"] = n
        row["max_concurrent_requests"] = int(st.get("max_decode_batch", 0))
        row["retractions"] = retractions(log) - before
        row["counters"] = st
        # 3) accuracy on the quick suite's samples (eviction servers of the first context)
        if acc_samples:
            flush(h.base_url)
            recs = []
            for s in sorted(acc_samples, key=lambda s: (-s.needle_pos, s.context_len, s.id)):
                text = generate(h.base_url, s.input_ids, s.max_new_tokens)["text"]
                recs.append(dict(sample=s.id, task=s.task, context_len=s.context_len,
                                 score=T.score(text, s.answers), output=text))
            row["accuracy_records"] = recs
    return row


def run_kvpress(args, out_json: Path) -> list[dict]:
    """The kvpress peers on the memory benchmark's accuracy samples (the same ids: the tasks
    are generated from the same seed), through the accuracy suite (its own kvpress venv). Kept
    budget = the eviction's budget fraction of the prompt; no dense layers (an evicted slot is
    gone from every layer, so the peers keep none either). Records of samples.jsonl."""
    import subprocess

    cmd = [sys.executable, str(REPO / "benchmarks" / "accuracy" / "run.py"), "--quick",
           "--models", args.model, "--tasks", *ACC_TASKS, "--contexts", *map(str, ACC_CONTEXTS),
           "-n", str(args.accuracy_samples), "--seed", str(args.seed), "--methods", *KVPRESS,
           "--budgets", *map(str, args.budgets), "--kvpress-dense-layers", "0",
           "--threads", "2", "--out", str(out_json), "--resume"]
    print("[memory] kvpress peers:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=REPO)
    stem = out_json.with_suffix("")
    path = stem.parent / (stem.name + ".samples.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 7680])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--max-total-tokens", type=int, default=12288)
    ap.add_argument("--chunked-prefill", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=8, help="the single request's")
    ap.add_argument("--concurrent-new-tokens", type=int, default=16)
    ap.add_argument("--max-offered", type=int, default=24)
    ap.add_argument("--extra-offered", type=int, default=2,
                    help="requests offered beyond what the single request's footprint fits")
    ap.add_argument("--accuracy-samples", type=int, default=10,
                    help="per (task, context) cell, on every server of the first context; "
                         "0 = skip")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=DEFAULT_METHODS)
    ap.add_argument("--no-kvpress", action="store_true",
                    help="leave the kvpress peers out (they run in their own venv)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    ap.add_argument("--report-only", action="store_true",
                    help="start no server: the rows already in --out, the kvpress peers "
                         "(measured unless --no-kvpress) and the statistics")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from dynsplit_sglang.models import DEFAULT_MODEL, cache_dir, ensure

    args.model = DEFAULT_MODEL
    model_path = ensure(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(model_path)
    acc = []
    if args.accuracy_samples:
        for task in ACC_TASKS:
            for ctx in ACC_CONTEXTS:
                acc += T.generate(task, tok, ctx, args.accuracy_samples, seed=args.seed)
    log_dir = cache_dir() / "logs" / "memory"
    log_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plan = [(c, *cfg) for c in args.contexts for cfg in configs(args.budgets, args.methods)]
    rows, t_start = [], time.perf_counter()
    if args.resume and args.out.exists():  # keep the configurations already measured
        rows = [r for r in json.loads(args.out.read_text())["rows"]
                if (r["context_len"], r["method"], r["budget"]) in {p[:3] for p in plan}]
    if args.report_only:
        rows = json.loads(args.out.read_text())["rows"]
    done = {(r["context_len"], r["method"], r["budget"]) for r in rows}
    plan = [] if args.report_only else [p for p in plan if p[:3] not in done]
    for ctx, method, budget, flags in tqdm(plan, desc="memory", unit="server"):
        with_acc = acc if ctx == args.contexts[0] else []
        row = measure(model_path, tok, method, budget, flags, ctx, args, log_dir, with_acc)
        row["model"] = DEFAULT_MODEL
        rows.append(row)
        save(args, rows, acc, t_start)
    if acc and not args.no_kvpress:
        peers = run_kvpress(args, args.out.with_name(args.out.stem + "-kvpress.json"))
        ids = {s.id for s in acc}
        args.peer_records = [r for r in peers if r["sample"] in ids
                             and r["method"] in KVPRESS]
    save(args, rows, acc, t_start)
    return 0


def records(rows, peer_records=()) -> list[dict]:
    """Per-sample scores of every row measured here, and of the peers, as the accuracy
    suite's records (model, sample, method, budget, score): what the paired statistics read."""
    out = [dict(model=r["model"], sample=x["sample"], task=x["task"],
                context_len=x["context_len"], method=r["method"], budget=r["budget"],
                score=x["score"]) for r in rows for x in r.get("accuracy_records") or ()]
    return out + [dict(r, method=r["method"]) for r in peer_records]


def accuracy_table(recs, budgets) -> list[dict]:
    """Accuracy (%) and n per (method, budget) over the same samples."""
    cells: dict = {}
    for r in recs:
        cells.setdefault((r["method"], r["budget"]), []).append(r["score"])
    return [dict(method=m, budget=b, n=len(v), accuracy=round(100 * sum(v) / len(v), 1))
            for (m, b), v in sorted(cells.items(), key=lambda kv: (-kv[0][1], kv[0][0]))]


def paired(recs, budgets, model) -> list[dict]:
    """Each eviction of this package against the peers and the evictions listed before it (so
    dynsplit-evict-hold against dynsplit-evict: what holding costs), at each kept budget,
    paired per sample."""
    from stats import paired_summary

    present = {r["method"] for r in recs}
    out = []
    for mine in [m for m in EVICTING if m in present]:
        earlier = [m for m in EVICTING[:EVICTING.index(mine)] if m in present]
        others = earlier + sorted(present - set(EVICTING) - {"none"})
        for b in budgets:
            for other in others:
                p = paired_summary(recs, model, b, mine, other)
                if p["n"]:
                    out.append(p)
            full = [dict(r, budget=b) for r in recs if r["method"] == "none"]
            p = paired_summary([r for r in recs if r["budget"] == b] + full, model, b, mine,
                               "none")
            if p["n"]:
                out.append(p)
    return out


def save(args, rows, acc, t_start) -> None:
    peer = getattr(args, "peer_records", None)
    if peer is None and args.out.exists():  # a resumed run keeps the peers it measured
        peer = json.loads(args.out.read_text()).get("peer_records", [])
    recs = records(rows, peer or [])
    table = accuracy_table(recs, args.budgets)
    by = {(t["method"], t["budget"]): t for t in table}
    for r in rows:
        t = by.get((r["method"], r["budget"]))
        r["accuracy"] = t["accuracy"] if t else None
        r["accuracy_n"] = t["n"] if t else 0
    full = {r["context_len"]: r["peak_kv_slots_per_request"] for r in rows if r["method"] == "none"}
    for r in rows:
        base = full.get(r["context_len"])
        peak = r["peak_kv_slots_per_request"]
        r["peak_reduction_vs_full"] = round(base / peak, 2) if base and peak else None
    command, wall = " ".join(["python"] + sys.argv), round(time.perf_counter() - t_start)
    if args.report_only:  # the servers' run is what was measured
        before = json.loads(args.out.read_text())["meta"]
        command, wall = f"{before['command']} && {command}", before["wall_s"] + wall
    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=command, wall_s=wall,
                machine={"cpus": os.cpu_count(), "platform": platform.platform()},
                max_total_tokens=args.max_total_tokens, chunked_prefill=args.chunked_prefill,
                accuracy=dict(tasks=ACC_TASKS, contexts=ACC_CONTEXTS, n=args.accuracy_samples,
                              seed=args.seed, budget_kind="kept",
                              kvpress_dense_layers=0),
                targets={str(k): v for k, v in TARGETS.items()})
    args.out.write_text(json.dumps({
        "meta": meta, "rows": rows, "accuracy": table,
        "paired": paired(recs, args.budgets, args.model), "peer_records": peer or []},
        indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
