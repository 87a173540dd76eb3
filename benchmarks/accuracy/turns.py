"""Later turns after eviction (issue 38): selection, final eviction and tiered eviction on the
same two-turn samples, through real SGLang servers.

    python benchmarks/accuracy/turns.py --model smollm2-135m-instruct -n 20 \\
        --out benchmarks/accuracy/results/turns-smollm2.jsonl

A sample's first question is asked after a long context; the second, sent as a new request that
extends the first (its prompt, the model's own answer, the next question: a radix hit), asks
about another line, which the first question's eviction may have dropped. Methods, each at the
kept budgets (fractions of the context):

* ``full``: no compression (a budget of the whole context, on the selection server);
* ``select``: block selection, every key kept (the selection server);
* ``evict``: ``--dynsplit-evict`` (prompt scope, ``--dynsplit-evict-hold 1``): what the first
  turn drops is gone;
* ``tier``: the same with ``--dynsplit-evict-tier host``: what it drops waits in the cold tier
  and the second turn brings it back before deciding again.

The selection server answers ``full`` and ``select`` from one cold prefill per sample; each
eviction run starts from an empty cache (a flush), so its first turn decides for itself. The
three servers run side by side, and samples go one after another through all of them.
Rows (one per sample, method, budget) go to --out as JSON lines as they finish, with both
turns' answers and scores and the requests' reports (peak slots while prefilling, tier tokens);
--resume skips what is there. The report is paired, bootstrapped over samples (each sample has
its own context).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stats  # noqa: E402
import tasks as T  # noqa: E402

SERVERS = {
    "select": [],
    "evict": ["--dynsplit-evict", "--dynsplit-evict-hold", "1"],
    "tier": ["--dynsplit-evict", "--dynsplit-evict-hold", "1", "--dynsplit-evict-tier", "host"],
}
METHODS = ("full", "select", "evict", "tier")


def _post(url, ids, max_new, budget):
    from dynsplit_sglang.launcher import post_json

    return post_json(url + "/generate", timeout=3600, payload={
        "input_ids": ids, "sampling_params": {
            "max_new_tokens": max_new, "temperature": 0,
            "custom_params": {"dynsplit": {"budget_fraction": budget}}}})


def _flush(url):
    import urllib.error
    import urllib.request

    for _ in range(300):
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", method="POST"),
                                   timeout=60).read()
            return
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise
            time.sleep(0.2)
    raise RuntimeError("the server never went idle for a flush")


def two_turns(url, s: T.Sample, budget: float) -> dict:
    """Both turns of one sample at one budget: answers, scores and the requests' reports."""
    first = _post(url, s.input_ids, s.max_new_tokens, budget)
    follow = s.followups[0]
    ids2 = list(s.input_ids) + list(first["output_ids"]) + list(follow["input_ids"])
    second = _post(url, ids2, follow["max_new_tokens"], budget)
    texts = [first["text"], second["text"]]
    return dict(output=texts, scores=[T.score(texts[0], s.answers),
                                      T.score(texts[1], follow["answers"])],
                cached_tokens=second["meta_info"].get("cached_tokens"),
                reports=[first["meta_info"].get("dynsplit"), second["meta_info"].get("dynsplit")])


