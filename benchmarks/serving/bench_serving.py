"""SGLang's own serving benchmark against dense and DynSplit servers, interleaved.

Starts one server per configuration exactly as ``run.py`` does (``--kv-compression none``,
DynSplit at budgets 1/4 and 1/8; all up for the whole run, sleeping when idle), then runs
``python -m sglang.benchmark.serving`` (the tool formerly ``sglang.bench_serving``) with its
generated shared-prefix dataset in multi-turn mode (``--dataset-name generated-shared-prefix
--gsp-num-turns N``, backend ``sglang-oai-chat``: each conversation's turns go to
/v1/chat/completions with the earlier turns and replies in the messages) against every server,
round-robin: round r runs once on every server (order rotated per round), ``--repeats`` rounds
(at least 5 unless ``--allow-few-repeats``). Every run starts from a flushed prefix cache
(``--flush-cache``) and the same dataset (same ``--seed``), so runs are repeats of the same work:
the first request of a group prefills its system prompt, the others hit it. Before the rounds,
each server gets one small untimed warm-up run.

The runs' JSON (``--output-file``) is parsed into ``--out`` (default
``benchmarks/serving/results/bench-serving.json``): per configuration the median and spread over
the runs of output throughput (includes TTFT and prefill), median TPOT, decode tok/s (1000 / median
TPOT), median and p90 TTFT and the cache hit rate, the paired ratios against dense, and the exact
command line per server. ``report.py`` renders it into README-section.md.

    python benchmarks/serving/bench_serving.py --out benchmarks/serving/results/bench-serving.json

The defaults (2 groups x 4 conversations, 2048-token system prompt, 3 turns of a 128-token
question and 48 output tokens, max concurrency 4; 3 configurations x 5 rounds) are sized for about
20 min on a quiet 2-core CPU host; a run took 5 min instead of about 1 with other jobs on the host.

Offline: ``--tokenizer`` and ``--model`` are the local model folder (no hub access is needed).
Where Hugging Face ``datasets`` is not installed (this host's minimal SGLang venv), the module
runs unchanged under a stand-in ``datasets`` (``DATASETS_STANDIN``): it imports it at module
level for other datasets, the generated shared-prefix dataset never calls it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tqdm import tqdm  # noqa: E402

import run  # noqa: E402
import serving_stats as st  # noqa: E402
from dynsplit_sglang.models import cache_dir  # noqa: E402

BENCH_MODULE = "sglang.benchmark.serving"
# sglang.benchmark.serving imports Hugging Face `datasets` at module level (its mmmu loader) but
# the generated-shared-prefix dataset never calls it; this host's minimal SGLang venv leaves
# `datasets` out. Without it the module runs as is under a stand-in whose load_dataset raises.
DATASETS_STANDIN = (
    "import runpy, sys, types; m = types.ModuleType('datasets'); "
    "m.load_dataset = lambda *a, **k: (_ for _ in ()).throw(ModuleNotFoundError("
    "'datasets is not installed (stand-in from benchmarks/serving/bench_serving.py)')); "
    f"sys.modules['datasets'] = m; runpy.run_module('{BENCH_MODULE}', run_name='__main__', "
    "alter_sys=True)")


def bench_entry(python: str = sys.executable) -> list[str]:
    """`python -m sglang.benchmark.serving`, or the same under the `datasets` stand-in."""
    if importlib.util.find_spec("datasets") is not None:
        return [python, "-m", BENCH_MODULE]
    return [python, "-c", DATASETS_STANDIN]
GSP_OPTIONS = ("gsp_num_groups", "gsp_prompts_per_group", "gsp_system_prompt_len",
               "gsp_question_len", "gsp_output_len", "gsp_num_turns")
METRICS = ("output_throughput", "median_tpot_ms", "decode_tok_per_s", "median_ttft_ms",
           "p90_ttft_ms", "median_itl_ms", "duration", "cache_hit_rate")


def bench_command(base_url: str, model: str, args, output_file: str, gsp: dict | None = None,
                  python: str = sys.executable, entry: list[str] | None = None) -> list[str]:
    """The bench_serving command line for one run against base_url (gsp overrides the dataset
    options, for the warm-up; entry: the command before the options, default bench_entry)."""
    g = {k: getattr(args, k) for k in GSP_OPTIONS} | (gsp or {})
    cmd = [*(entry or bench_entry(python)), "--backend", "sglang-oai-chat", "--base-url", base_url,
           "--model", model, "--tokenizer", model, "--dataset-name", "generated-shared-prefix"]
    for k in GSP_OPTIONS:
        cmd += ["--" + k.replace("_", "-"), str(g[k])]
    cmd += ["--num-prompts", str(g["gsp_num_groups"] * g["gsp_prompts_per_group"]),
            "--max-concurrency", str(args.max_concurrency), "--seed", str(args.seed),
            "--flush-cache", "--warmup-requests", "0", "--cache-report", "--disable-tqdm",
            "--output-file", output_file]
    return cmd


def parse_result(path: Path, expected_requests: int | None = None) -> dict:
    """The metrics of a bench_serving output file (its last JSON line)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"{path}: bench_serving wrote no result")
    r = json.loads(lines[-1])
    tpot = r.get("median_tpot_ms")
    cache = r.get("cache_report") or {}
    out = {k: r.get(k) for k in ("output_throughput", "median_tpot_ms", "mean_tpot_ms",
                                 "median_ttft_ms", "p90_ttft_ms", "mean_ttft_ms",
                                 "median_itl_ms", "duration", "completed",
                                 "total_output_tokens", "max_concurrent_requests")}
    # a multi-turn run reports no input tokens (total_input_tokens 0); the cache report has them
    out["prompt_tokens"] = cache.get("total_prompt_tokens")
    out["cached_tokens"] = cache.get("total_cached_tokens")
    out["decode_tok_per_s"] = 1e3 / tpot if tpot else None
    out["cache_hit_rate"] = (cache["cache_hit_rate_pct"] / 100
                             if cache.get("cache_hit_rate_pct") is not None else None)
    if expected_requests is not None and out["completed"] != expected_requests:
        raise RuntimeError(f"{path}: {out['completed']} of {expected_requests} requests "
                           "completed")
    return out


