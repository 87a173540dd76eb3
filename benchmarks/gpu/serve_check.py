"""A short compressed serving run on a GPU with SGLang's decode CUDA graphs on, checked against
the same flags with ``--disable-cuda-graph``.

Passes when both servers give token-identical greedy outputs for a concurrent batch of long
prompts, the graph server really replayed compressed decode (``graph_steps`` > 0, K/V tokens
attended well below dense) and no request fell back to dense attention. Prefill graphs stay off
(``--disable-prefill-cuda-graph``): only decode capture is under test. The graph server starts
with ``DYNSPLIT_UNVERIFIED_CUDA_GRAPHS=1``, the override that exists for this check.

    python benchmarks/gpu/serve_check.py --model .cache/models/tiny-llama --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dynsplit_sglang.graph_support import UNVERIFIED_ENV
from dynsplit_sglang.launcher import post_json, start_server
from dynsplit_sglang.runtime.report import read_published

GPU_ARGS = ["--device", "cuda", "--attention-backend", "triton", "--dtype", "bfloat16",
            "--mem-fraction-static", "0.5", "--max-running-requests", "16",
            "--skip-server-warmup", "--disable-prefill-cuda-graph"]
COMPRESSION = ["--kv-compression", "dynsplit", "--dynsplit-budget", "256",
               "--dynsplit-dense-layers", "0", "--dynsplit-recent", "32"]
GRAPHS_ON = ["--cuda-graph-max-bs-decode", "16"]
GRAPHS_OFF = ["--disable-cuda-graph"]


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def serve(model: Path, flags: list[str], env: dict, prompts, max_new: int, log: Path) -> dict:
    stats = log.with_suffix(".stats.json")
    env = {**os.environ, **env, "DYNSPLIT_STATS_PATH": str(stats)}
    t0 = time.perf_counter()
    with start_server(model, COMPRESSION + flags, log, env=env, base_args=GPU_ARGS,
                      health_timeout=120) as h:
        startup = time.perf_counter() - t0

        def one(ids):
            body = {"input_ids": ids, "sampling_params": {
                "max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
            return post_json(h.base_url + "/generate", body)

        t1 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(one, prompts))
        elapsed = time.perf_counter() - t1
        counters = read_published(stats)  # while the server is up: it publishes every 0.1 s
    return {"startup_s": round(startup, 1), "batch_s": round(elapsed, 2),
            "output_ids": [o["output_ids"] for o in outs], "counters": counters}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--length", type=int, default=1500)
    ap.add_argument("--max-new", type=int, default=48)
    args = ap.parse_args()
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    prompts = _prompts(args.prompts, args.length, vocab)
    logs = args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    graphs = serve(args.model, GRAPHS_ON, {UNVERIFIED_ENV: "1"}, prompts, args.max_new,
                   logs / "serve-graphs.log")
    eager = serve(args.model, GRAPHS_OFF, {}, prompts, args.max_new, logs / "serve-eager.log")
    g, e = graphs["counters"], eager["counters"]
    checks = {
        "outputs_identical": graphs["output_ids"] == eager["output_ids"],
        "graph_replays": g.get("graph_steps", 0) > 0,
        "compressed": 0 < g.get("tokens_attended", 0) < 0.5 * g.get("tokens_dense", 0),
        "eager_server_never_replayed": e.get("graph_steps", 0) == 0,
        "no_dense_fallback": g.get("fallback_rows", 0) == 0 == e.get("fallback_rows", 0),
    }
    result = {"checks": checks, "graphs": {k: v for k, v in graphs.items() if k != "output_ids"},
              "eager": {k: v for k, v in eager.items() if k != "output_ids"}}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(checks))
    print(f"batch of {args.prompts} x {args.length} tokens, {args.max_new} new: "
          f"graphs {graphs['batch_s']} s, eager {eager['batch_s']} s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
