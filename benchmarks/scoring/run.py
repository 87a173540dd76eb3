"""Cost of the delimiter importance score on a dense prefill of the default model.

Prefill alone (SDPA) vs prefill that also lets the scored layers vote (DD-Select's score), on the
same 4k-token prompt, interleaved, median of repeats. Issue target: at most +15%.

Timed by default on one torch thread with the process CPU clock: on a shared 2-core host the wall
clock measures the neighbours, not the code (``--threads 0 --clock wall`` for the usual setting).

    python benchmarks/scoring/run.py --out benchmarks/scoring/results/cpu.json
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynsplit_sglang.core import DynSplitConfig
from dynsplit_sglang.hf_reference import capture_importance
from dynsplit_sglang.models import DEFAULT_MODEL, ensure


def haystack_ids(tok, length: int) -> torch.Tensor:
    import dynsplit_sglang.core as core

    text = "".join(Path(p).read_text() for p in sorted(Path(core.__file__).parent.glob("*.py")))
    ids = tok(text * (1 + length // 2000), return_tensors="pt").input_ids[0]
    return ids[:length].view(1, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--score-layers", type=int, nargs="+", default=[4, 0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    path = ensure(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    ids = haystack_ids(tok, args.tokens)

    def run(score_layers):
        t0 = clock()
        with torch.inference_mode():
            if score_layers is None:
                model(ids, logits_to_keep=1)
            else:
                cfg = DynSplitConfig(score_layers=score_layers)
                with capture_importance(model, cfg) as acc:
                    model(ids, logits_to_keep=1)
                acc.scores(ids.shape[1])
        return clock() - t0

    run(None)  # warm-up
    variants = [None] + args.score_layers
    times = {v: [] for v in variants}
    for _ in tqdm(range(args.repeats), desc="prefill repeats"):
        for v in variants:
            times[v].append(run(v))
    base = statistics.median(times[None])
    rows = []
    n_layers = model.config.num_hidden_layers
    for v in args.score_layers:
        med = statistics.median(times[v])
        rows.append({"tokens": args.tokens, "score_layers": v or n_layers,
                     "prefill_s_median": base, "prefill_with_scores_s_median": med,
                     "overhead": med / base - 1})
    out = {"model": DEFAULT_MODEL, "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "clock": args.clock, "repeats": args.repeats,
           "load_average": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        verdict = "OK" if r["overhead"] <= 0.15 else "MISSES the 15% target"
        print(f"{r['tokens']} tokens, {r['score_layers']} scored layers: prefill "
              f"{r['prefill_s_median']:.2f}s → {r['prefill_with_scores_s_median']:.2f}s "
              f"(+{100 * r['overhead']:.1f}%) {verdict}")


if __name__ == "__main__":
    main()
