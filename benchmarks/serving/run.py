"""Serving benchmark: decode speed at several contexts and multi-turn agent sessions over a shared
system/tool prefix, dense vs DynSplit.

Every configuration (``--kv-compression none``, DynSplit selection at budgets 1/4 and 1/8 of the
context, and with ``--eviction`` the same with ``--dynsplit-evict``) gets its own SGLang server;
all of them are up for the whole run, sleeping when idle (``--sleep-on-idle``), and every
measurement is interleaved round-robin over them, so the load of a shared host hits every
configuration alike and a repeat of one configuration can be paired with the same round's dense
repeat. Then:

1. the decode probe (the headline): per context of ``--decode-contexts`` (prompt + output
   tokens; default 2048 4096 8192) one prompt, sent once untimed to every server (the warm-up:
   it prefills the prompt into the radix cache), then ``--decode-repeats`` timed rounds (default
   5, at least 5 unless ``--allow-few-repeats``, which marks the result as below the protocol);
   each round probes every context on every server (configuration order rotated per round). A
   timed repeat is decode-only: its prompt is a radix hit (cached_tokens is recorded and
   checked), decode tokens/s is measured from the first to the last streamed token and TTFT is
   reported apart. Per (configuration, context): median, min/max and IQR of decode tok/s, TPOT,
   TTFT, and against dense the ratio of medians and the per-round paired ratios;
2. the agent workload: per shared-prefix length (``--contexts``) the system/tool prefix is
   prefilled once per server (timed; a warm production server has it cached), then
   ``--cell-repeats`` interleaved rounds of every cell (N concurrent agent sessions x K turns
   through an SGLang frontend program, ``workload.agent_session``; each round uses new sessions,
   the same text for every configuration). Recorded per cell and repeat: output tokens/s (all
   sessions' completion tokens / wall time: includes TTFT and prefill), per-request decode tok/s
   (1000 / TPOT, TTFT excluded), TTFT and TPOT p50/p90 (measured on the HTTP stream), the radix
   hit rate, the peak KV slots in use and the DynSplit counters.

    python benchmarks/serving/run.py --quick --out benchmarks/serving/results/quick.json
    python benchmarks/serving/run.py --out benchmarks/serving/results/full.json
    # 16k/32k contexts need a model with that window:
    python benchmarks/serving/run.py --model qwen2.5-coder-0.5b-instruct --no-cells \\
        --decode-contexts 8192 16384 32768 --out benchmarks/serving/results/qwen-decode.json
    # GPU, unchanged script (Triton kernels, bf16 KV):
    python benchmarks/serving/run.py --device cuda --attention-backend triton --dtype bfloat16 \\
        --out benchmarks/serving/results/cuda.json

Then ``report.py`` (called at the end unless --no-report) writes the PNG plots and
``README-section.md`` next to the output file. ``bench_serving.py`` runs SGLang's own
``sglang.benchmark.serving`` (generated shared-prefix, multi-turn dataset) against the same
configurations.
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
from dynsplit_sglang.models import (  # noqa: E402
    DEFAULT_MODEL, QWEN_MODEL, TINY_MODEL, cache_dir, ensure)
from dynsplit_sglang.runtime.report import read_published  # noqa: E402

import serving_stats as st  # noqa: E402
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


def model_dir(name: str) -> Path:
    """A model of dynsplit_sglang.models by name (built offline on first use), else a folder."""
    return ensure(name) if name in (DEFAULT_MODEL, TINY_MODEL, QWEN_MODEL) else Path(name)


def model_window(path) -> int | None:
    """The model's context window (max_position_embeddings of its config.json)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None


