"""The examples against real servers (issue 39): the OpenAI client example prints the compressed
and the dense answer with the compression report; agent_frontend.py reads /metrics with
prometheus_client's parser and, given a server's URL, uses the chat template that server applies.

The default model's server (``default_server``) runs without ``--enable-metrics``, so the /metrics
test uses the session's tiny-model server (``sglang_server``, metrics on)."""

import importlib.util
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .client import generate, stats, text

pytestmark = pytest.mark.server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def agent_frontend():
    spec = importlib.util.spec_from_file_location("agent_frontend_example",
                                                  EXAMPLES / "agent_frontend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openai_client_prints_both_answers_and_the_report(default_server):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_client.py"), "--base-url", default_server.base_url,
         "--max-tokens", "12"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    # Side by side: the column headers, a rule, then answer rows with text in both columns.
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if "compressed {'budget_fraction': 0.25}" in line)
    assert "| dense {'strategy': 'none'}" in lines[header], out
    first = lines[header + 2].split(" | ")
    assert len(first) == 2 and first[0].strip() and first[1].strip(), out
    # The reports come from the OpenAI response's meta_info: compressed reads fewer K/V tokens.
    reports = re.findall(r"dynsplit \(custom_params\): strategy (\w+), budget fraction ([\d.]+); "
                         r"K/V tokens attended (\d+) of (\d+)", out)
    assert [(s, f) for s, f, _, _ in reports] == [("dynsplit", "0.25"), ("none", "1.0")], out
    (_, _, attended, dense), (_, _, dense_attended, dense_dense) = reports
    assert 0 < int(attended) < int(dense) and int(dense_attended) == int(dense_dense), out
    assert re.search(r"compressed: usage prompt \d+ \(cached \d+\), completion \d+", out), out


def test_openai_client_prints_a_server_yaml():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "openai_client.py"), "--yaml"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import yaml

    config = yaml.safe_load(proc.stdout)
    assert config["kv-compression"] == "dynsplit" and config["device"] == "cpu"
    # `sglang serve --config` refuses the deprecated disable-cuda-graph key (checked by hand
    # with this file: the server starts, compresses and serves /metrics).
    assert "disable-cuda-graph" not in config
    assert config["cuda-graph-backend-decode"] == config["cuda-graph-backend-prefill"] == "disabled"


def test_prometheus_parser_sums_label_sets(agent_frontend):
    # What splitting lines got wrong: a labelled sample's name is not the metric's name.
    body = ('# HELP sglang:dynsplit_blocks_built_total Semantic blocks\n'
            '# TYPE sglang:dynsplit_blocks_built_total counter\n'
            'sglang:dynsplit_blocks_built_total{tp_rank="0"} 3.0\n'
            'sglang:dynsplit_blocks_built_total{tp_rank="1"} 4.0\n'
            '# HELP sglang:dynsplit_compression_ratio Dense per attended\n'
            '# TYPE sglang:dynsplit_compression_ratio gauge\n'
            'sglang:dynsplit_compression_ratio 2.5\n'
            '# HELP sglang:num_requests_total Requests\n'
            '# TYPE sglang:num_requests_total counter\n'
            'sglang:num_requests_total{model_name="m"} 9.0\n')
    assert agent_frontend.parse_dynsplit_counters(body) == {"blocks_built": 7.0,
                                                            "compression_ratio": 2.5}


def test_prometheus_parser_reads_real_metrics(agent_frontend, sglang_server):
    generate(sglang_server, [text(150, 39)], max_new=6)
    settled = stats(sglang_server)  # the server has published the last forward's counters
    body = urllib.request.urlopen(sglang_server.base_url + "/metrics", timeout=60).read().decode()
    counters = agent_frontend.parse_dynsplit_counters(body)
    assert counters["blocks_built"] == settled["blocks_built"] > 0
    assert counters["tokens_attended"] == settled["tokens_attended"] > 0
    assert counters["compression_ratio"] > 1.0
    assert agent_frontend.dynsplit_counters(sglang_server.base_url) == counters


def test_agent_frontend_uses_the_served_chat_template(agent_frontend, default_server):
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
    from sglang.lang.chat_template import get_chat_template

    # SGLang's own pick, from the model folder's name, is its plain "default" (SYSTEM:/USER:)...
    assert RuntimeEndpoint(default_server.base_url).chat_template.name == "default"
    # ...while the server applies SmolLM2's own template, ChatML, to /v1/chat/completions.
    served = agent_frontend.served_chat_template(default_server.base_url)
    chatml = get_chat_template("chatml")
    assert served.role_prefix_and_suffix == chatml.role_prefix_and_suffix
    assert tuple(served.stop_str) == tuple(chatml.stop_str)
    backend = agent_frontend.endpoint(default_server.base_url)  # the --base-url path
    assert backend.chat_template is not None and backend.chat_template.name == "served"
    assert backend.chat_template.role_prefix_and_suffix == chatml.role_prefix_and_suffix
    # A named template still wins (the example's own server passes "chatml").
    assert agent_frontend.endpoint(default_server.base_url, "chatml").chat_template is chatml
