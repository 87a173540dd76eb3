"""sgl.Engine(kv_compression=...) with --tp 2 on the CPU, against the TP=1 session server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .client import generate, text

pytestmark = pytest.mark.server

CONFIG = {"budget": 64, "recent": 16, "dense_layers": 0, "block_size": 8, "tolerance": 2,
          "future_window": 8}


def test_engine_keyword_arguments_and_two_tp_ranks_match_one(sglang_server, tiny_model, tmp_path):
    prompts = [text(150, 900), text(60, 901)]
    env = dict(os.environ, DYNSPLIT_STATS_PATH=str(tmp_path / "stats.json"),
               SGLANG_CPU_OMP_THREADS_BIND="0|1")  # one core per rank on this 2-core host
    env.pop("TRITON_INTERPRET", None)
    env.pop("SGLANG_DYNSPLIT", None)
    script = Path(__file__).with_name("engine_tp2.py")
    proc = subprocess.run([sys.executable, str(script), str(tiny_model), json.dumps(prompts),
                           json.dumps(CONFIG)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    assert result["stats"]["max_tokens_attended"] <= 64  # compression ran in the TP ranks
    assert result["stats"]["sparse_layer_steps"] > 0
    # Votes are all-reduced over the ranks, so both ranks split like a single process does.
    want, meta = generate(sglang_server, prompts, max_new=12)
    assert result["texts"] == want
    # Each request's report counts every rank's KV heads, as one process does (issue 40: it
    # counted rank 0's only, half of these).
    keys = ("tokens_attended", "tokens_dense", "decode_steps", "sparse_steps")
    got = [{k: r[k] for k in keys} for r in result["reports"]]
    assert got == [{k: m["dynsplit"][k] for k in keys} for m in meta]
    assert all(g["sparse_steps"] > 0 for g in got[:1])  # the long prompt decoded compressed
