"""Where one decode step's time goes at 8k context on this host: attention vs the rest.

Replays one request's decode steps of the default model's layout (30 layers, 9 query / 3 KV heads,
head_dim 64, fp32) at an 8k context, in-process, with the product's own code:

* dense attention, every layer: SGLang 0.5.23's ``TorchNativeAttnBackend._run_sdpa_forward_decode``
  (gather the request's K/V slots from the pool, then SDPA) — exactly what the server runs;
* DynSplit: a real ``dynsplit_sglang.runtime.Compressor`` fed like the backend feeds it: one extend
  of the 8k prompt (the scored layers' queries vote; real token ids, so real delimiter candidates),
  then per decode step ``begin_forward`` (block freeze + ``_plan_decode``), 2 dense layers and
  28 × ``decode_layer`` (``SparseDecodeWrapper.run``: score → keep blocks → pool rows +
  attention, plus the counters), and the stats reporter as the server has it;
  ``run`` is also split into its three stages;
* the rest of the step: the model's forward without long-context attention (HF transformers, same
  weights, a 16-token KV cache), which bounds the matmul part of a step.

If a serving result (``run.py`` JSON with decode probes) is given, the measured server TPOT is set
against the modelled step (rest_server = TPOT_dense − 30 × dense attention) and the expected
speedup is computed from the parts, so the gain is explained rather than guessed. ``--server`` also
py-spies a live server's scheduler during an 8k decode (dense and each budget): the share of the
step in dense attention, DynSplit's plan and sparse attention, the rest of the model, the scheduler.

    python benchmarks/serving/profile_decode.py --server \
        --out benchmarks/serving/results/profile-decode.json \
        [--serving benchmarks/serving/results/quick.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from dynsplit_sglang.core import DynSplitConfig, candidate_mask  # noqa: E402
from dynsplit_sglang.core.delimiters import MODES  # noqa: E402
from dynsplit_sglang.kernels import native  # noqa: E402
from dynsplit_sglang.models import DEFAULT_MODEL, ensure  # noqa: E402
from dynsplit_sglang.runtime.compressor import BatchView, Compressor  # noqa: E402
from dynsplit_sglang.runtime.report import Reporter  # noqa: E402

LAYERS, HQ, HKV, D = 30, 9, 3, 64


def serving_tpots(decode: list[dict]) -> dict:
    """{(config, budget): {"tpot_ms_p50": ...}} of run.py's decode rows at their largest context
    (the 8k probe; rows of older results carry tpot_ms_p50, newer ones a tpot_ms spread)."""
    top = max(d["context_len"] for d in decode)
    out = {}
    for d in decode:
        if d["context_len"] == top:
            t = d.get("tpot_ms")
            out[(d["config"], d["budget"])] = {
                "tpot_ms_p50": t["median"] if isinstance(t, dict) else d.get("tpot_ms_p50")}
    return out


def timer(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def sglang_dense():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend._run_sdpa_forward_decode  # self is not used by it


def prompt_ids(tok, n: int) -> torch.Tensor:
    import workload as wl

    text = wl.system_prompt(tok, n // 2, seed=1) + wl.observation(tok, n // 2 + 64, seed=2)
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor(ids[:n])


class Replay:
    """One request of `ctx` tokens in a KV pool, dense and compressed decode on it."""

    def __init__(self, ctx: int, fraction: float | None, tok, ids, stats_path: str | None,
                 dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        self.ctx = ctx
        self.slots_total = ctx + 2048
        shape = (self.slots_total, HKV, D)
        self.k = [torch.randn(shape, generator=g).to(dtype) for _ in range(LAYERS)]
        self.v = [torch.randn(shape, generator=g).to(dtype) for _ in range(LAYERS)]
        self.req_to_token = torch.zeros(4, 8192 + 512, dtype=torch.int32)
        self.req_to_token[0, :ctx] = torch.arange(1, ctx + 1, dtype=torch.int32)  # slot 0: padding
        self.ids = ids
        self.scale = D ** -0.5
        self.q = torch.randn(1, HQ, D, generator=g).to(dtype)
        self.seq = ctx
        self.comp = None
        if fraction is not None:
            masks = {m: candidate_mask(tok, m) for m in MODES}
            cfg = DynSplitConfig(budget_fraction=fraction)
            self.comp = Compressor(
                cfg, num_layers=LAYERS, num_q_heads=HQ, kv_heads=HKV, head_dim=D, dtype=dtype,
                device="cpu", num_slots=self.slots_total, max_rows=4,
                max_context=self.req_to_token.shape[1], req_to_token=self.req_to_token,
                key_buffer=lambda layer: self.k[layer], vocab_masks=masks,
                reporter=Reporter(stats_path))
            self._prefill(g)

    def _prefill(self, g) -> None:
        n = self.ctx
        slots = self.req_to_token[0, :n].clone()
        view = BatchView([0], [0], [n], [0], self.ids[:n], slots, False)
        self.comp.begin_forward(view)
        for layer in range(LAYERS):
            if layer in self.comp.scored:
                q = torch.randn(n, HQ, D, generator=g)
                self.comp.extend_layer(layer, q, self.k[layer], self.scale)
        self.comp.end_extend()

    # -- one decode step ----------------------------------------------------------------------

    def _next_token(self) -> None:
        """Append one token (slot, id) as a decode step does."""
        slot = self.seq + 1
        self.req_to_token[0, self.seq] = slot
        self.seq += 1
        return slot

    def begin_decode(self):
        slot = self._next_token()
        if self.comp is not None:
            tok_id = self.ids[(self.seq - 1) % len(self.ids)].view(1)
            view = BatchView([0], [0], [self.seq], [self.seq - 1], tok_id,
                             torch.tensor([slot], dtype=torch.int32), True)
            self.comp.begin_forward(view)

    def dense_layer(self, layer: int, fn):
        o = torch.empty(1, HQ, D)
        fn(None, self.q, o, self.k[layer], self.v[layer], self.req_to_token,
           torch.tensor([0]), torch.tensor([self.seq]), None, scaling=self.scale,
           enable_gqa=True, causal=False, is_cross_attn=False, sliding_window_size=None)
        return o

    def sparse_layer(self, layer: int):
        return self.comp.decode_layer(layer, self.q, self.k[layer], self.v[layer], self.scale)

    def stages(self, layer: int) -> dict:
        """SparseDecodeWrapper.run split into its stages (ms): the CPU side's planned step
        (kernels.cpu.DecodeStep) scores, keeps blocks, then maps positions to pool rows and
        attends."""
        w = self.comp.wrapper
        step = w._step
        li = layer - self.comp.first_compressed
        center, radius = self.comp.store.center[li], self.comp.store.radius[li]
        t = {}
        t0 = time.perf_counter()
        scores = step.score(self.q, center, radius)
        t1 = time.perf_counter()
        sel = step.keep(scores)
        t2 = time.perf_counter()
        step.attend(self.q, self.k[layer], self.v[layer], sel, self.scale)
        t3 = time.perf_counter()
        t["score_ms"], t["select_ms"] = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        t["attention_ms"] = (t3 - t2) * 1e3  # positions -> pool rows included
        t["tokens_attended"] = int(sel.counts.float().mean())
        return t


def measure(ctx: int, fractions, tok, steps: int, stats_path: str | None) -> dict:
    """Dense and every budget step by step, interleaved (round-robin), so that the noise of a
    shared host hits all alike; per-layer medians over the steps."""
    ids = prompt_ids(tok, ctx + steps + 8)
    dense_fn = sglang_dense()
    t_build = time.perf_counter()
    reps = {"dense": Replay(ctx, None, tok, ids, None)}
    build = {}
    for frac in fractions:
        t_build = time.perf_counter()
        reps[f"{frac}"] = Replay(ctx, frac, tok, ids, stats_path)
        build[f"{frac}"] = time.perf_counter() - t_build
    per_layer = {k: [[] for _ in range(LAYERS)] for k in reps}
    plan = {k: [] for k in reps}
    freeze = {k: [] for k in reps}
    stage_rows = {}
    for i in range(steps + 2):
        for key, rep in reps.items():
            nb = rep.comp.rows[0].nblocks if rep.comp is not None and rep.comp.rows else 0
            t0 = time.perf_counter()
            rep.begin_decode()
            t1 = time.perf_counter()
            froze = rep.comp is not None and rep.comp.rows[0].nblocks > nb
            for layer in range(LAYERS):
                t = time.perf_counter()
                if rep.comp is not None and rep.comp.is_sparse_layer(layer):
                    rep.sparse_layer(layer)
                else:
                    rep.dense_layer(layer, dense_fn)
                if i >= 2:
                    per_layer[key][layer].append((time.perf_counter() - t) * 1e3)
            if i >= 2:  # the first step closes the prompt (one-off), the second warms up
                (freeze[key] if froze else plan[key]).append((t1 - t0) * 1e3)
            if i == steps // 2 and rep.comp is not None:
                stage_rows[key] = [rep.stages(layer) for layer in range(2, LAYERS)
                                   for _ in range(3)]
    out = {}
    med = [statistics.median(v) for v in per_layer["dense"]]
    out["dense"] = {"attn_layer_ms_p50": statistics.median(med), "attention_ms": sum(med),
                    "plan_ms": 0.0, "context_len": reps["dense"].seq}
    for frac in fractions:
        key = f"{frac}"
        rep = reps[key]
        first = rep.comp.first_compressed
        med = [statistics.median(v) for v in per_layer[key]]
        stages = {k: statistics.median(r[k] for r in stage_rows[key]) for k in stage_rows[key][0]}
        p50, fz = statistics.median(plan[key]), freeze[key]
        out[key] = {
            "budget_fraction": frac,
            "budget_tokens": rep.comp.cfg.token_budget(rep.seq),
            "blocks": int(rep.comp.rows[0].nblocks),
            # per step: the plan, plus the block freeze (summaries of 16 generated tokens in 28
            # layers) amortised over the 16 steps it covers; medians (preemption spikes)
            "plan_ms": p50 + ((statistics.median(fz) - p50) / rep.comp.cfg.block_size
                              if fz else 0.0),
            "plan_ms_p50": p50,
            "freeze_step_ms_p50": statistics.median(fz) if fz else None,
            "sparse_layers_ms": sum(med[first:]),
            "sparse_layer_ms_p50": statistics.median(med[first:]),
            "dense_layers_ms": sum(med[:first]),
            "attention_ms": sum(med),
            "run_stages_ms_per_layer": stages,
            "prefill_replay_s": build[key],
            "context_len": rep.seq,
        }
    return out


def rest_of_step(steps: int) -> dict:
    """The model's decode step at a 16-token context (HF transformers, fp32): the non-attention
    part of a step (projections, MLP, norms, lm_head) plus a negligible attention."""
    from transformers import AutoModelForCausalLM, DynamicCache

    path = ensure(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.arange(100, 116).view(1, -1)
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(steps + 3):
            t = time.perf_counter()
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            if i >= 3:
                times.append((time.perf_counter() - t) * 1e3)
    return {"hf_step_ms_16ctx": statistics.median(times)}


# -- the live server: py-spy on the scheduler during an 8k decode ----------------------------------

CATEGORIES = [  # first match wins; substrings of a collapsed py-spy stack
    ("dynsplit sparse attention (Compressor.decode_layer)", ("decode_layer (",)),
    ("dynsplit step plan (Compressor.begin_forward)", ("begin_forward (",)),
    ("dense attention (SGLang gather + SDPA)", ("_run_sdpa_forward_decode",)),
    # the backends' own frames: a bare "forward_decode (" also names layers' decode paths
    # (SGLang's DenseSiluAndMulQuant.forward_decode is the MLP's activation)
    ("other attention-backend work (KV write, views)", ("Backend.forward_decode (",
                                                         "_DynSplitMixin.")),
    ("sampling", ("sampler.py", "sample (")),
    ("model outside attention (projections, MLP, norms, logits)", ("model_runner.py",)),
]


def categorize(collapsed: str) -> dict:
    counts: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        cat = next((name for name, keys in CATEGORIES if any(k in stack for k in keys)),
                   "scheduler and the rest (batching, IPC, output processing)")
        counts[cat] = counts.get(cat, 0) + int(n)
    return counts


def server_profile(fraction, ids, duration: float, log_dir: Path) -> dict:
    """Start a server (dense if fraction is None), decode after an 8k prompt, py-spy the
    scheduler for `duration` s; sample shares per category and the TPOT during the window."""
    import shutil
    import subprocess
    import threading

    import psutil
    import requests

    from dynsplit_sglang import launcher

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    flags = ["--max-total-tokens", "16384", "--kv-compression", "none"] if fraction is None \
        else ["--max-total-tokens", "16384", "--kv-compression", "dynsplit",
              "--dynsplit-budget-fraction", str(fraction)]
    name = "dense" if fraction is None else f"{fraction}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = log_dir / f"profile-server-{name}.log"
    max_new = 8192 - len(ids) - 1
    times: list[float] = []
    first = threading.Event()

    def stream():
        payload = {"input_ids": ids, "stream": True, "sampling_params": {
            "max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
        try:
            with requests.post(h.base_url + "/generate", json=payload, stream=True,
                               timeout=3600) as r:
                for line in r.iter_lines():
                    if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                        times.append(time.perf_counter())
                        first.set()
                    if stop.is_set():
                        break
        except requests.RequestException:  # the server is stopped under it: expected
            pass
        finally:
            first.set()

    stop = threading.Event()
    with launcher.start_server(ensure(DEFAULT_MODEL), flags, log, env=env) as h:
        procs = psutil.Process(h.proc.pid).children(recursive=True)
        sched = next(p for p in procs if "scheduler" in " ".join(p.cmdline() + [p.name()]))
        th = threading.Thread(target=stream, daemon=True)
        th.start()
        first.wait(timeout=1800)
        time.sleep(3.0)
        out = log_dir / f"profile-{name}.txt"
        t0 = time.perf_counter()
        subprocess.run([spy, "record", "--pid", str(sched.pid), "--duration", str(int(duration)),
                        "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(out)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t1 = time.perf_counter()
        stop.set()
        window = [t for t in times if t0 <= t <= t1]
        counts = categorize(out.read_text())
    total = sum(counts.values()) or 1
    tpot = (window[-1] - window[0]) / (len(window) - 1) * 1e3 if len(window) > 2 else None
    return {
        "tpot_ms": tpot, "tokens_in_window": len(window), "samples": total,
        "share": {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])},
        "ms_per_step": ({k: v / total * tpot for k, v in counts.items()} if tpot else None),
        "context_len": len(ids) + (len(times) if times else 0),
    }


def reporter_cost(tmpdir: str) -> float:
    from collections import Counter

    r = Reporter(os.path.join(tmpdir, "stats.json"))
    c = Counter(tokens_attended=10**9, tokens_dense=10**10, requests=100, blocks_built=10**5)
    cost = statistics.median(timer(lambda: r.report(c), 50))  # the hand-off to the writer
    r.close()
    return cost


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=8064, help="tokens in the KV cache (8k)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--serving", default=None, help="run.py JSON with the decode probes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server", action="store_true",
                    help="also py-spy a live server (dense and each budget) during 8k decode")
    ap.add_argument("--server-duration", type=float, default=12.0)
    ap.add_argument("--log-dir", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ensure(DEFAULT_MODEL)))
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    # the compressors' reporters may still be writing there when it is removed
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        attn = measure(args.context, args.budgets, tok, args.steps, os.path.join(tmp, "s.json"))
        rep_ms = reporter_cost(tmp)
    rest = rest_of_step(args.steps)
    live = {}
    if args.server:
        from dynsplit_sglang.models import cache_dir

        log_dir = Path(args.log_dir or cache_dir() / "logs" / "serving")
        log_dir.mkdir(parents=True, exist_ok=True)
        ids = prompt_ids(tok, args.context - 256).tolist()  # room for ~300 decode steps
        for frac in [None] + list(args.budgets):
            live["dense" if frac is None else f"{frac}"] = server_profile(
                frac, ids, args.server_duration, log_dir)
    load1 = os.getloadavg()[0]

    serving = None
    if args.serving and Path(args.serving).exists():
        serving = serving_tpots(json.loads(Path(args.serving).read_text())["decode"])
    dense_tpot = serving.get(("none", 1.0), {}).get("tpot_ms_p50") if serving else None
    rest_server = dense_tpot - attn["dense"]["attention_ms"] if dense_tpot else None
    step = {}
    for key, a in attn.items():
        rest_ms = rest_server if rest_server is not None else rest["hf_step_ms_16ctx"]
        plan_ms = a["plan_ms"]
        total = rest_ms + a["attention_ms"] + plan_ms
        row = {"attention_ms": a["attention_ms"], "plan_ms": plan_ms, "rest_ms": rest_ms,
               "total_ms": total}
        if serving:
            b = 1.0 if key == "dense" else float(key)
            cfg = "none" if key == "dense" else "dynsplit"
            srv = serving.get((cfg, b))
            row["server_tpot_ms"] = srv.get("tpot_ms_p50") if srv else None
        step[key] = row
    for key in args.budgets:
        step[f"{key}"]["modelled_speedup"] = step["dense"]["total_ms"] / step[f"{key}"]["total_ms"]
        if step[f"{key}"].get("server_tpot_ms") and step["dense"].get("server_tpot_ms"):
            step[f"{key}"]["measured_speedup"] = (step["dense"]["server_tpot_ms"]
                                                  / step[f"{key}"]["server_tpot_ms"])

    d = attn["dense"]
    findings = [
        f"Dense attention (SGLang torch_native: gather the request's {d['context_len']} K/V "
        f"slots, then SDPA) costs {d['attn_layer_ms_p50']:.2f} ms per layer, "
        f"{d['attention_ms']:.0f} ms per step over {LAYERS} layers; the rest of the step "
        f"(projections, MLP, lm_head: HF forward at 16 tokens) costs "
        f"{rest['hf_step_ms_16ctx']:.0f} ms"
        + (f", and the server's step outside attention {rest_server:.0f} ms "
           f"(measured TPOT {dense_tpot:.0f} ms − attention)." if rest_server else "."),
    ]
    for b in args.budgets:
        a = attn[f"{b}"]
        st = a["run_stages_ms_per_layer"]
        findings.append(
            f"Budget 1/{round(1 / b)} ({a['budget_tokens']} tokens, {a['blocks']} blocks): "
            f"{a['sparse_layer_ms_p50']:.2f} ms per compressed layer (score "
            f"{st['score_ms']:.2f}, select {st['select_ms']:.2f}, pool rows + attention "
            f"{st['attention_ms']:.2f} over "
            f"{st['tokens_attended']} tokens) + {a['plan_ms']:.1f} ms per step for "
            f"begin_forward (plan + block freeze + stats); attention+plan per step "
            f"{a['attention_ms'] + a['plan_ms']:.0f} ms vs {d['attention_ms']:.0f} ms dense; "
            f"modelled speedup {step[f'{b}']['modelled_speedup']:.2f}x"
            + (f", measured {step[f'{b}']['measured_speedup']:.2f}x."
               if step[f"{b}"].get("measured_speedup") else "."))
    for key, lp in live.items():
        if lp.get("error") or not lp.get("ms_per_step"):
            findings.append(f"Live server ({key}): {lp.get('error', 'no tokens in the window')}")
            continue
        parts = ", ".join(f"{k} {v:.0f} ms ({lp['share'][k]:.0%})"
                          for k, v in sorted(lp["ms_per_step"].items(), key=lambda kv: -kv[1]))
        what = "dense" if key == "dense" else f"budget 1/{round(1 / float(key))}"
        findings.append(f"Live server, py-spy on the scheduler ({what}, ~{lp['context_len']} "
                        f"tokens): TPOT {lp['tpot_ms']:.0f} ms = {parts}.")
    findings.append(f"Handing the DynSplit counters to their writer (DYNSPLIT_STATS_PATH) costs "
                    f"{rep_ms:.2f} ms per call, once per forward; the writer thread writes the "
                    f"file at most every {Reporter.MIN_INTERVAL_S:g} s.")
    result = {
        "context_len": d["context_len"], "layout": f"{LAYERS} layers, {HQ} q / {HKV} kv heads, "
        f"head_dim {D}, fp32", "threads": torch.get_num_threads(), "budgets": args.budgets,
        "steps": args.steps, "load_avg_1m": [load0, load1], "wall_s": time.monotonic() - t0,
        "attention": attn, "rest": rest, "reporter_ms": rep_ms, "step": step,
        "server_profile": live, "dynsplit_refine": DynSplitConfig().refine,
        "findings": findings, **native.describe(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(findings))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
