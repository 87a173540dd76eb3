"""The multi-turn agent workload: synthetic shared system/tool prefixes, sessions, and the SGLang
frontend program that drives them, with per-request timing taken at the HTTP stream.

An *agent session* is one SGLang frontend program (``agent_session``): the shared system prompt
(agent rules + tool schemas, 2k-6k tokens, identical for every session of a cell), then K turns,
each appending a tool observation as a user message and generating an assistant reply. The
frontend interpreter re-sends the whole conversation on every ``gen``; SGLang's radix cache serves
the shared prefix and the earlier turns.

``TimedEndpoint`` is ``sgl.RuntimeEndpoint`` whose ``generate`` streams (``/generate`` with
``"stream": true``) and timestamps every chunk, so each ``gen`` yields TTFT, per-token latency and
the server's ``meta_info`` (prompt/cached/completion tokens) without changing the program.

Everything is deterministic in its seed: the same cell sends the same text to every configuration.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import requests

import sglang as sgl
from sglang.lang.global_config import global_config
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

# -- synthetic text ------------------------------------------------------------------------------

_WORDS = (
    "file path line error test module function value config request buffer cache token query "
    "block index server client result status output input parse build run check update return "
    "list item count size limit range offset page layer head model batch step time memory "
    "thread process handle stream event queue record field schema option default current "
    "previous next first last local remote user agent tool call response message context"
).split()
_VERBS = ("reads", "writes", "returns", "checks", "updates", "lists", "parses", "builds",
          "validates", "computes", "loads", "stores", "filters", "merges", "sorts")
_TOOLS = ("search_files", "read_file", "write_file", "run_tests", "run_shell", "git_diff",
          "git_log", "list_dir", "grep_code", "http_get", "query_db", "open_issue",
          "comment_issue", "install_package", "format_code", "lint_code", "profile_run",
          "fetch_docs", "summarize_log", "create_branch", "apply_patch", "benchmark",
          "get_metrics", "kill_process")
_TYPES = ("string", "integer", "boolean", "number", "array")


def _sentence(rnd: random.Random, lo: int = 6, hi: int = 16) -> str:
    n = rnd.randint(lo, hi)
    words = [rnd.choice(_WORDS) for _ in range(n)]
    words.insert(rnd.randint(1, n - 1), rnd.choice(_VERBS))
    if n > 9 and rnd.random() < 0.5:
        words[rnd.randint(2, n - 2)] += ","
    s = " ".join(words)
    return s[0].upper() + s[1:] + rnd.choice(".....;:!?")


def _tool_schema(rnd: random.Random, i: int) -> str:
    name = f"{rnd.choice(_TOOLS)}_{i}"
    params = {
        f"{rnd.choice(_WORDS)}_{rnd.choice(_WORDS)}": {
            "type": rnd.choice(_TYPES), "description": _sentence(rnd, 4, 9)}
        for _ in range(rnd.randint(2, 5))
    }
    spec = {"name": name, "description": " ".join(_sentence(rnd) for _ in range(2)),
            "parameters": {"type": "object", "properties": params,
                           "required": sorted(params)[: rnd.randint(1, len(params))]}}
    return json.dumps(spec, indent=1)


def _pieces_system(rnd: random.Random):
    yield ("You are an autonomous software engineering agent. You solve the user's task by "
           "calling tools, reading their observations and replying concisely.\n\n# Rules\n")
    for k in range(12):
        yield f"{k + 1}. {_sentence(rnd)} {_sentence(rnd)}\n"
    yield "\n# Tools\nYou may call the following tools. Each is described by a JSON schema.\n"
    i = 0
    while True:
        if i % 6 == 5:
            yield "\n## Notes\n" + " ".join(_sentence(rnd) for _ in range(4)) + "\n"
        yield f"\n<tool>\n{_tool_schema(rnd, i)}\n</tool>\n"
        i += 1


def _pieces_observation(rnd: random.Random):
    tool = rnd.choice(_TOOLS)
    yield f"<tool_response name=\"{tool}\">\n"
    while True:
        kind = rnd.random()
        if kind < 0.4:
            path = "/".join(rnd.choice(_WORDS) for _ in range(rnd.randint(2, 4))) + ".py"
            yield (f"{path}:{rnd.randint(1, 900)}: {rnd.choice(('ERROR', 'WARN', 'INFO'))} "
                   f"{_sentence(rnd, 4, 10)}\n")
        elif kind < 0.7:
            yield json.dumps({rnd.choice(_WORDS): rnd.randint(0, 10**5),
                              rnd.choice(_WORDS): _sentence(rnd, 3, 7)}) + "\n"
        else:
            yield _sentence(rnd) + "\n"


def sized_text(tokenizer, pieces, n_tokens: int) -> str:
    """Concatenate generated pieces until the text is about n_tokens tokens (never above)."""
    text, out = "", []
    for p in pieces:
        cand = text + p
        if len(tokenizer.encode(cand, add_special_tokens=False)) > n_tokens:
            break
        text = cand
        out.append(p)
    return text


def system_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    return sized_text(tokenizer, _pieces_system(random.Random(seed)), n_tokens)


def observation(tokenizer, n_tokens: int, seed: int) -> str:
    return sized_text(tokenizer, _pieces_observation(random.Random(seed)), n_tokens) + \
        "</tool_response>"


def task_text(seed: int) -> str:
    rnd = random.Random(seed)
    return ("Task: " + " ".join(_sentence(rnd) for _ in range(3))
            + " Use the tools and report what you found.")


# -- sessions -------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One measured point: `concurrency` sessions x `turns` turns over one shared prefix."""

    context_len: int  # nominal tokens of the shared system/tool prefix
    concurrency: int
    turns: int
    output_tokens: int
    obs_tokens: int
    seed: int

    def sessions(self, tokenizer) -> list[dict]:
        out = []
        for sid in range(self.concurrency):
            base = self.seed * 100_003 + self.context_len * 1009 + self.concurrency * 101 + sid
            out.append({
                # the seed in the name: a repeat (new seed) starts its sessions at turn 0
                "session": f"c{self.context_len}-n{self.concurrency}-s{sid}-seed{self.seed}",
                "task": task_text(base),
                "observations": [observation(tokenizer, self.obs_tokens, base * 31 + t)
                                 for t in range(self.turns)],
            })
        return out


