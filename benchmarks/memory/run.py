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

QUICK_SAMPLES = REPO / "benchmarks" / "accuracy" / "results" / "quick.samples.jsonl"
ACC_TASKS = ["passkey", "niah_single", "niah_multikey"]
ACC_CONTEXTS = [2048, 4096]
TARGETS = {0.25: 2.6, 0.125: 4.0}  # peak-slot reduction vs full KV (the targets)


def configs(budgets):
    out = [("none", 1.0, ["--dynsplit-budget-fraction", "1.0"])]
    for b in budgets:
        out.append(("dynsplit", b, ["--dynsplit-budget-fraction", str(b)]))
    for b in budgets:
        out.append(("dynsplit-evict", b, ["--dynsplit-budget-fraction", str(b), "--dynsplit-evict"]))
    return out


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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

    return post_json(url + "/generate", {
        "input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}})


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
        st = read_stats(stats)
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
        st = read_stats(stats)
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


def reference_accuracy(ids: set[str]) -> dict:
    """Mean score of full KV and selection-only DynSplit on these samples, from the quick run."""
    sums: dict = {}
    for line in QUICK_SAMPLES.read_text().splitlines():
        r = json.loads(line)
        if r["sample"] in ids and r["method"] in ("none", "dynsplit"):
            key = (r["method"], r["budget"])
            s, c = sums.get(key, (0.0, 0))
            sums[key] = (s + r["score"], c + 1)
    return {k: (s / c, c) for k, (s, c) in sums.items()}


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
    ap.add_argument("--accuracy-samples", type=int, default=10, help="per cell; 0 = skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from dynsplit_sglang.models import DEFAULT_MODEL, cache_dir, ensure

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
    plan = [(c, *cfg) for c in args.contexts for cfg in configs(args.budgets)]
    rows, t_start = [], time.perf_counter()
    if args.resume and args.out.exists():  # keep the configurations already measured
        rows = [r for r in json.loads(args.out.read_text())["rows"]
                if (r["context_len"], r["method"], r["budget"]) in {p[:3] for p in plan}]
    done = {(r["context_len"], r["method"], r["budget"]) for r in rows}
    plan = [p for p in plan if p[:3] not in done]
    for ctx, method, budget, flags in tqdm(plan, desc="memory", unit="server"):
        with_acc = acc if (method == "dynsplit-evict" and ctx == args.contexts[0]) else []
        row = measure(model_path, tok, method, budget, flags, ctx, args, log_dir, with_acc)
        row["model"] = DEFAULT_MODEL
        rows.append(row)
        save(args, rows, acc, t_start)
    save(args, rows, acc, t_start)
    return 0


def save(args, rows, acc, t_start) -> None:
    ids = {s.id for s in acc}
    ref = reference_accuracy(ids) if ids and QUICK_SAMPLES.exists() else {}
    measured = {(r["method"], r["budget"]): r["accuracy_records"] for r in rows
                if r.get("accuracy_records")}
    for r in rows:
        key = (r["method"], r["budget"])
        if key in measured:
            recs = measured[key]
            r["accuracy"] = round(100 * sum(x["score"] for x in recs) / len(recs), 1)
            r["accuracy_n"], r["accuracy_source"] = len(recs), "measured in this run"
        elif key in ref and ref[key][1] == len(ids):
            r["accuracy"] = round(100 * ref[key][0], 1)
            r["accuracy_n"] = ref[key][1]
            r["accuracy_source"] = "benchmarks/accuracy/results/quick.samples.jsonl (same samples)"
        else:
            r["accuracy"] = None
    full = {r["context_len"]: r["peak_kv_slots_per_request"] for r in rows if r["method"] == "none"}
    for r in rows:
        base = full.get(r["context_len"])
        peak = r["peak_kv_slots_per_request"]
        r["peak_reduction_vs_full"] = round(base / peak, 2) if base and peak else None
    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=" ".join(["python"] + sys.argv), wall_s=round(time.perf_counter() - t_start),
                machine={"cpus": os.cpu_count(), "platform": platform.platform()},
                max_total_tokens=args.max_total_tokens, chunked_prefill=args.chunked_prefill,
                accuracy=dict(tasks=ACC_TASKS, contexts=ACC_CONTEXTS, n=args.accuracy_samples,
                              seed=args.seed),
                targets={str(k): v for k, v in TARGETS.items()})
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