def run(args, samples, done, out_f, bar) -> None:
    """Sample after sample (a run stopped part-way has every method on the samples it did), on
    three servers started side by side (one works at a time)."""
    import contextlib

    from dynsplit_sglang.launcher import start_server
    from dynsplit_sglang.models import cache_dir, ensure

    path = ensure(args.model)
    log_dir = cache_dir() / "logs" / "turns"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = max(s.context_len for s in samples)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with contextlib.ExitStack() as stack:
        urls = {}
        for server, flags in SERVERS.items():
            server_args = ["--kv-compression", "dynsplit", *flags,
                           "--max-total-tokens", str(args.pool or 3 * ctx),
                           "--chunked-prefill-size", str(args.chunk),
                           "--context-length", str(ctx + 256), "--disable-overlap-schedule",
                           "--mem-fraction-static", str(args.mem_fraction)]
            h = stack.enter_context(start_server(
                path, server_args, log_path=log_dir / f"{args.model}-{server}.log", env=env,
                health_timeout=600))
            urls[server] = h.base_url
        for s in samples:
            for m in METHODS:
                server = "select" if m in ("full", "select") else m
                for b in ([1.0] if m == "full" else args.budgets):
                    if (s.id, m, b) in done:
                        continue
                    if server != "select":
                        _flush(urls[server])  # each eviction run decides from a cold prefill
                    t0 = time.perf_counter()
                    rec = dict(model=args.model, sample=s.id, task=s.task,
                               context_len=s.context_len, method=m, budget=b,
                               **two_turns(urls[server], s, b),
                               wall_s=round(time.perf_counter() - t0, 1))
                    out_f.write(json.dumps(rec) + "\n")
                    out_f.flush()
                    bar.update(1)


def report(rows: list[dict], budgets) -> str:
    by = {(r["sample"], r["method"], r["budget"]): r for r in rows}
    samples = sorted({r["sample"] for r in rows})
    lines = ["| method | kept | n | turn 1 | turn 2 | peak slots (median, turn 1) |",
             "|---|---|---|---|---|---|"]
    for m in METHODS:
        for b in ([1.0] if m == "full" else budgets):
            rs = [by[(s, m, b)] for s in samples if (s, m, b) in by]
            if not rs:
                continue
            t1 = 100 * sum(r["scores"][0] for r in rs) / len(rs)
            t2 = 100 * sum(r["scores"][1] for r in rs) / len(rs)
            peaks = sorted((r["reports"][0] or {}).get("prefill_peak_slots", 0) for r in rs)
            lines.append(f"| {m} | {b:g} | {len(rs)} | {t1:.1f} | {t2:.1f} | "
                         f"{peaks[len(peaks) // 2] or '-'} |")
    lines += ["", "Turn 2, paired (points, 95% bootstrap CI over samples):", ""]
    for b in budgets:
        for a, c in (("tier", "select"), ("tier", "evict"), ("evict", "select")):
            recs = [dict(r, score=r["scores"][1]) for r in rows]
            d = stats.paired_summary(recs, rows[0]["model"], b, a, c)
            if d["n"]:
                lines.append(f"- {a} - {c} at {b:g}: {d['mean']:+.1f} "
                             f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}], n = {d['n']}, "
                             f"wins {d['wins']}, losses {d['losses']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", nargs="+", default=["niah_multiturn", "twohop"],
                    choices=[t for t in T.TASKS if t in ("niah_multiturn", "twohop")])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("-n", "--samples", type=int, default=20, help="per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--chunk", type=int, default=512, help="chunked prefill size")
    ap.add_argument("--pool", type=int, default=0, help="--max-total-tokens (default 3 x ctx)")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads of the server")
    ap.add_argument("--mem-fraction", type=float, default=0.4,
                    help="--mem-fraction-static of each server (three load side by side; the "
                         "pool is --pool tokens whatever this allows above it)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    import signal

    # SIGTERM -> SystemExit, so the servers' `with` blocks stop them (no orphaned schedulers).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.out.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{args.out} exists: pass --resume to continue it")
    rows = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()] \
        if args.out.exists() else []
    if not args.report_only:
        from tqdm import tqdm
        from transformers import AutoTokenizer

        from dynsplit_sglang.models import ensure

        tok = AutoTokenizer.from_pretrained(ensure(args.model))
        samples = [s for t in args.task for s in T.generate(t, tok, args.context, args.samples,
                                                             seed=args.seed)]
        done = {(r["sample"], r["method"], r["budget"]) for r in rows}
        total = len(samples) * (1 + 3 * len(args.budgets))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f, tqdm(total=total, initial=len(done), desc="turns",
                                            unit="run", dynamic_ncols=True) as bar:
            run(args, samples, done, f, bar)
        rows = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()]
    print(report(rows, args.budgets) if rows else "no rows yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