def run_bench(cmd: list[str], log: Path, env: dict, timeout: float) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        # cwd: the log folder (from the repo root `import kernels` would find our kernels/)
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent, env=env,
                           timeout=timeout)
    if p.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"bench_serving exited {p.returncode}; log {log}:\n{tail}")


def reproduce_command(args, model_name: str) -> str:
    cmd = bench_command("http://127.0.0.1:<PORT>", "$MODEL", args, "bench.jsonl",
                        entry=["python", "-m", BENCH_MODULE])
    return (f"MODEL=$(python -m dynsplit_sglang.models path {model_name})\n"
            + shlex.join(cmd).replace("'$MODEL'", '"$MODEL"'))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "bench-serving.json"))
    ap.add_argument("--repeats", type=int, default=st.MIN_REPEATS,
                    help=f"interleaved rounds (default {st.MIN_REPEATS})")
    ap.add_argument("--gsp-num-groups", type=int, default=2)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=4)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    ap.add_argument("--gsp-question-len", type=int, default=128)
    ap.add_argument("--gsp-output-len", type=int, default=48)
    ap.add_argument("--gsp-num-turns", type=int, default=3)
    ap.add_argument("--max-concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1, help="bench_serving's dataset seed")
    ap.add_argument("--run-timeout", type=float, default=1800.0,
                    help="seconds one bench_serving run may take")
    run.add_server_arguments(ap)
    args = ap.parse_args(argv)
    meets = run.check_repeats(ap, args, repeats=args.repeats)
    configs = run.resolve_configs(args)
    args.concurrency = [args.max_concurrency]  # run.server_flags sizes --max-running-requests
    model = run.model_dir(args.model).resolve()  # the path the server serves
    turn_tokens = args.gsp_question_len + args.gsp_output_len + 32
    need = (args.gsp_num_groups * args.gsp_system_prompt_len  # one run's tokens, all cached
            + args.gsp_num_groups * args.gsp_prompts_per_group * args.gsp_num_turns * turn_tokens)
    if args.max_total_tokens is None:
        args.max_total_tokens = max(16384, -(-int(need * 1.25) // 4096) * 4096)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or cache_dir() / "logs" / "serving")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    expected = args.gsp_num_groups * args.gsp_prompts_per_group * args.gsp_num_turns
    warm_gsp = {"gsp_num_groups": 1, "gsp_prompts_per_group": 1, "gsp_num_turns": 1,
                "gsp_output_len": 8}
    run.install_signal_handlers()

    bar = tqdm(total=len(configs) * (2 + args.repeats), unit="step", dynamic_ncols=True)
    load = run.LoadSampler().start()
    t_start = time.monotonic()
    records, servers = [], {}
    try:
        with ExitStack() as stack:
            live, startup = run.start_servers(
                stack, args, configs, log_dir, bar,  # a session's last turn: its longest prompt
                args.gsp_system_prompt_len + args.gsp_num_turns * turn_tokens)
            for cfg, h in live.items():
                slug = cfg.label.replace("/", "_").replace("@", "-")
                bar.set_description(f"{cfg.label}: warm-up run")
                f = log_dir / f"bench-{slug}-warmup.jsonl"
                f.unlink(missing_ok=True)
                cmd = bench_command(h.base_url, str(model), args, str(f), warm_gsp)
                run_bench(cmd, f.with_suffix(".log"), env, args.run_timeout)
                servers[cfg.label] = {
                    "server_command": shlex.join(h.command), "server_startup_s": startup[cfg],
                    "bench_command": shlex.join(bench_command(h.base_url, str(model), args,
                                                              "bench.jsonl")),
                    "warmup_command": shlex.join(cmd)}
                bar.update()
            for r in range(args.repeats):
                for cfg in st.rotate(configs, r):
                    bar.set_description(f"round {r + 1}/{args.repeats}: {cfg.label}")
                    slug = cfg.label.replace("/", "_").replace("@", "-")
                    f = log_dir / f"bench-{slug}-r{r}.jsonl"
                    f.unlink(missing_ok=True)
                    cmd = bench_command(live[cfg].base_url, str(model), args, str(f))
                    t0 = time.monotonic()
                    run_bench(cmd, f.with_suffix(".log"), env, args.run_timeout)
                    records.append({"config": cfg.name, "budget": cfg.budget, "round": r,
                                    **parse_result(f, expected),
                                    "wall_s": time.monotonic() - t0,
                                    "load_1m": os.getloadavg()[0]})
                    bar.update()
    finally:
        bar.close()
        load_stats = load.stop()
    rows = st.summarize(records, (), METRICS, ("output_throughput", "decode_tok_per_s"),
                        baseline="none (dense), same bench_serving settings; paired: same round")
    result = {
        "meta": {**run.run_meta(args, configs, t_start, load_stats),
                 "repeats": args.repeats,
                 "protocol": {"min_repeats": st.MIN_REPEATS, "meets_protocol": meets,
                              "interleaving": "round-robin: every round runs once on every "
                                              "server, configuration order rotated by round"},
                 "bench": {k: getattr(args, k) for k in GSP_OPTIONS}
                 | {"max_concurrency": args.max_concurrency, "seed": args.seed,
                    "backend": "sglang-oai-chat", "requests_per_run": expected},
                 "reproduce_command": reproduce_command(args, args.model),
                 "datasets_standin": bench_entry()[1] == "-c",
                 "notes": ("output_throughput = completion tokens / run duration (includes TTFT "
                           "and prefill); decode_tok_per_s = 1000 / median TPOT; cache_hit_rate "
                           "= cached / prompt tokens (bench_serving --cache-report); the prefix "
                           "cache is flushed before every run")},
        "servers": servers,
        "rows": rows,
        "runs": records,
    }
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path} ({len(records)} runs, {result['meta']['wall_s'] / 60:.1f} min)")
    for row in rows:
        vs = (row.get("vs_dense") or {}).get("decode_tok_per_s") or {}
        print(f"{row['label']}: output {row['output_throughput']['median']:.1f} tok/s, decode "
              f"{row['decode_tok_per_s']['median']:.1f} tok/s"
              + (f", decode vs dense paired {vs['paired']['median']:.2f}x" if vs.get("paired")
                 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