def server_flags(args, cfg: Config) -> list[str]:
    # --decode-log-interval 4: SGLang refreshes its KV-usage gauges when it logs a decode batch
    # --sleep-on-idle: an idle SGLang scheduler otherwise spins a whole core (0.9 core measured
    # here), which would slow whichever server is being measured on a 2-core host
    flags = ["--max-total-tokens", str(args.max_total_tokens), "--enable-metrics",
             "--decode-log-interval", "4", "--sleep-on-idle",
             "--max-running-requests", str(max(8, max(args.concurrency)))]
    if args.device == "cpu":
        # Of the host memory free at the server's start, for its weights and KV pool. The
        # launcher's 0.2 is for tests; with one server already up it capped a Qwen 32k server's
        # pool to 6175 slots (SGLang shrinks --max-total-tokens to what the fraction allows).
        flags += ["--mem-fraction-static", str(args.mem_fraction_static)]
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
    model = model_dir(args.model)
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
    """A system turn + one long tool observation + the assistant header, n_tokens ids (the
    system turn must be shorter than n_tokens)."""
    head = tokenizer.encode(wl.system_turn_text(endpoint, system), add_special_tokens=False)
    tail = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    obs = wl.observation(tokenizer, max(n_tokens - len(head), 16) + 64, seed)
    body = tokenizer.encode("<|im_start|>user\n" + obs, add_special_tokens=False)
    ids = head + body[: max(n_tokens - len(head) - len(tail), 0)] + tail
    return ids[:n_tokens]


def measure_cell(ep, h, cfg: Config, cell, system, tok, slot_bytes, startup_s) -> dict:
    s0 = read_published(h.stats_path)
    summ = wl.run_cell(ep, cell, system, tok).summary()
    return {
        "config": cfg.name, "budget": cfg.budget,
        "concurrency": cell.concurrency, "context_len": cell.context_len,
        "output_tok_per_s": summ["output_tok_per_s"],
        "decode_tok_per_s_p50": summ["decode_tok_per_s_p50"],
        "ttft_ms_p50": summ["ttft_ms_p50"],
        "tpot_ms_p50": summ["tpot_ms_p50"],
        "tpot_ms_p90": summ["tpot_ms_p90"],
        "radix_hit_rate": summ["radix_hit_rate"],
        "kv_slots_in_use": summ["kv_slots_in_use"],
        "kv_mib_in_use": (summ["kv_slots_in_use"] * slot_bytes / 2**20
                          if slot_bytes and summ["kv_slots_in_use"] else None),
        "ttft_ms_p90": summ["ttft_ms_p90"],
        "turns": cell.turns, "output_tokens_per_turn": cell.output_tokens, "seed": cell.seed,
        **{k: summ[k] for k in (
            "requests", "wall_s", "output_tokens", "radix_hit_rate_server",
            "prompt_tokens", "cached_tokens", "mean_prompt_tokens",
            "max_prompt_tokens", "kv_slots_active_peak",
            "kv_token_usage_peak", "ttft_ms_p50_by_turn")},
        "dynsplit": stats_delta(s0, read_published(h.stats_path)),
        "load_1m": os.getloadavg()[0],
        "server_startup_s": startup_s,
    }


# A timed repeat is decode-only when the radix cache served its prompt: SGLang recomputes the
# last prompt token (its logits start the output), so cached_tokens = prompt_tokens - 1.
MAX_UNCACHED = 1


def run_decode_probe(live: dict, configs: list, prompts: dict, args, bar) -> tuple[list, list]:
    """The warm-up probe of every (configuration, context), then args.decode_repeats rounds,
    each probing every context on every server. Returns (warm-ups, timed repeats)."""
    warm, probes = [], []
    for cfg in st.start_order(configs):
        for ctx, ids in prompts.items():
            bar.set_description(f"{cfg.label}: prefill the {ctx} decode prompt")
            p = wl.decode_probe(live[cfg].base_url, ids, args.decode_tokens)
            warm.append({"config": cfg.name, "budget": cfg.budget, "context": ctx, **p})
            bar.update()
    for r in range(args.decode_repeats):
        for ctx, ids in prompts.items():
            for pos, cfg in enumerate(st.rotate(configs, r)):
                bar.set_description(f"decode round {r + 1}/{args.decode_repeats}: "
                                    f"{ctx} {cfg.label}")
                h = live[cfg]
                s0 = read_published(h.stats_path)
                p = wl.decode_probe(h.base_url, ids, args.decode_tokens)
                probes.append({
                    "config": cfg.name, "budget": cfg.budget, "context": ctx, "round": r,
                    "position": pos, **p,
                    "uncached_tokens": p["prompt_tokens"] - p["cached_tokens"],
                    "load_1m": os.getloadavg()[0],
                    "dynsplit": stats_delta(s0, read_published(h.stats_path))})
                bar.update()
    return warm, probes


