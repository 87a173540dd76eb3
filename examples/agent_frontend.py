"""A multi-turn tool-using agent, written in SGLang's frontend language, on a server that runs
DynSplit-KV compression (``--kv-compression dynsplit``).

Several users share one long system/tool prefix; each session plans, receives a tool result and
answers. The radix cache serves the shared prefix to every session after the first, and the
compressor reuses that prefix's semantic blocks instead of rebuilding them: the counters printed
at the end show blocks built vs reused and K/V tokens attended vs what dense attention reads.

Each session may also set its own compression: the program's ``dynsplit`` argument travels as
``sampling_params.custom_params["dynsplit"]`` through ``dynsplit_sglang.frontend.RuntimeEndpoint``
(SGLang's endpoint, which forwards neither a rid nor custom_params), and every generation's meta
info reports what it used (strategy, budget, K/V tokens attended vs dense, blocks built/reused).
Every session then runs again dense (``{"strategy": "none"}``): both answers are printed side by
side, so what compression changed is told apart from what the small model gets wrong anyway.

    python examples/agent_frontend.py                       # starts and stops its own server
    python examples/agent_frontend.py --base-url http://127.0.0.1:30000   # a running server

Its own server is SmolLM2-135M-Instruct with this CPU host's flags
(``dynsplit_sglang.launcher.CPU_SERVER_ARGS``) and the ChatML template. A server of your own
(``--base-url``, any device) gets no flags from here: start it with ``--kv-compression dynsplit``
(and ``--enable-metrics`` for the counters); the program then uses the chat template that server
applies to ``/v1/chat/completions``, read off with ``/v1/tokenize`` (``served_chat_template``).
"""

import argparse
import signal
import sys
import textwrap
import time
import urllib.error
import urllib.request
from itertools import zip_longest
from pathlib import Path

import sglang as sgl
from prometheus_client.parser import text_string_to_metric_families
from sglang.lang.chat_template import ChatTemplate

from dynsplit_sglang import launcher, models
from dynsplit_sglang.frontend import RuntimeEndpoint

COMPRESSION = ["--kv-compression", "dynsplit", "--dynsplit-budget-fraction", "0.25",
               "--enable-metrics"]

TOOLS = [
    ("search_docs", "Full-text search over the product documentation", "query: string, top_k: int"),
    ("read_file", "Return the contents of a file in the user's workspace", "path: string"),
    ("run_tests", "Run the project's test suite and return the failures", "pattern: string"),
    ("weather", "Current weather and a three-day forecast for a city", "city: string"),
    ("calendar", "List the user's meetings for a given day", "date: string (YYYY-MM-DD)"),
    ("send_email", "Send an email on the user's behalf, after confirmation", "to, subject, body"),
    ("convert_units", "Convert a quantity between units", "value: float, from: str, to: str"),
    ("translate", "Translate a short text into another language", "text: string, target: str"),
    ("sql_query", "Run a read-only SQL query on the analytics database", "sql: string"),
    ("create_ticket", "Open a ticket in the issue tracker", "title, body, labels: list"),
]

RULES = [
    "Think about which tool answers the question before calling any.",
    "Call at most one tool per turn; write the call as TOOL(name, arguments).",
    "Never invent tool results; wait for the observation.",
    "Quote numbers exactly as the tool returned them.",
    "If a tool fails, explain the failure and suggest a next step.",
    "Keep answers short: two sentences unless the user asks for more.",
]


def system_prompt() -> str:
    lines = ["You are a careful assistant that can use tools.", "", "## Tools"]
    for name, what, args in TOOLS:
        lines += [f"### {name}", f"{what}.", f"Arguments: {args}.",
                  f"Example: TOOL({name}, ...). Returns JSON; errors come back as "
                  '{"error": "..."}.', ""]
    lines += ["## Rules"] + [f"{i}. {r}" for i, r in enumerate(RULES, 1)]
    lines += ["", "## Examples"]
    for name, what, _ in TOOLS:
        lines += [f"User: I need this: {what.lower()}.", f"Assistant: TOOL({name}, ...)",
                  "Observation: {...}", "Assistant: Here is what I found.", ""]
    return "\n".join(lines)


# (task, tool observation, this session's compression: None = the server's settings)
SESSIONS = [
    ("What will the weather be in Paris tomorrow?",
     '{"city": "Paris", "tomorrow": {"high_c": 14, "low_c": 7, "sky": "light rain"}}', None),
    ("How many kilometres is 26.2 miles?", '{"value": 42.16, "unit": "km"}',
     {"budget_fraction": 0.5}),
    ("Do I have meetings on 2026-11-25?",
     '{"meetings": [{"time": "10:00", "title": "design review"}, '
     '{"time": "15:30", "title": "1:1 with Sam"}]}', {"strategy": "fixed", "budget": 256}),
]


