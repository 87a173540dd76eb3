"""Serving benchmark: multi-turn agent sessions over a shared system/tool prefix, dense vs DynSplit.

For every configuration (``--kv-compression none``, DynSplit selection at budgets 1/4 and 1/8 of
the context, and with ``--eviction`` the same with ``--dynsplit-evict``) the script starts its own SGLang server, then:

1. per shared-prefix length (``--contexts``): prefills the system/tool prefix once (timed; a warm
   production server has it cached) and, per concurrency level, runs N concurrent agent sessions x
   K turns through an SGLang frontend program (``workload.agent_session``), each turn appending a
   tool observation and generating a reply. Recorded per cell: output tokens/s (all sessions'
   completion tokens / wall time), TTFT and per-token latency (p50/p90, measured on the HTTP
   stream), the radix hit rate (cached / prompt tokens), the peak KV slots in use (SGLang's
   ``sglang:num_used_tokens`` sampled from /metrics) and the DynSplit counters (delta);
2. the long-context decode probe: one prompt filling the model's 8k context (the 6k prefix plus a
   long tool observation), N output tokens, decode tokens/s from the first to the last token,
   median of repeats (the repeats hit the radix cache, so they cost decode only).

    python benchmarks/serving/run.py --quick --out benchmarks/serving/results/quick.json
    python benchmarks/serving/run.py --out benchmarks/serving/results/full.json
    # GPU, unchanged script (Triton kernels, bf16 KV):
    python benchmarks/serving/run.py --device cuda --attention-backend triton --dtype bfloat16 \
        --out benchmarks/serving/results/cuda.json

Then ``report.py`` (called at the end unless --no-report) writes the PNG plots and
``README-section.md`` next to the output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tqdm import tqdm  # noqa: E402

from dynsplit_sglang import launcher  # noqa: E402
from dynsplit_sglang.core import DynSplitConfig  # noqa: E402
from dynsplit_sglang.models import DEFAULT_MODEL, cache_dir, ensure  # noqa: E402

import workload as wl  # noqa: E402

# -- configurations ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    name: str  # the --kv-compression value, "-evict" appended for eviction
    budget: float  # fraction of the context attended per KV head (1.0 = dense)
    flags: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.name if self.budget >= 1.0 else f"{self.name}@1/{round(1 / self.budget)}"


def selection_config(method: str, fraction: float | None) -> Config:
    if method == "none":
        return Config("none", 1.0, ("--kv-compression", "none"))
    return Config(method, fraction,
                  ("--kv-compression", method, "--dynsplit-budget-fraction", str(fraction)))


# Server flags of the eviction configurations ("<method>-evict" rows, added by --eviction).
EVICTION_FLAGS: tuple[str, ...] = ("--dynsplit-evict",)


def eviction_supported() -> bool:
    fields = {f.name for f in dataclasses.fields(DynSplitConfig)}
    return "evict" in fields


def eviction_config(method: str, fraction: float) -> Config:
    if not eviction_supported():
        raise SystemExit("--eviction: this dynsplit_sglang has no eviction (DynSplitConfig.evict)")
    base = selection_config(method, fraction)
    return Config(f"{method}-evict", fraction, base.flags + EVICTION_FLAGS)


def parse_config(spec: str) -> Config:
    """'none', 'dynsplit:0.125', 'fixed:0.25', 'dynsplit-evict:0.125'."""
    name, _, frac = spec.partition(":")
    if name == "none":
        return selection_config("none", None)
    if not frac:
        raise SystemExit(f"--configs {spec!r}: give the budget fraction, e.g. {name}:0.125")
    if name.endswith("-evict"):
        return eviction_config(name[: -len("-evict")], float(frac))
    return selection_config(name, float(frac))


# -- servers -------------------------------------------------------------------------------------


def server_flags(args, cfg: Config) -> list[str]:
    # --decode-log-interval 4: SGLang refreshes its KV-usage gauges when it logs a decode batch
    # --sleep-on-idle: an idle SGLang scheduler otherwise spins a whole core (0.9 core measured
    # here), which would slow whichever server is being measured on a 2-core host
    flags = ["--max-total-tokens", str(args.max_total_tokens), "--enable-metrics",
             "--decode-log-interval", "4", "--sleep-on-idle",
             "--max-running-requests", str(max(8, max(args.concurrency)))]
    if args.chunked_prefill_size:
        flags += ["--chunked-prefill-size", str(args.chunked_prefill_size)]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    return flags + list(cfg.flags) + list(args.server_arg)


def gpu_server_command(model, port, args, flags) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
            "--attention-backend", args.attention_backend, "--enable-cache-report",
            "--skip-server-warmup",
            # compressed decode is not CUDA-graph captured yet: every config runs eagerly, so the
            # comparison stays like for like (pass --server-arg to change it for a dense run)
            "--disable-cuda-graph", *flags]


_LIVE: dict[int, launcher.ServerHandle] = {}  # servers up now, for the SIGTERM handler


def _on_sigterm(*_):
    """Stop the servers first: a session blocked on a stream then fails at once, and the
    frontend's thread pool, which waits for its sessions, lets SystemExit through."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for h in list(_LIVE.values()):
        try:
            os.killpg(h.proc.pid, signal.SIGTERM)  # the launcher starts each in its own group
        except OSError:
            pass
    raise SystemExit(143)