@sgl.function
def agent_session(s, session, system, task, observations, max_tokens):
    """One agent: shared system/tool prefix, then per turn a tool observation and a reply."""
    s += sgl.system(system)
    for i, obs in enumerate(observations):
        s += sgl.user((task + "\n\n" if i == 0 else "") + obs)
        s += sgl.assistant(sgl.gen(f"turn{i}", max_tokens=max_tokens, ignore_eos=True,
                                   temperature=0.0))


def system_turn_text(endpoint: RuntimeEndpoint, system: str) -> str:
    """The exact text the frontend sends for the system turn (what the radix tree will share)."""
    prefix, suffix = endpoint.get_chat_template().get_prefix_and_suffix("system", [])
    return prefix + system + suffix


# -- timing at the stream -----------------------------------------------------------------------


@dataclass
class RequestRecord:
    session: str
    turn: int
    t_send: float
    t_first: float | None = None
    t_last: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ttft_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_send) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if self.t_first is None or self.completion_tokens < 2:
            return None
        return (self.t_last - self.t_first) / (self.completion_tokens - 1) * 1e3

    @property
    def decode_tok_per_s(self) -> float | None:
        """This request's decode speed, first to last token (1000 / TPOT; TTFT excluded)."""
        tpot = self.tpot_ms
        return 1e3 / tpot if tpot else None


class TimedEndpoint(RuntimeEndpoint):
    """RuntimeEndpoint whose non-streaming ``generate`` streams underneath and records timings."""

    def __init__(self, base_url: str, chat_template_name: str | None = "chatml", **kw):
        super().__init__(base_url, chat_template_name=chat_template_name, **kw)
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._turns: dict[str, int] = {}

    def generate(self, s, sampling_params):
        session = str(s.arguments.get("session", "?"))
        with self._lock:
            turn = self._turns.get(session, 0)
            self._turns[session] = turn + 1
        rec = RequestRecord(session, turn, time.perf_counter())
        text, meta = "", {}
        for chunk, meta in self.generate_stream(s, sampling_params):
            now = time.perf_counter()
            if rec.t_first is None and meta.get("completion_tokens", 1) >= 1:
                rec.t_first = now
            rec.t_last = now
            text += chunk
        rec.prompt_tokens = int(meta.get("prompt_tokens", 0))
        rec.cached_tokens = int(meta.get("cached_tokens", 0))
        rec.completion_tokens = int(meta.get("completion_tokens", 0))
        with self._lock:
            self.records.append(rec)
        return text, meta