@sgl.function
def agent(s, task, observation, dynsplit=None):  # dynsplit: read by the endpoint
    s += sgl.system(system_prompt())
    s += sgl.user(task)
    s += sgl.assistant(sgl.gen("plan", max_tokens=40, temperature=0))
    s += sgl.user(f"Observation: {observation}\nNow answer the user.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=48, temperature=0))


METRIC_PREFIX = "sglang:dynsplit_"


def parse_dynsplit_counters(text: str) -> dict:
    """The ``sglang:dynsplit_*`` samples of Prometheus text, as {name without the prefix and
    ``_total``: value}; a counter's label sets are summed, a gauge keeps its last value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(METRIC_PREFIX) or sample.name.endswith("_created"):
                continue
            key = sample.name[len(METRIC_PREFIX):].removesuffix("_total")
            base = out.get(key, 0.0) if family.type == "counter" else 0.0
            out[key] = base + sample.value
    return out


def dynsplit_counters(base_url: str) -> dict | None:
    """The server's DynSplit counters from /metrics; None without ``--enable-metrics``."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=60) as r:
            return parse_dynsplit_counters(r.read().decode())
    except urllib.error.HTTPError:
        return None


def served_chat_template(base_url: str) -> ChatTemplate | None:
    """The chat template the server applies to /v1/chat/completions, as the frontend's
    ChatTemplate. SGLang's RuntimeEndpoint picks one from the model path's *name* (a local folder
    such as .cache/models/smollm2-135m-instruct gets its plain "default"); here the server renders
    marker messages with its own template (/v1/tokenize, /v1/detokenize) and each role's prefix
    and suffix are read off around the markers. None when it cannot render them that way (a
    named --chat-template, a template without a system role)."""
    def post(path, body):
        return launcher.post_json(base_url + path, body, timeout=60)

    def render(messages, generation_prompt):
        ids = post("/v1/tokenize", {"messages": messages,
                                    "add_generation_prompt": generation_prompt})["tokens"]
        return post("/v1/detokenize", {"tokens": ids, "skip_special_tokens": False})["text"]

    sys_, user, asst, user2 = "MARKSYS", "MARKUSERA", "MARKASST", "MARKUSERB"
    turns = [{"role": "system", "content": sys_}, {"role": "user", "content": user}]
    try:
        t1 = render(turns, True)  # <bos?><sys prefix>SYS...USER<user suffix><assistant prefix>
        t2 = render(turns + [{"role": "assistant", "content": asst},
                             {"role": "user", "content": user2}], False)
        # A BOS the template writes is added again when /generate tokenizes the program's text.
        bos = post("/v1/detokenize", {"tokens": post("/v1/tokenize", {"prompt": ""})["tokens"],
                                      "skip_special_tokens": False})["text"]
        user_suffix = t2[t2.index(user2) + len(user2):]
        user_to_asst = t1[t1.index(user) + len(user):]
        sys_to_user = t1[t1.index(sys_) + len(sys_):t1.index(user)]
        asst_to_user = t2[t2.index(asst) + len(asst):t2.index(user2)]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return None
    sys_suffix = user_suffix if sys_to_user.startswith(user_suffix) else ""
    user_prefix = sys_to_user[len(sys_suffix):]
    if not (user_to_asst.startswith(user_suffix) and asst_to_user.endswith(user_prefix)):
        return None
    asst_suffix = asst_to_user[:len(asst_to_user) - len(user_prefix)]
    return ChatTemplate(
        name="served", default_system_prompt=None,
        role_prefix_and_suffix={"system": (t1[:t1.index(sys_)].removeprefix(bos), sys_suffix),
                                "user": (user_prefix, user_suffix),
                                "assistant": (user_to_asst[len(user_suffix):], asst_suffix)},
        stop_str=(asst_suffix.strip(),) if asst_suffix.strip() else ())


def side_by_side(left: str, right: str, width: int = 52, indent: str = "  ") -> None:
    for a, b in zip_longest(textwrap.wrap(left, width) or [""],
                            textwrap.wrap(right, width) or [""], fillvalue=""):
        print(f"{indent}{a:<{width}} | {b}")


DENSE = {"strategy": "none"}


def endpoint(base_url: str, chat_template_name: str | None = None) -> RuntimeEndpoint:
    """The frontend's backend: a named template, else the one the server applies."""
    backend = RuntimeEndpoint(base_url, chat_template_name=chat_template_name)
    if chat_template_name is None:
        served = served_chat_template(base_url)
        if served is not None:
            backend.chat_template = served
        else:  # SGLang's guess from the model path's name
            print(f"note: the server's chat template could not be read off; using SGLang's "
                  f"{backend.chat_template.name!r} for {backend.get_model_name()}")
    return backend


def budget(report: dict) -> str:
    return (f"{report['strategy']}, budget "
            f"{report['budget'] or 'fraction %s' % report['budget_fraction']}")


def run(base_url: str, chat_template_name: str | None = None, dense: bool = False) -> dict:
    """Run the sessions (then again dense when ``dense``) and print them; returns the
    compressed runs' counters, cached tokens and compression reports."""
    sgl.set_default_backend(endpoint(base_url, chat_template_name))
    states = agent.run_batch([{"task": t, "observation": o, "dynsplit": d}
                              for t, o, d in SESSIONS], num_threads=1, progress_bar=True)
    time.sleep(0.5)  # the server publishes its counters at most every 0.1 s
    counters = dynsplit_counters(base_url)  # before the dense runs add theirs
    # The dense runs find the shared prefix cached already: batched, they decode together.
    dense_states = agent.run_batch([{"task": t, "observation": o, "dynsplit": DENSE}
                                    for t, o, _ in SESSIONS], num_threads=len(SESSIONS),
                                   progress_bar=True) if dense else [None] * len(states)
    for (task, _, _), st, ds in zip(SESSIONS, states, dense_states):
        plan, answer = st.get_meta_info("plan"), st.get_meta_info("answer")
        mine = answer["dynsplit"]
        print(f"\n--- user: {task}")
        side_by_side(f"compressed: {budget(mine)} ({mine['source']})",
                     "dense: not run" if ds is None else f"dense: the same session with {DENSE}")
        for name in ("plan", "answer"):
            print(f"{name}:")
            side_by_side(st[name].strip(), ds[name].strip() if ds is not None else "")
        print(f"prompt tokens {plan['prompt_tokens']} (cached {plan['cached_tokens']}) -> "
              f"{answer['prompt_tokens']} (cached {answer['cached_tokens']})")
        fewer = mine["tokens_dense"] / max(1, mine["tokens_attended"])
        print(f"answer turn, compressed: K/V tokens attended {mine['tokens_attended']} vs "
              f"{mine['tokens_dense']} dense ({fewer:.1f}x fewer); blocks built "
              f"{mine['blocks_built']}, reused {mine['blocks_reused']}")
    print("\nDynSplit counters (server totals before the dense runs):")
    if counters is None:
        print("  no /metrics: start the server with --enable-metrics to see them")
    else:
        c = counters
        print(f"  blocks built {c.get('blocks_built', 0):.0f}, reused from shared prefixes "
              f"{c.get('blocks_reused', 0):.0f}")
        print(f"  K/V tokens attended {c.get('tokens_attended', 0):.0f} of "
              f"{c.get('tokens_dense', 0):.0f} (compression {c.get('compression_ratio', 1):.2f}x)")
    return {"counters": counters or {},
            "cached": [s.get_meta_info("answer")["cached_tokens"] for s in states],
            "compression": [s.get_meta_info("answer")["dynsplit"] for s in states]}


def _exit_on_sigterm(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(143)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", help="use a running server instead of starting one")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra launch_server flag for its own server")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense runs")
    args = ap.parse_args(argv)
    if args.base_url and args.server_arg:
        ap.error("--server-arg applies to the example's own server, not to --base-url")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.base_url:
        result = run(args.base_url.rstrip("/"), dense=not args.no_dense)
    else:
        model = models.ensure(models.DEFAULT_MODEL)
        log = Path(models.cache_dir() / "logs" / "agent-demo-server.log")
        print(f"starting SGLang with {' '.join(COMPRESSION)} on {model} (log: {log}) ...",
              flush=True)
        t0 = time.monotonic()
        with launcher.start_server(model, COMPRESSION + args.server_arg, log) as server:
            print(f"server healthy at {server.base_url} after {time.monotonic() - t0:.0f} s")
            # SmolLM2 is trained on ChatML (what its server applies too: served_chat_template).
            result = run(server.base_url, "chatml", dense=not args.no_dense)
            print("\nstopping the server ...", flush=True)
        print("server stopped")
    reused = result["counters"].get("blocks_reused",
                                    sum(r["blocks_reused"] for r in result["compression"]))
    ok = reused > 0 and all(x > 0 for x in result["cached"])
    print(f"shared prefix reused across sessions and turns: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
