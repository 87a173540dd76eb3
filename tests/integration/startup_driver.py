"""Run many start-up command lines through SGLang's real ``prepare_server_args`` in one process
(importing SGLang costs 5-10 s on 2 cores, once per process).

stdin: a JSON list of cases ``{"argv": [...], "env": {...}}``; stdout (last line): a JSON list
of results ``{"code": exit status or None, "err": [stderr lines], "settings": JSON or None}``.
The plugin's hooks are applied as ``launch_server`` applies them (``load_plugins``).
"""

import contextlib
import io
import json
import os
import sys


def run(case: dict, prepare) -> dict:
    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    err = io.StringIO()
    code, settings = None, None
    try:
        with contextlib.redirect_stderr(err):
            sa = prepare(case["argv"])
        settings = getattr(sa, "_dynsplit", None)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # a traceback in the real CLI: reported, the test fails on it
        code, err = "exception", io.StringIO(f"{type(e).__name__}: {e}")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return {"code": code, "err": err.getvalue().splitlines(), "settings": settings}


def main() -> None:
    cases = json.load(sys.stdin)
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.server_args import prepare_server_args

    results = [run(case, prepare_server_args) for case in cases]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
