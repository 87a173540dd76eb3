"""Invalid flags and unsupported combinations fail before anything serves."""

import subprocess
import sys

import pytest

from dynsplit_sglang.core import ConfigError

BAD = [
    (["--dynsplit-budget", "10"], "budget"),
    (["--dynsplit-tolerance", "16"], "tolerance"),
    (["--dynsplit-candidates", "words"], "candidates"),
    (["--attention-backend", "flex_attention"], "--attention-backend flex_attention"),
    (["--page-size", "16"], "--page-size 16"),
    (["--enable-mixed-chunk"], "mixed-chunk"),
    (["--enable-hierarchical-cache"], "hierarchical"),
]


@pytest.fixture(scope="module")
def prepare():
    from sglang.srt.plugins import load_plugins

    load_plugins()  # applies dynsplit-sglang's hooks in this process, as launch_server does
    from sglang.srt import server_args

    return server_args.prepare_server_args


@pytest.mark.parametrize("extra,match", BAD)
def test_prepare_server_args_rejects(prepare, tiny_model, extra, match):
    argv = ["--model-path", str(tiny_model), "--device", "cpu", "--attention-backend",
            "torch_native", "--kv-compression", "dynsplit", *extra]
    with pytest.raises(ConfigError, match=match):
        prepare(argv)


def test_flags_reach_the_server_args(prepare, tiny_model):
    sa = prepare(["--model-path", str(tiny_model), "--device", "cpu", "--attention-backend",
                  "torch_native", "--kv-compression", "fixed", "--dynsplit-budget", "256"])
    assert '"kv_compression": "fixed"' in sa._dynsplit and '"budget": 256' in sa._dynsplit


@pytest.mark.server
def test_launch_server_exits_with_the_message(tiny_model):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_model),
           "--device", "cpu", "--attention-backend", "torch_native",
           "--kv-compression", "dynsplit", "--dynsplit-budget", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode != 0
    assert "budget=10 is invalid" in proc.stderr + proc.stdout
