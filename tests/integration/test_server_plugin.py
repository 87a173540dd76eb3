"""The plugin inside a real SGLang server: loaded in every server process, server still serves."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynsplit_sglang import __version__, launcher

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
PLUGIN_LINE = re.compile(
    r"dynsplit-sglang (?P<version>\S+) plugin loaded \(pid=(?P<pid>\d+), process=(?P<proc>[\w-]+)"
)


def test_plugin_loaded_in_main_scheduler_and_detokenizer(sglang_server):
    log = sglang_server.log_path.read_text(errors="replace")
    found = {m["proc"]: int(m["pid"]) for m in PLUGIN_LINE.finditer(log)}
    assert {"main", "scheduler", "detokenizer"} <= set(found), f"plugin lines: {found}\n{log[-3000:]}"
    assert len({found["main"], found["scheduler"], found["detokenizer"]}) == 3
    assert found["main"] == sglang_server.proc.pid
    assert all(m["version"] == __version__ for m in PLUGIN_LINE.finditer(log))


def test_generate_returns_text(sglang_server):
    out = launcher.post_json(
        sglang_server.base_url + "/generate",
        {
            "text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        },
    )
    assert isinstance(out["text"], str) and out["text"]
    assert out["meta_info"]["completion_tokens"] == 8


def test_multiturn_demo_reports_prefix_hits(sglang_server):
    # The demo against the session server: later turns re-send the earlier ones and must hit
    # the radix cache (its exit code says so).
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "multiturn_demo.py"),
         "--base-url", sglang_server.base_url, "--max-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hits = [int(x) for x in re.findall(r"cached_tokens=(\d+)", proc.stdout)]
    assert len(hits) == 3 and all(h > 0 for h in hits[1:]), proc.stdout
