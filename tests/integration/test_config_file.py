"""``sglang serve --config x.yaml`` with the DynSplit settings in the file compresses (issue 14:
the file was accepted and ignored, and the server ran dense)."""

import json
import urllib.request

import pytest

from dynsplit_sglang import launcher

from .client import generate, stats, text
from .conftest import start_server

pytestmark = pytest.mark.server

YAML = """\
kv-compression: dynsplit
dynsplit-budget: 48
dynsplit-recent: 16
dynsplit-dense-layers: 0
dynsplit-block-size: 8
dynsplit-tolerance: 2
dynsplit-future-window: 8
"""


@pytest.fixture(scope="module")
def serve_config(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-config")
    (d / "server.yaml").write_text(YAML)
    stats_path = d / "dynsplit-stats.json"
    with start_server(tiny_model, ["--config", str(d / "server.yaml")], d,
                      env={"DYNSPLIT_STATS_PATH": str(stats_path)},
                      entry=launcher.SGLANG_SERVE) as handle:
        handle.stats_path = stats_path
        yield handle


def test_settings_from_the_file_compress(serve_config):
    assert serve_config.command[:2] == list(launcher.SGLANG_SERVE)
    _, meta = generate(serve_config, [text(300, 21)], max_new=8)
    mine = meta[0]["dynsplit"]
    assert mine["strategy"] == "dynsplit" and mine["budget"] == 48
    assert mine["sparse_steps"] == mine["decode_steps"] == 7
    assert 0 < mine["tokens_attended"] <= 48 * 2 * 2 * 7  # budget x layers x KV heads x steps
    assert mine["tokens_dense"] > 4 * mine["tokens_attended"] and mine["blocks_built"] > 10
    counters = stats(serve_config)  # the scheduler's own counters moved too
    assert counters["sparse_steps"] >= 7 and counters["max_tokens_attended"] <= 48
    info = json.loads(urllib.request.urlopen(serve_config.base_url + "/server_info",
                                             timeout=60).read())
    assert info["dynsplit"]["kv_compression"] == "dynsplit" and info["dynsplit"]["budget"] == 48