@contextmanager
def server(args, cfg: Config, log_dir: Path):
    log = log_dir / f"server-{cfg.label.replace('/', '_').replace('@', '-')}.log"
    stats = log_dir / f"dynsplit-stats-{cfg.label.replace('/', '_').replace('@', '-')}.json"
    stats.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DYNSPLIT_STATS_PATH"] = str(stats)
    flags = server_flags(args, cfg)
    model = ensure(args.model) if args.model in (DEFAULT_MODEL, "tiny-llama") else args.model
    if args.device == "cpu":
        if args.attention_backend != "torch_native":
            flags = ["--attention-backend", args.attention_backend] + flags
        h = launcher.start_server(model, flags, log, env=env, health_timeout=args.health_timeout)
    else:  # the launcher's flags are the CPU ones: build the command here
        port = launcher.free_port()
        cmd = gpu_server_command(model, port, args, flags)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent,
                                    env=env, start_new_session=True)
        h = launcher.ServerHandle(proc, f"http://127.0.0.1:{port}", log, cmd)
        try:
            launcher.wait_healthy(h, args.health_timeout)
        except BaseException:
            h.stop()
            raise
    h.stats_path = stats
    _LIVE[h.proc.pid] = h
    try:
        yield h
    finally:
        _LIVE.pop(h.proc.pid, None)
        h.stop()


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for k, v in after.items():
        if k in ("compression_ratio", "max_tokens_attended"):
            continue
        if isinstance(v, (int, float)):
            out[k] = v - before.get(k, 0)
    if out.get("tokens_attended"):
        out["compression_ratio"] = out.get("tokens_dense", 0) / out["tokens_attended"]
    if "max_tokens_attended" in after:
        out["max_tokens_attended"] = after["max_tokens_attended"]
    return out


# -- load average ---------------------------------------------------------------------------------


class LoadSampler:
    """1-minute load average every `period` s, to say how contended the timings were."""

    def __init__(self, period: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.period = period

    def _run(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.period):
                return

    def start(self):
        self._t.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "median": statistics.median(s), "max": max(s), "n": len(s)}


# -- the run ----------------------------------------------------------------------------------


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores {name}"


def kv_layout(model_dir, dtype: str) -> tuple[int | None, int | None]:
    """(K+V bytes one token occupies in SGLang's pool over all layers, KV heads)."""
    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    heads = c.get("num_key_value_heads", c.get("num_attention_heads"))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    size = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}.get(dtype, 2)
    return 2 * c["num_hidden_layers"] * heads * head_dim * size, heads


