"""A hostile command line (issue 40): bad flags, bad ``--config`` YAML files and a bad
``SGLANG_DYNSPLIT`` each stop the start like an argparse error: exit status 2 and one stderr line
that names what was sent (the flag, the YAML key, the environment variable and its key), never a
traceback or SGLang's whole usage text.

All cases run through SGLang's real ``prepare_server_args`` in one subprocess
(``startup_driver.py``: one SGLang import, not one per case); a few run again as real
``python -m sglang.launch_server`` processes, which must print the same line.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynsplit_sglang import launcher

pytestmark = pytest.mark.server

DYN = ["--kv-compression", "dynsplit"]
ENV_BUDGET = '{"kv_compression": "dynsplit", "budget": -1}'
ENV_WINDOW = '{"kv_compression": "dynsplit", "sink": 1024, "recent": 65536}'
# (flags after the launcher's CPU flags, what the error line must name, what it must not)
BAD_FLAGS = [
    (DYN + ["--dynsplit-budget", "10"], "--dynsplit-budget 10", None),
    (DYN + ["--dynsplit-budget", "-1"], "--dynsplit-budget -1", None),
    (DYN + ["--dynsplit-budget", "x"], "--dynsplit-budget", None),
    (DYN + ["--dynsplit-budget", "1.5"], "--dynsplit-budget", None),
    (DYN + ["--dynsplit-budget", "1000000000000"], "--dynsplit-budget 1000000000000", None),
    (DYN + ["--dynsplit-budget-fraction", "0"], "--dynsplit-budget-fraction 0.0", None),
    (DYN + ["--dynsplit-budget-fraction", "1.5"], "--dynsplit-budget-fraction 1.5", None),
    (DYN + ["--dynsplit-budget-fraction", "nan"], "--dynsplit-budget-fraction nan", None),
    (DYN + ["--dynsplit-budget", "512", "--dynsplit-budget-fraction", "0.5"],
     "--dynsplit-budget (tokens) or --dynsplit-budget-fraction", None),
    (DYN + ["--dynsplit-block-size", "1"], "--dynsplit-block-size 1", None),
    (DYN + ["--dynsplit-block-size", "5000"], "--dynsplit-block-size 5000", None),
    (DYN + ["--dynsplit-block-size", "x"], "--dynsplit-block-size", None),
    (DYN + ["--dynsplit-tolerance", "16"], "--dynsplit-tolerance 16", None),
    (DYN + ["--dynsplit-block-size", "4"], "--dynsplit-block-size 4", "--dynsplit-tolerance"),
    (DYN + ["--dynsplit-alpha", "-1"], "--dynsplit-alpha -1.0", None),
    (DYN + ["--dynsplit-alpha", "inf"], "--dynsplit-alpha inf", None),
    (DYN + ["--dynsplit-future-window", "0"], "--dynsplit-future-window 0", None),
    (DYN + ["--dynsplit-sink", "2000"], "--dynsplit-sink 2000", None),
    (DYN + ["--dynsplit-sink", "1024", "--dynsplit-recent", "65536"],
     "--dynsplit-sink 1024 and --dynsplit-recent 65536", "--dynsplit-budget"),
    (DYN + ["--dynsplit-recent", "0"], "--dynsplit-recent 0", None),
    (DYN + ["--dynsplit-recent", "2000"], "--dynsplit-recent 2000", "--dynsplit-budget"),
    (DYN + ["--dynsplit-candidates", "words"], "--dynsplit-candidates", None),
    (DYN + ["--dynsplit-dense-layers", "-1"], "--dynsplit-dense-layers -1", None),
    (DYN + ["--dynsplit-score-layers", "-1"], "--dynsplit-score-layers -1", None),
    (DYN + ["--dynsplit-score", "max"], "--dynsplit-score", None),
    (DYN + ["--dynsplit-spread", "0"], "--dynsplit-spread 0.0", None),
    (DYN + ["--dynsplit-refine", "0.5"], "--dynsplit-refine 0.5", None),
    (DYN + ["--dynsplit-refine", "100"], "--dynsplit-refine 100.0", None),
    (DYN + ["--dynsplit-min-sparse-len", "-1"], "--dynsplit-min-sparse-len -1", None),
    (DYN + ["--dynsplit-evict-hold", "2"], "--dynsplit-evict-hold 2.0 applies only with", None),
    (DYN + ["--dynsplit-evict-scope", "chunk"], "--dynsplit-evict-scope 'chunk'", None),
    (DYN + ["--dynsplit-evict-window", "8"], "--dynsplit-evict-window 8", None),
    (DYN + ["--dynsplit-evict-pool", "3"], "--dynsplit-evict-pool 3", None),
    (DYN + ["--dynsplit-evict-keep", "64"], "--dynsplit-evict-keep 64", None),
    (DYN + ["--dynsplit-evict", "--dynsplit-evict-pool", "4"], "--dynsplit-evict-pool 4", None),
    (DYN + ["--dynsplit-evict", "--dynsplit-evict-window", "0"], "--dynsplit-evict-window 0", None),
    (DYN + ["--dynsplit-evict", "--dynsplit-evict-hold", "0.5"], "--dynsplit-evict-hold 0.5",
     None),
    (["--kv-compression", "streaming", "--dynsplit-evict"], "--dynsplit-evict", None),
    (["--dynsplit-budget", "512"], "--dynsplit-budget", None),
    (["--kv-compression", "quest"], "--kv-compression", None),
    (DYN + ["--dynsplit-config", "{bad"], "--dynsplit-config is not valid JSON", None),
    (DYN + ["--dynsplit-config", "[1]"], "--dynsplit-config must be a JSON object", None),
    (DYN + ["--dynsplit-config", '{"budgte": 5}'], "--dynsplit-config key budgte is not", None),
    (DYN + ["--dynsplit-config", '{"budget": -1}'], "--dynsplit-config key budget=-1", None),
    (DYN + ["--dynsplit-config", '{"budget": true}'], "--dynsplit-config key budget=True", None),
    (["--kv-compression", "fixed", "--dynsplit-config", '{"strategy": "dynsplit"}'],
     "--kv-compression 'fixed' conflicts with --dynsplit-config key strategy", None),
    (DYN + ["--page-size", "16"], "--page-size 16", None),
    (DYN + ["--enable-mixed-chunk"], "--enable-mixed-chunk", None),
]
# (SGLANG_DYNSPLIT, what the line must name, what it must not)
BAD_ENV = [
    (ENV_BUDGET, "SGLANG_DYNSPLIT key budget=-1 is invalid", "--dynsplit-budget"),
    (ENV_WINDOW, "SGLANG_DYNSPLIT key sink=1024 and SGLANG_DYNSPLIT key recent=65536",
     "--dynsplit-budget"),
    ('{"kv_compression": "dynsplit", "budget": 100000}',
     "SGLANG_DYNSPLIT key budget=100000 is above the model's context length", "--dynsplit"),
    ("{oops", "SGLANG_DYNSPLIT is not valid JSON", None),
]
# (the file's text after "kv-compression: dynsplit", what the line must name, must not)
BAD_YAML = [
    ("dynsplit-budget: [512, 1024]\n", "dynsplit-budget: [512, 1024] (in ", None),
    ("dynsplit-evict: maybe\n", "dynsplit-evict: 'maybe' (in ", None),
    ("dynsplit-budget: -1\n", "dynsplit-budget: -1 (in ", None),
    ("dynsplit-budget: 512.5\n", "dynsplit-budget: 512.5 (in ", None),
    ("dynsplit-budget: true\n", "dynsplit-budget: True (in ", None),
    ("dynsplit-budgte: 512\n", "dynsplit-budgte: 512 (in ", None),
    ("dynsplit-block-size: {a: 1}\n", "dynsplit-block-size: {'a': 1} (in ", None),
    ("dynsplit-config: [1, 2]\n", "dynsplit-config: [1, 2] (in ", None),
    ("dynsplit-config: {budget: -1}\n", "dynsplit-config (in ", None),
    ("dynsplit-config: '{bad'\n", "dynsplit-config (in ", None),
    ("dynsplit-evict-hold: 2\n", "dynsplit-evict-hold: 2.0 (in ", None),
    ("dynsplit-sink: 1024\ndynsplit-recent: 65536\n", "dynsplit-sink: 1024 (in ",
     "--dynsplit-budget"),
    ("dynsplit-budget: 512\ndynsplit-budget-fraction: 0.5\n", "dynsplit-budget-fraction (in ",
     None),
]
WHOLE_FILES = [  # (the whole file, what the line must name)
    ("- kv-compression\n- dynsplit\n", "must be a mapping of key: value at its root"),
    ("kv-compression: quest\n", "kv-compression: 'quest' (in "),
    ("kv-compression: dynsplit\ndynsplit-budget: [\n", "is not valid YAML"),
]
# A pool too small for the block store: SGLang's default --max-running-requests for 8192
# tokens gives 2048 request rows, which the store cannot describe next to any token.
POOL = ["--max-total-tokens", "8192", *DYN]
GOOD = [  # flags override --dynsplit-config keys and --config keys (a budget replaces a fraction)
    (DYN + ["--dynsplit-config", '{"budget_fraction": 0.1}', "--dynsplit-budget", "512"],
     None, {"budget": 512, "budget_fraction": None}),
    (DYN + ["--dynsplit-config", '{"budget": 512}', "--dynsplit-budget-fraction", "0.25"],
     None, {"budget": None, "budget_fraction": 0.25}),
    (["--dynsplit-budget", "512"], "dynsplit-budget-fraction: 0.1\n",
     {"budget": 512, "budget_fraction": None}),
    (["--dynsplit-budget-fraction", "0.25"], "dynsplit-budget: 512\n",
     {"budget": None, "budget_fraction": 0.25}),
    (["--dynsplit-config", '{"budget": 256}'], "dynsplit-budget-fraction: 0.1\n",
     {"budget": 256, "budget_fraction": None}),
    (DYN + ["--dynsplit-evict", "--dynsplit-evict-hold", "2"], None, {"evict_hold": 2.0}),
]


def _argv(model, extra, base=launcher.CPU_SERVER_ARGS):
    return ["--model-path", str(model), *base, *extra]


def _no_running_requests():
    i = launcher.CPU_SERVER_ARGS.index("--max-running-requests")
    return launcher.CPU_SERVER_ARGS[:i] + launcher.CPU_SERVER_ARGS[i + 2:]


@pytest.fixture(scope="module")
def cases(tiny_model, tmp_path_factory):
    """Every case as (argv, env, must, must_not, expected settings or None for an error)."""
    d = tmp_path_factory.mktemp("startup-yaml")
    out = [(_argv(tiny_model, a), {}, must, bad, None) for a, must, bad in BAD_FLAGS]
    out += [(_argv(tiny_model, []), {"SGLANG_DYNSPLIT": e}, must, bad, None)
            for e, must, bad in BAD_ENV]
    texts = [("kv-compression: dynsplit\n" + t, must, bad) for t, must, bad in BAD_YAML]
    for i, (text, must, bad) in enumerate(texts + [(t, m, None) for t, m in WHOLE_FILES]):
        (d / f"bad{i}.yaml").write_text(text)
        out.append((_argv(tiny_model, ["--config", str(d / f"bad{i}.yaml")]), {}, must, bad, None))
    out.append((_argv(tiny_model, POOL, _no_running_requests()), {}, "--max-total-tokens 8192",
                None, None))
    for i, (flags, text, want) in enumerate(GOOD):
        extra = list(flags)
        if text is not None:
            (d / f"good{i}.yaml").write_text("kv-compression: dynsplit\n" + text)
            extra = ["--config", str(d / f"good{i}.yaml"), *extra]
        out.append((_argv(tiny_model, extra), {}, None, None, want))
    return out


@pytest.fixture(scope="module")
def results(cases, tmp_path_factory):
    driver = Path(__file__).with_name("startup_driver.py")
    proc = subprocess.run([sys.executable, "-W", "ignore", str(driver)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path_factory.mktemp("driver"),
                          input=json.dumps([{"argv": a, "env": e} for a, e, *_ in cases]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_error_line(err, must, must_not):
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: ") and must in line, (must, line)
    assert must_not is None or must_not not in line, line
    assert len(line) < 400 and "Traceback" not in line, line


def test_counts():
    assert len(BAD_FLAGS) + len(BAD_ENV) >= 40 and len(BAD_YAML) + len(WHOLE_FILES) >= 10


def test_bad_start_ups_exit_2_with_one_line_naming_what_was_sent(cases, results):
    assert len(results) == len(cases)
    bad = [(c, r) for c, r in zip(cases, results) if c[4] is None]
    for (argv, env, must, must_not, _), r in bad:
        assert r["code"] == 2, (argv[-6:], env, r)
        _check_error_line(r["err"], must, must_not)


def test_flags_override_dynsplit_config_and_config_file_keys(cases, results):
    good = [(c, r) for c, r in zip(cases, results) if c[4] is not None]
    assert len(good) == len(GOOD)
    for (argv, _, _, _, want), r in good:
        assert r["code"] is None and r["settings"], (argv[-6:], r)
        settings = json.loads(r["settings"])
        assert {k: settings[k] for k in want} == want, (argv[-6:], settings)


REAL = [  # (index into the driver's cases, as launch_server runs them)
    lambda cases: next(i for i, c in enumerate(cases) if "--max-total-tokens 8192" == c[2]),
    lambda cases: next(i for i, c in enumerate(cases) if c[2] == "dynsplit-budget: [512, 1024] (in "),
    lambda cases: next(i for i, c in enumerate(cases) if c[1].get("SGLANG_DYNSPLIT") == ENV_WINDOW),
    lambda cases: next(i for i, c in enumerate(cases) if "--dynsplit-evict-hold" in c[0]
                       and "--dynsplit-evict" not in c[0]),
]


@pytest.mark.parametrize("pick", range(len(REAL)))
def test_launch_server_prints_the_same_one_line(pick, cases, results, tmp_path):
    import os

    i = REAL[pick](cases)
    argv, env, must, must_not, _ = cases[i]
    # Its own port and process group: a build that wrongly accepts the case starts a server,
    # which is stopped (with its scheduler) rather than left behind.
    proc = subprocess.Popen([*launcher.LAUNCH_SERVER, *argv, "--port", str(launcher.free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, **env}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        launcher.stop_server(proc)
        pytest.fail(f"launch_server accepted {argv[-4:]} {env}: it was still running")
    finally:
        launcher.stop_server(proc, timeout=5)  # the scheduler of a start that got that far
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "usage:" not in stdout + stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == results[i]["err"], (errors, stderr[-2000:])
    _check_error_line(errors, must, must_not)
