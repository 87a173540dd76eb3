"""Invalid flags and unsupported combinations fail before anything serves, like argparse errors:
one line naming the flag, exit status 2, no traceback. ``--config`` files count like flags."""

import subprocess
import sys
from pathlib import Path

import pytest

from dynsplit_sglang.core.strategies import STRATEGIES

BAD = [
    (["--dynsplit-budget", "10"], "--dynsplit-budget 10 is invalid; expected an integer >= sink "
                                  "+ recent = 68"),
    (["--dynsplit-budget", "-1"], "--dynsplit-budget -1 is invalid"),
    (["--dynsplit-budget", "1000000000000"], "--dynsplit-budget 1000000000000 is above the "
                                             "model's context length (8192 tokens)"),
    (["--dynsplit-budget-fraction", "0.5", "--dynsplit-recent", "9000"],
     "cover the model's whole context (8192 tokens)"),
    (["--dynsplit-tolerance", "16"], "--dynsplit-tolerance 16 is invalid"),
    (["--dynsplit-candidates", "words"], "argument --dynsplit-candidates: invalid choice"),
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


def _base(model):
    return ["--model-path", str(model), "--device", "cpu", "--attention-backend", "torch_native"]


@pytest.mark.parametrize("extra,message", BAD)
def test_prepare_server_args_exits_2_with_one_line(prepare, tiny_model, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        prepare(_base(tiny_model) + ["--kv-compression", "dynsplit", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "budget=" not in err[-1]  # the flag, not the config field


def test_flags_reach_the_server_args(prepare, tiny_model):
    import os

    sa = prepare(_base(tiny_model) + ["--kv-compression", "fixed", "--dynsplit-budget", "256"])
    assert '"kv_compression": "fixed"' in sa._dynsplit and '"budget": 256' in sa._dynsplit
    assert "SGLANG_DYNSPLIT" not in os.environ  # the schedulers read the ServerArgs, not this


def test_config_file_keys_count_like_flags(prepare, tiny_model, tmp_path):
    cfg = tmp_path / "server.yaml"
    cfg.write_text("kv-compression: delimiter\ndynsplit-budget-fraction: 0.25\n"
                   "dynsplit-block-size: 12\ndynsplit-evict: true\n"
                   "dynsplit-config: {recent: 32}\n")
    sa = prepare(_base(tiny_model) + ["--config", str(cfg), "--dynsplit-block-size", "20"])
    from dynsplit_sglang.settings import Settings

    s = Settings.of(sa)
    assert s.method == "delimiter" and s.config.budget_fraction == 0.25 and s.config.evict
    assert s.config.recent == 32
    assert s.config.block_size == 20  # the command line wins over the file
    assert sa.radix_cache_backend == "dynsplit-evict" and sa.disable_overlap_schedule
    bad = tmp_path / "bad.yaml"
    bad.write_text("kv-compression: dynsplit\ndynsplit-budget: -1\n")
    with pytest.raises(SystemExit) as e:
        prepare(_base(tiny_model) + ["--config", str(bad)])
    assert e.value.code == 2


@pytest.mark.server
def test_sglang_serve_exits_2_without_traceback(tiny_model):
    cmd = [str(Path(sys.executable).parent / "sglang"), "serve", *_base(tiny_model),
           "--kv-compression", "dynsplit", "--dynsplit-budget", "1000000000000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["error: --dynsplit-budget 1000000000000 is above the model's context "
                      "length (8192 tokens): no request could ever be compressed; use at most "
                      "8192 or a budget fraction"], proc.stderr[-2000:]


def test_sglang_serve_backend_lists_the_flags(prepare, capsys):
    # `sglang serve --help` prints before SGLang loads plugins; `--model-type dynsplit --help`
    # (this package's sglang.serve_backends entry point) loads them first.
    from sglang.cli.serve import _create_backend_registry
    from sglang.cli.serve_backends import ServeRequest

    registry = _create_backend_registry()
    assert "dynsplit" in registry.available_names
    registry.get("dynsplit").backend.run(ServeRequest(argv=("--help",), model_path=None))
    out = " ".join(capsys.readouterr().out.split())
    methods = ",".join(("none", *STRATEGIES))  # the registry's (tests may register more)
    for words in (f"--kv-compression {{{methods}}}", "--dynsplit-score {gauss,bound}",
                  "--dynsplit-block-size", "C: the target block length in tokens",
                  "--dynsplit-budget-fraction", "fraction of the context KEPT"):
        assert words in out, words