def decode_prompt_ids(tokenizer, endpoint, system: str, n_tokens: int, seed: int) -> list[int]:
    """The shared prefix's system turn (radix hit) + one long tool observation, n_tokens ids."""
    head = tokenizer.encode(wl.system_turn_text(endpoint, system), add_special_tokens=False)
    obs = wl.observation(tokenizer, max(n_tokens - len(head), 16) + 64, seed)
    body = tokenizer.encode("<|im_start|>user\n" + obs, add_special_tokens=False)
    tail = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = head + body[: max(n_tokens - len(head) - len(tail), 0)] + tail
    return ids[:n_tokens]


def measure_cell(ep, h, cfg: Config, cell, system, tok, slot_bytes, startup_s) -> dict:
    s0 = read_stats(h.stats_path)
    summ = wl.run_cell(ep, cell, system, tok).summary()
    return {
        "config": cfg.name, "budget": cfg.budget,
        "concurrency": cell.concurrency, "context_len": cell.context_len,
        "output_tok_per_s": summ["output_tok_per_s"],
        "ttft_ms_p50": summ["ttft_ms_p50"],
        "tpot_ms_p50": summ["tpot_ms_p50"],
        "tpot_ms_p90": summ["tpot_ms_p90"],
        "radix_hit_rate": summ["radix_hit_rate"],
        "kv_slots_in_use": summ["kv_slots_in_use"],
        "kv_mib_in_use": (summ["kv_slots_in_use"] * slot_bytes / 2**20
                          if slot_bytes and summ["kv_slots_in_use"] else None),
        "ttft_ms_p90": summ["ttft_ms_p90"],
        "turns": cell.turns, "output_tokens_per_turn": cell.output_tokens,
        **{k: summ[k] for k in (
            "requests", "wall_s", "output_tokens", "radix_hit_rate_server",
            "prompt_tokens", "cached_tokens", "mean_prompt_tokens",
            "max_prompt_tokens", "kv_slots_active_peak",
            "kv_token_usage_peak", "ttft_ms_p50_by_turn")},
        "dynsplit": stats_delta(s0, read_stats(h.stats_path)),
        "load_1m": os.getloadavg()[0],
        "server_startup_s": startup_s,
    }


def run_probes(pending: list[dict], live: dict, args, bar) -> None:
    """The decode probe, round-robin over the configurations (one server busy at a time), so
    that the load of a shared host hits every configuration alike."""
    for r in range(args.decode_repeats):
        for d in pending:
            bar.set_description(f"{d['cfg'].label}: decode probe {r + 1}/{args.decode_repeats}")
            h = live[d["cfg"]]
            d["probes"].append(wl.decode_probe(h.base_url, d["ids"], args.decode_tokens))
            d["probes"][-1]["load_1m"] = os.getloadavg()[0]
    for d in pending:
        d["s1"] = read_stats(live[d["cfg"]].stats_path)
        bar.update()