# -- server-side counters ----------------------------------------------------------------------

_METRIC = re.compile(r"^(sglang:[A-Za-z0-9_]+)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$")


def scrape(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """/metrics as {name: value}, summed over label sets (one scheduler here)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = _METRIC.match(line.strip())
        if m and m.group(3) != "NaN":
            name, labels = m.group(1), m.group(2) or ""
            if 'mode="' in labels:  # e.g. prefill_effective_tokens_total{mode="device_hit"}
                name += "[" + labels.split('mode="')[1].split('"')[0] + "]"
            out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


class MetricsPoller:
    """Samples /metrics every `period` s in a thread: the peak of the KV-usage gauges."""

    GAUGES = ("sglang:num_used_tokens", "sglang:kv_used_tokens", "sglang:token_usage",
              "sglang:kv_evictable_tokens")

    def __init__(self, base_url: str, period: float = 1.0):
        self.base_url, self.period = base_url, period
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            m = scrape(self.base_url, timeout=10)
        except OSError:
            return
        for g in self.GAUGES:
            if g in m:
                self.peak[g] = max(self.peak.get(g, 0.0), m[g])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


# -- running a cell --------------------------------------------------------------------------------


def pct(values, q: float) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    return statistics.quantiles(vals, n=100, method="inclusive")[int(round(q * 100)) - 1] \
        if 0 < q < 1 else (vals[0] if q <= 0 else vals[-1])


@dataclass
class CellResult:
    wall_s: float
    records: list[RequestRecord] = field(default_factory=list)
    kv_peak: dict = field(default_factory=dict)
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)

    def summary(self) -> dict:
        recs = self.records
        out_tok = sum(r.completion_tokens for r in recs)
        prompt = sum(r.prompt_tokens for r in recs)
        cached = sum(r.cached_tokens for r in recs)
        d = lambda k: self.metrics_after.get(k, 0.0) - self.metrics_before.get(k, 0.0)  # noqa
        srv_prompt, srv_cached = d("sglang:prompt_tokens_total"), d("sglang:cached_tokens_total")
        turn_ttft = {}
        for r in recs:
            turn_ttft.setdefault(r.turn, []).append(r.ttft_ms)
        return {
            "requests": len(recs),
            "wall_s": self.wall_s,
            "output_tokens": out_tok,
            "output_tok_per_s": out_tok / self.wall_s if self.wall_s > 0 else None,
            "ttft_ms_p50": pct([r.ttft_ms for r in recs], 0.5),
            "ttft_ms_p90": pct([r.ttft_ms for r in recs], 0.9),
            "tpot_ms_p50": pct([r.tpot_ms for r in recs], 0.5),
            "tpot_ms_p90": pct([r.tpot_ms for r in recs], 0.9),
            "decode_tok_per_s_p50": pct([r.decode_tok_per_s for r in recs], 0.5),
            "ttft_ms_p50_by_turn": {t: pct(v, 0.5) for t, v in sorted(turn_ttft.items())},
            "radix_hit_rate": cached / prompt if prompt else None,
            "radix_hit_rate_server": srv_cached / srv_prompt if srv_prompt else None,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "mean_prompt_tokens": prompt / len(recs) if recs else None,
            "max_prompt_tokens": max((r.prompt_tokens for r in recs), default=None),
            "kv_slots_in_use": self.kv_peak.get("sglang:num_used_tokens"),
            "kv_slots_active_peak": self.kv_peak.get("sglang:kv_used_tokens"),
            "kv_token_usage_peak": self.kv_peak.get("sglang:token_usage"),
        }


def warm_prefix(endpoint: RuntimeEndpoint, system: str, keep_whole: bool = False) -> dict:
    """Prefill the shared system turn once (max_new_tokens 0), as a warm production server has it;
    returns its prefill time and token counts. keep_whole: mark it as the prefix every session
    shares (``evict_keep``), so whole-prompt eviction keeps it whole."""
    text = system_turn_text(endpoint, system)
    params: dict = {"max_new_tokens": 0}
    if keep_whole:
        params["custom_params"] = {"dynsplit": {"evict_keep": 1 << 24}}
    t0 = time.perf_counter()
    r = requests.post(endpoint.base_url + "/generate",
                      json={"text": text, "sampling_params": params}, timeout=3600)
    r.raise_for_status()
    meta = r.json()["meta_info"]
    dt = time.perf_counter() - t0
    new = meta["prompt_tokens"] - meta.get("cached_tokens", 0)
    return {"prefix_tokens": meta["prompt_tokens"], "prefill_s": dt, "new_tokens": new,
            "prefill_tok_per_s": new / dt if dt > 0 and new > 0 else None}


def run_cell(endpoint: TimedEndpoint, cell: Cell, system: str, tokenizer,
             poll_period: float = 0.5) -> CellResult:
    global_config.enable_precache_with_tracing = False  # warm_prefix does it, timed
    sessions = cell.sessions(tokenizer)
    args = [dict(s, system=system, max_tokens=cell.output_tokens) for s in sessions]
    endpoint.records = []
    before = scrape(endpoint.base_url)
    with MetricsPoller(endpoint.base_url, poll_period) as poller:
        t0 = time.perf_counter()
        states = agent_session.run_batch(args, backend=endpoint, num_threads=cell.concurrency)
        wall = time.perf_counter() - t0
    for st in states:
        err = st.stream_executor.error_ if hasattr(st, "stream_executor") else None
        if err is not None:
            raise RuntimeError(f"agent session failed: {err}")
    after = scrape(endpoint.base_url)
    return CellResult(wall, list(endpoint.records), dict(poller.peak), before, after)


# -- the long-context decode measurement ------------------------------------------------------


def decode_probe(base_url: str, input_ids: list[int], max_new: int, rid: str | None = None) -> dict:
    """One streamed request: prefill time, then decode tokens/s from the first to the last token."""
    payload = {"input_ids": input_ids, "stream": True,
               "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0,
                                   "ignore_eos": True}}
    if rid:
        payload["rid"] = rid
    t0 = time.perf_counter()
    first = last = None
    meta = {}
    with requests.post(base_url + "/generate", json=payload, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or not line.startswith(b"data:"):
                continue
            if line.strip() == b"data: [DONE]":
                break
            meta = json.loads(line[5:])["meta_info"]
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
    reason = meta.get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "abort":
        # SGLang answers 200 with an aborted request (prompt over the pool, ...): never a probe
        raise RuntimeError(f"the server aborted the probe: {reason.get('message', reason)}")
    n = int(meta.get("completion_tokens", 0))
    if n != max_new:  # ignore_eos: anything else is a request that did not run as asked
        raise RuntimeError(f"the probe asked for {max_new} tokens and got {n}")
    return {
        "prompt_tokens": int(meta.get("prompt_tokens", len(input_ids))),
        "cached_tokens": int(meta.get("cached_tokens", 0)),
        "completion_tokens": n,
        "ttft_ms": (first - t0) * 1e3 if first else None,
        "decode_tok_per_s": (n - 1) / (last - first) if first and n > 1 and last > first else None,
        "tpot_ms": (last - first) / (n - 1) * 1e3 if first and n > 1 else None,
    }


def pool_slots(log_path: Path) -> int | None:
    """The KV slots SGLang gave the server (its startup log), None if not found."""
    found = re.search(r"max_total_num_tokens=(\d+)", Path(log_path).read_text(errors="replace"))
    return int(found[1]) if found else None


def check_pool(log_path: Path, need: int, label: str) -> None:
    """Refuse to measure a server whose KV pool cannot hold the longest prompt: SGLang would
    answer every such probe with an aborted request."""
    slots = pool_slots(log_path)
    if slots is None or slots < need:
        raise SystemExit(f"{label}: the server's KV pool has {slots} slots, below the {need}-token "
                         f"prompt (see {log_path}); raise --mem-fraction-static or free memory")