DECODE_METRICS = ("decode_tok_per_s", "tpot_ms", "ttft_ms", "uncached_tokens", "load_1m")


def decode_rows(warm: list, probes: list, args, kv_heads) -> list[dict]:
    """One row per (configuration, context): serving_stats.summarize of the timed repeats, the
    warm-up's cold prefill, the radix-hit check and the K/V rows read per step."""
    rows = st.summarize(probes, ("context",), DECODE_METRICS, ("decode_tok_per_s",),
                        baseline="none (dense), same context; paired: same round")
    for row in rows:
        mine = [p for p in probes if p["config"] == row["config"]
                and p["budget"] == row["budget"] and p["context"] == row["context"]]
        w = next(x for x in warm if x["config"] == row["config"]
                 and x["budget"] == row["budget"] and x["context"] == row["context"])
        steps = sum(p["dynsplit"].get("sparse_layer_steps", 0) for p in mine)
        attended = sum(p["dynsplit"].get("tokens_attended", 0) for p in mine)
        row.update({
            "prompt_tokens": w["prompt_tokens"], "output_tokens": args.decode_tokens,
            "context_len": w["prompt_tokens"] + args.decode_tokens,
            "cached_tokens": [p["cached_tokens"] for p in mine],
            "radix_hit_ok": all(p["uncached_tokens"] <= MAX_UNCACHED for p in mine),
            "decode_tok_per_s_all": [p["decode_tok_per_s"] for p in mine],
            "prefill_ttft_ms": w["ttft_ms"], "prefill_cached_tokens": w["cached_tokens"],
            "warmup_decode_tok_per_s": w["decode_tok_per_s"],
            "kv_tokens_read_per_head": (attended / steps / kv_heads
                                        if steps and kv_heads else None),
        })
    return rows


def run_cells(live: dict, configs: list, cells: list, systems: dict, tok, args, slot_bytes,
              startup: dict, bar) -> tuple[list, list]:
    """Prefill every shared prefix on every server, then args.cell_repeats rounds of every cell
    on every server (new sessions per round, the same for every configuration).
    Returns (prefix prefills, one record per cell and repeat)."""
    eps = {cfg: wl.TimedEndpoint(live[cfg].base_url) for cfg in configs}
    prefixes, records = [], []
    for cfg in configs:
        for ctx in args.contexts:
            bar.set_description(f"{cfg.label}: prefill {ctx}-token prefix")
            info = wl.warm_prefix(eps[cfg], systems[ctx], keep_whole=cfg.name.endswith("-evict"))
            prefixes.append({"config": cfg.name, "budget": cfg.budget, "context_len": ctx,
                             **info})
            bar.update()
    for r in range(args.cell_repeats):
        for cell in cells:
            cell_r = dataclasses.replace(cell, seed=cell.seed + 1000 * r)
            for cfg in st.rotate(configs, r):
                bar.set_description(f"cells round {r + 1}/{args.cell_repeats}: ctx "
                                    f"{cell.context_len} x{cell.concurrency} {cfg.label}")
                rec = measure_cell(eps[cfg], live[cfg], cfg, cell_r, systems[cell.context_len],
                                   tok, slot_bytes, startup[cfg])
                records.append({**rec, "round": r})
                bar.update()
    return prefixes, records


CELL_METRICS = ("output_tok_per_s", "decode_tok_per_s_p50", "ttft_ms_p50", "ttft_ms_p90",
                "tpot_ms_p50", "tpot_ms_p90", "radix_hit_rate", "kv_slots_in_use")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1]")
    return value


