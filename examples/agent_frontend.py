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

    python examples/agent_frontend.py                       # starts and stops its own server
    python examples/agent_frontend.py --base-url http://127.0.0.1:30000   # a running server
                                                            # (started with --enable-metrics)
"""

import argparse
import signal
import sys
import time
import urllib.request
from pathlib import Path

import sglang as sgl

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


def dynsplit_counters(base_url: str) -> dict:
    body = urllib.request.urlopen(base_url + "/metrics", timeout=60).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith("sglang:dynsplit_"):
            name, value = line.split()[:2]
            out[name[len("sglang:dynsplit_"):].removesuffix("_total")] = float(value)
    return out


def run(base_url: str) -> dict:
    # SmolLM2 is trained on ChatML; the frontend cannot guess that from a local folder's name.
    sgl.set_default_backend(RuntimeEndpoint(base_url, chat_template_name="chatml"))
    states = agent.run_batch([{"task": t, "observation": o, "dynsplit": d}
                              for t, o, d in SESSIONS], num_threads=1, progress_bar=True)
    for (task, _, _), st in zip(SESSIONS, states):
        plan, answer = st.get_meta_info("plan"), st.get_meta_info("answer")
        mine = answer["dynsplit"]
        print(f"\n--- user: {task}")
        print(f"plan:   {st['plan'].strip()}")
        print(f"answer: {st['answer'].strip()}")
        print(f"prompt tokens {plan['prompt_tokens']} (cached {plan['cached_tokens']}) -> "
              f"{answer['prompt_tokens']} (cached {answer['cached_tokens']})")
        print(f"compression ({mine['source']}): {mine['strategy']}, budget "
              f"{mine['budget'] or mine['budget_fraction']}; K/V tokens attended "
              f"{mine['tokens_attended']} of {mine['tokens_dense']}; blocks built "
              f"{mine['blocks_built']}, reused {mine['blocks_reused']}")
    c = dynsplit_counters(base_url)
    print("\nDynSplit counters:")
    print(f"  blocks built {c.get('blocks_built', 0):.0f}, reused from shared prefixes "
          f"{c.get('blocks_reused', 0):.0f}")
    print(f"  K/V tokens attended {c.get('tokens_attended', 0):.0f} of "
          f"{c.get('tokens_dense', 0):.0f} (compression {c.get('compression_ratio', 1):.2f}x)")
    return {"counters": c, "cached": [s.get_meta_info("answer")["cached_tokens"] for s in states],
            "compression": [s.get_meta_info("answer")["dynsplit"] for s in states]}


def _exit_on_sigterm(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(143)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", help="use a running server instead of starting one")
    ap.add_argument("--server-arg", action="append", default=[], help="extra launch_server flag")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.base_url:
        result = run(args.base_url.rstrip("/"))
    else:
        model = models.ensure(models.DEFAULT_MODEL)
        log = Path(models.cache_dir() / "logs" / "agent-demo-server.log")
        print(f"starting SGLang with {' '.join(COMPRESSION)} on {model} (log: {log}) ...",
              flush=True)
        t0 = time.monotonic()
        with launcher.start_server(model, COMPRESSION + args.server_arg, log) as server:
            print(f"server healthy at {server.base_url} after {time.monotonic() - t0:.0f} s")
            result = run(server.base_url)
            print("\nstopping the server ...", flush=True)
        print("server stopped")
    c = result["counters"]
    ok = c.get("blocks_reused", 0) > 0 and all(x > 0 for x in result["cached"])
    print(f"shared prefix reused across sessions and turns: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