def decode_row(d: dict, args, kv_heads) -> dict:
    cfg, probes, ids = d["cfg"], d["probes"], d["ids"]
    speeds = [p["decode_tok_per_s"] for p in probes if p["decode_tok_per_s"]]
    tpots = [p["tpot_ms"] for p in probes if p["tpot_ms"]]
    ds = stats_delta(d["s0"], d.get("s1", {}))
    return {
        "config": cfg.name, "budget": cfg.budget,
        "context_len": len(ids) + args.decode_tokens, "concurrency": 1,
        "prompt_tokens": len(ids), "output_tokens": args.decode_tokens,
        "decode_tok_per_s": statistics.median(speeds) if speeds else None,
        "decode_tok_per_s_all": speeds,
        "tpot_ms_p50": statistics.median(tpots) if tpots else None,
        "prefill_ttft_ms": d["warm"]["ttft_ms"],
        "prefill_cached_tokens": d["warm"]["cached_tokens"],
        "warmup_decode_tok_per_s": d["warm"]["decode_tok_per_s"],
        "kv_tokens_read_per_head": (ds["tokens_attended"] / ds["sparse_layer_steps"] / kv_heads
                                    if ds.get("sparse_layer_steps") and kv_heads else None),
        "dynsplit": ds,
        "load_1m": [p.get("load_1m") for p in probes],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--quick", action="store_true",
                    help="2k/6k prefixes, concurrency 1/4, 3 turns, 32 output tokens "
                         "(CPU: <30 min)")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="none | METHOD:FRACTION (default: none dynsplit:0.25 dynsplit:0.125)")
    ap.add_argument("--eviction", action="store_true",
                    help="also run dynsplit-evict at the same budgets (needs the memory issue)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None,
                    help="shared prefix lengths in tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None)
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--output-tokens", type=int, default=None)
    ap.add_argument("--obs-tokens", type=int, default=None, help="tokens per tool observation")
    ap.add_argument("--decode-context", type=int, default=None,
                    help="context of the decode probe (prompt + output), default: the model's 8k")
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--decode-repeats", type=int, default=None)
    ap.add_argument("--no-decode-probe", action="store_true")
    ap.add_argument("--sequential-probe", action="store_true",
                    help="probe each server right after its cells and stop it (default: keep "
                         "the servers, sleeping, and probe them round-robin at the end)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | ... (SGLang's --device)")
    ap.add_argument("--attention-backend", default=None,
                    help="torch_native (CPU default) | triton (GPU default)")
    ap.add_argument("--dtype", default=None, help="server dtype (CPU: float32 from the launcher)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="KV pool slots per server (default: what the largest cell needs, "
                         ">= 16384)")
    ap.add_argument("--chunked-prefill-size", type=int, default=None)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra launch_server flag (repeatable; use --server-arg=--flag)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--health-timeout", type=float, default=600.0)
    ap.add_argument("--log-dir", default=None, help="server logs (default .cache/logs/serving)")
    ap.add_argument("--no-report", action="store_true", help="skip plots and README section")
    args = ap.parse_args(argv)

    q = args.quick
    args.attention_backend = args.attention_backend or (
        "torch_native" if args.device == "cpu" else "triton")
    args.contexts = args.contexts or ([2048, 6144] if q else [2048, 4096, 6144])
    args.concurrency = args.concurrency or ([1, 4] if q else [1, 2, 4, 8])
    args.turns = args.turns or (3 if q else 4)
    args.output_tokens = args.output_tokens or (32 if q else 64)
    args.obs_tokens = args.obs_tokens or (128 if q else 256)
    args.decode_tokens = args.decode_tokens or (64 if q else 128)
    args.decode_repeats = args.decode_repeats or 3
    if args.decode_context is None:
        args.decode_context = 8192
    specs = args.configs or ["none", "dynsplit:0.25", "dynsplit:0.125"]
    configs = [parse_config(s) for s in specs]
    if args.eviction:
        configs += [eviction_config(c.name, c.budget) for c in configs if c.budget < 1.0]
    need = max(args.contexts) + max(args.concurrency) * (
        args.turns * (args.obs_tokens + args.output_tokens + 16) + 96)
    if args.max_total_tokens is None:
        args.max_total_tokens = max(16384, -(-int(need * 1.25) // 4096) * 4096)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or cache_dir() / "logs" / "serving")
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, lambda *a: _on_sigterm(*a))

    from transformers import AutoTokenizer

    model_dir = ensure(args.model) if args.model in (DEFAULT_MODEL, "tiny-llama") else args.model
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    slot_bytes, kv_heads = kv_layout(model_dir, dtype)
    systems = {c: wl.system_prompt(tok, c, seed=args.seed * 7919 + c) for c in args.contexts}
    cells = [wl.Cell(c, n, args.turns, args.output_tokens, args.obs_tokens, args.seed)
             for c in args.contexts for n in args.concurrency]

    # progress: one unit per server start, prefix warm-up, cell and decode probe
    per_cfg = 1 + len(args.contexts) + len(cells) + (0 if args.no_decode_probe else 2)
    bar = tqdm(total=per_cfg * len(configs), unit="step", dynamic_ncols=True)
    load = LoadSampler().start()
    t_start = time.monotonic()
    rows, decode_rows, prefixes = [], [], []
    try:
        with ExitStack() as stack:
            live = {}  # config -> server, kept (sleeping when idle) for the decode probe
            for cfg in configs:
                bar.set_description(f"{cfg.label}: starting server")
                t0 = time.monotonic()
                h = stack.enter_context(server(args, cfg, log_dir))
                live[cfg] = h
                startup_s = time.monotonic() - t0
                bar.update()
                ep = wl.TimedEndpoint(h.base_url)
                for ctx in args.contexts:
                    bar.set_description(f"{cfg.label}: prefill {ctx}-token prefix")
                    info = wl.warm_prefix(ep, systems[ctx])
                    prefixes.append({"config": cfg.name, "budget": cfg.budget,
                                     "context_len": ctx, **info})
                    bar.update()
                    for cell in (c for c in cells if c.context_len == ctx):
                        bar.set_description(f"{cfg.label}: ctx {ctx} x{cell.concurrency}")
                        rows.append(measure_cell(ep, h, cfg, cell, systems[ctx], tok,
                                                 slot_bytes, startup_s))
                        bar.update()
                if not args.no_decode_probe:
                    # prefill the probe's prompt now (its first probe is the warm-up)
                    bar.set_description(f"{cfg.label}: prefill decode probe")
                    ids = decode_prompt_ids(tok, ep, systems[max(args.contexts)],
                                            args.decode_context - args.decode_tokens - 8,
                                            seed=args.seed + 424242)
                    warm = wl.decode_probe(h.base_url, ids, args.decode_tokens)
                    decode_rows.append({"cfg": cfg, "ids": ids, "warm": warm, "probes": [],
                                        "s0": read_stats(h.stats_path)})
                    bar.update()
                if args.sequential_probe:
                    run_probes(decode_rows[-1:], live, args, bar)
                    stack.pop_all().close()  # this server is done
                    live.clear()
            if not args.sequential_probe:
                run_probes(decode_rows, live, args, bar)
    finally:
        bar.close()
        load_stats = load.stop()
    decode_rows = [decode_row(d, args, kv_heads) for d in decode_rows]

    dense = {d["context_len"]: d["decode_tok_per_s"] for d in decode_rows if d["config"] == "none"}
    for d in decode_rows:
        base = dense.get(d["context_len"])
        d["speedup_vs_dense"] = (d["decode_tok_per_s"] / base
                                 if base and d["decode_tok_per_s"] else None)
    import torch

    result = {
        "meta": {
            "quick": q, "wall_s": time.monotonic() - t_start,
            "load_avg_1m": load_stats,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(),
            "device": args.device, "attention_backend": args.attention_backend,
            "dtype": dtype,
            "torch": torch.__version__, "model": str(args.model),
            "contexts": args.contexts, "concurrency": args.concurrency, "turns": args.turns,
            "output_tokens": args.output_tokens, "obs_tokens": args.obs_tokens,
            "max_total_tokens": args.max_total_tokens, "kv_bytes_per_slot": slot_bytes,
            "configs": [dataclasses.asdict(c) for c in configs],
            "eviction": "not landed: no rows (hook: EVICTION_FLAGS in run.py)"
                        if not eviction_supported() else "supported",
            "notes": ("context_len = nominal tokens of the shared system/tool prefix; budget = "
                      "fraction of each request's context attended per KV head (1.0 = dense); "
                      "kv_slots_in_use = peak sglang:num_used_tokens (slots held by running "
                      "requests, idle radix-cached ones excluded) sampled every 0.5 s; "
                      "radix_hit_rate = cached/prompt tokens of the cell's "
                      "requests; the shared prefix is prefilled before each cell (warm server)."),
        },
        "rows": rows,
        "decode": decode_rows,
        "prefix_prefill": prefixes,
    }
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path} ({len(rows)} rows, {len(decode_rows)} decode probes, "
          f"{result['meta']['wall_s'] / 60:.1f} min, load avg {load_stats})")
    if not args.no_report:
        import report

        report.main([str(out_path), "--out-dir", str(out_path.parent)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