def add_server_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that choose and start the servers (shared with bench_serving.py)."""
    ap.add_argument("--configs", nargs="+", default=None,
                    help="none | METHOD:FRACTION (default: none dynsplit:0.25 dynsplit:0.125)")
    ap.add_argument("--eviction", action="store_true",
                    help="also run dynsplit-evict at the same budgets (needs the memory issue)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | ... (SGLang's --device)")
    ap.add_argument("--attention-backend", default=None,
                    help="torch_native (CPU default) | triton (GPU default)")
    ap.add_argument("--dtype", default=None, help="server dtype (CPU: float32 from the launcher)")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"{DEFAULT_MODEL} (8k window) | {QWEN_MODEL} (32k) | a model folder")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="KV pool slots per server (default: what the run needs, >= 16384)")
    ap.add_argument("--chunked-prefill-size", type=int, default=None)
    ap.add_argument("--mem-fraction-static", type=_fraction, default=0.6,
                    help="CPU: of the host memory free at each server's start, for its weights "
                         "and KV pool (SGLang's flag; the pool is checked once it is up)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra launch_server flag (repeatable; use --server-arg=--flag)")
    ap.add_argument("--health-timeout", type=float, default=600.0)
    ap.add_argument("--log-dir", default=None, help="server logs (default .cache/logs/serving)")
    ap.add_argument("--allow-few-repeats", action="store_true",
                    help=f"allow fewer than {st.MIN_REPEATS} repeats (smoke runs): the result "
                         "is marked as not meeting the protocol")


def resolve_configs(args) -> list[Config]:
    args.attention_backend = args.attention_backend or (
        "torch_native" if args.device == "cpu" else "triton")
    specs = args.configs or ["none", "dynsplit:0.25", "dynsplit:0.125"]
    configs = [parse_config(s) for s in specs]
    if args.eviction:
        configs += [eviction_config(c.name, c.budget) for c in configs if c.budget < 1.0]
    if not any(c.name == st.DENSE for c in configs):
        print("note: no dense configuration ('none'): no ratio against dense", file=sys.stderr)
    return configs


def check_repeats(ap, args, **repeats: int) -> bool:
    """Whether every repeat count meets the protocol; an error below it without the flag."""
    low = {k: v for k, v in repeats.items() if v < st.MIN_REPEATS}
    if low and not args.allow_few_repeats:
        ap.error(", ".join(f"--{k.replace('_', '-')} {v}" for k, v in low.items())
                 + f" is below the protocol's {st.MIN_REPEATS} repeats; pass "
                 "--allow-few-repeats to run anyway (the result is marked as below protocol)")
    return not low


def start_servers(stack: ExitStack, args, configs: list, log_dir: Path, bar,
                  longest: int = 0) -> tuple[dict, dict]:
    """Every configuration's server, up (sleeping when idle) until the stack closes, each
    checked to hold the longest prompt (tokens), the dense baseline started last (start_order).
    Returns ({config: handle}, {config: startup seconds})."""
    live, startup = {}, {}
    for cfg in st.start_order(configs):
        bar.set_description(f"{cfg.label}: starting server")
        t0 = time.monotonic()
        live[cfg] = stack.enter_context(server(args, cfg, log_dir))
        startup[cfg] = time.monotonic() - t0
        wl.check_pool(live[cfg].log_path, longest, cfg.label)
        bar.update()
    return live, startup


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, lambda *a: _on_sigterm(*a))


def run_meta(args, configs, t_start: float, load_stats: dict) -> dict:
    """What every result file records about the run (host, load, model, servers)."""
    import torch

    from dynsplit_sglang.core import DynSplitConfig

    return {
        # the block selection every dynsplit server ran (its configs set no other refine)
        "dynsplit_refine": DynSplitConfig().refine,
        "wall_s": time.monotonic() - t_start, "load_avg_1m": load_stats,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "device": args.device, "attention_backend": args.attention_backend,
        "dtype": args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
        "torch": torch.__version__, "model": str(args.model),
        "max_total_tokens": args.max_total_tokens,
        "configs": [dataclasses.asdict(c) | {"label": c.label} for c in configs],
        "start_order": [c.label for c in st.start_order(configs)],
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
    }


REPO = HERE.parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--quick", action="store_true",
                    help="cells: 2k/6k prefixes, concurrency 1/4, 3 turns, 32 output tokens, "
                         "3 repeats; decode probe: 64 tokens (CPU: < 30 min)")
    ap.add_argument("--decode-contexts", type=int, nargs="+", default=None,
                    help="decode probe contexts, prompt + output tokens (default 2048 4096 "
                         "8192; at most the model's window)")
    ap.add_argument("--decode-tokens", type=int, default=None,
                    help="output tokens per decode probe (default 64 quick, 128 full)")
    ap.add_argument("--decode-repeats", type=int, default=st.MIN_REPEATS,
                    help=f"timed rounds of the decode probe (default {st.MIN_REPEATS})")
    ap.add_argument("--no-decode-probe", action="store_true")
    ap.add_argument("--contexts", type=int, nargs="+", default=None,
                    help="agent cells: shared prefix lengths in tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None)
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--output-tokens", type=int, default=None)
    ap.add_argument("--obs-tokens", type=int, default=None, help="tokens per tool observation")
    ap.add_argument("--cell-repeats", type=int, default=None,
                    help=f"interleaved rounds of the agent cells (default 3 quick, "
                         f"{st.MIN_REPEATS} full)")
    ap.add_argument("--no-cells", action="store_true", help="decode probe only")
    add_server_arguments(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-report", action="store_true", help="skip plots and README section")
    args = ap.parse_args(argv)

    q = args.quick
    args.decode_contexts = args.decode_contexts or [2048, 4096, 8192]
    args.contexts = args.contexts or ([2048, 6144] if q else [2048, 4096, 6144])
    args.concurrency = args.concurrency or ([1, 4] if q else [1, 2, 4, 8])
    args.turns = args.turns or (3 if q else 4)
    args.output_tokens = args.output_tokens or (32 if q else 64)
    args.obs_tokens = args.obs_tokens or (128 if q else 256)
    args.decode_tokens = args.decode_tokens or (64 if q else 128)
    args.cell_repeats = args.cell_repeats or (3 if q else st.MIN_REPEATS)
    if args.no_decode_probe:
        args.decode_contexts = []
    if args.no_cells:
        args.contexts, args.cell_repeats = [], 0
    decode_ok = check_repeats(ap, args, decode_repeats=args.decode_repeats)
    cells_ok = args.no_cells or args.cell_repeats >= st.MIN_REPEATS
    configs = resolve_configs(args)

    model = model_dir(args.model)
    window = model_window(model)
    too_long = [c for c in args.decode_contexts + args.contexts if window and c > window]
    if too_long:
        ap.error(f"contexts {too_long} exceed {args.model}'s {window}-token window (16k/32k: "
                 f"--model {QWEN_MODEL})")
    margin = 8  # decode prompt = context - output tokens - margin
    need_cells = (max(args.contexts) + max(args.concurrency) * (
        args.turns * (args.obs_tokens + args.output_tokens + 16) + 96)) if args.contexts else 0
    # Every probe prompt stays cached on every server, and a dynsplit server's block store takes
    # its share of the same budget (14% of the pool for Qwen at 32k: 53248 -> 45933 slots).
    need_decode = (sum(args.decode_contexts) + 2048) * 1.2
    if args.max_total_tokens is None:
        need = max(need_cells * 1.25, need_decode)
        args.max_total_tokens = max(16384, -(-int(need) // 4096) * 4096)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or cache_dir() / "logs" / "serving")
    log_dir.mkdir(parents=True, exist_ok=True)
    install_signal_handlers()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    slot_bytes, kv_heads = kv_layout(model, dtype)
    systems = {c: wl.system_prompt(tok, c, seed=args.seed * 7919 + c) for c in args.contexts}
    cells = [wl.Cell(c, n, args.turns, args.output_tokens, args.obs_tokens, args.seed)
             for c in args.contexts for n in args.concurrency]

    n_cfg, n_ctx = len(configs), len(args.decode_contexts)
    bar = tqdm(total=n_cfg * (1 + n_ctx * (1 + args.decode_repeats) + len(args.contexts)
                              + len(cells) * args.cell_repeats), unit="step", dynamic_ncols=True)
    load = LoadSampler().start()
    t_start = time.monotonic()
    warm, probes, prefixes, cell_records = [], [], [], []
    try:
        with ExitStack() as stack:
            live, startup = start_servers(stack, args, configs, log_dir, bar,
                                          max(args.decode_contexts + args.contexts, default=0))
            if args.decode_contexts:
                ep = wl.TimedEndpoint(live[configs[0]].base_url)  # its chat template
                probe_system = wl.system_prompt(tok, 512, seed=args.seed * 7919 + 1)
                prompts = {c: decode_prompt_ids(tok, ep, probe_system,
                                                c - args.decode_tokens - margin,
                                                seed=args.seed + 424242 + c)
                           for c in args.decode_contexts}
                warm, probes = run_decode_probe(live, configs, prompts, args, bar)
            if cells:
                prefixes, cell_records = run_cells(live, configs, cells, systems, tok, args,
                                                   slot_bytes, startup, bar)
    finally:
        bar.close()
        load_stats = load.stop()
    decode = decode_rows(warm, probes, args, kv_heads) if probes else []
    rows = st.summarize(cell_records, ("context_len", "concurrency"), CELL_METRICS,
                        ("output_tok_per_s", "decode_tok_per_s_p50"),
                        baseline="none (dense), same cell; paired: same round")
    targets = st.target_checks(decode) if decode else []

    result = {
        "meta": {
            **run_meta(args, configs, t_start, load_stats),
            "quick": q, "contexts": args.contexts, "concurrency": args.concurrency,
            "turns": args.turns, "output_tokens": args.output_tokens,
            "obs_tokens": args.obs_tokens, "kv_bytes_per_slot": slot_bytes,
            "decode_contexts": args.decode_contexts, "decode_tokens": args.decode_tokens,
            "protocol": {"min_repeats": st.MIN_REPEATS, "decode_repeats": args.decode_repeats,
                         "cell_repeats": args.cell_repeats, "decode_meets_protocol": decode_ok,
                         "cells_meet_protocol": cells_ok,
                         "interleaving": "round-robin: every round probes every context on "
                                         "every server, configuration order rotated by round"},
            "eviction": "not landed: no rows (hook: EVICTION_FLAGS in run.py)"
                        if not eviction_supported() else "supported",
            "notes": ("decode probe: context = nominal prompt + output tokens; timed repeats hit "
                      "the radix cache (prompt prefilled by the warm-up), decode tok/s from the "
                      "first to the last streamed token, TTFT apart. Cells: context_len = "
                      "nominal tokens of the shared system/tool prefix; budget = fraction of "
                      "each request's context attended per KV head (1.0 = dense); output_tok_per_s "
                      "includes TTFT and prefill, decode_tok_per_s_p50 = median over requests "
                      "of 1000/TPOT; kv_slots_in_use = peak sglang:num_used_tokens sampled "
                      "every 0.5 s; radix_hit_rate = cached/prompt tokens of the cell's requests; "
                      "the shared prefix is prefilled before the cells (warm server)."),
        },
        "targets": targets,
        "decode": decode,
        "decode_probes": probes,
        "decode_warmup": warm,
        "rows": rows,
        "cells": cell_records,
        "prefix_prefill": prefixes,
    }
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path} ({len(decode)} decode rows from {len(probes)} probes, "
          f"{len(rows)} cell rows from {len(cell_records)} cells, "
          f"{result['meta']['wall_s'] / 60:.1f} min, load avg {load_stats})")
    for t in targets:
        print(f"target: {t['name']}: {t['verdict']} (value {t['value']}, threshold "
              f"{t['threshold']})")
    if not args.no_report:
        import report

        report.main([str(out_path), "--out-dir", str(out_path.parent)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
