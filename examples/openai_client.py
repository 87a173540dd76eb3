"""Per-request DynSplit-KV settings from the OpenAI Python client (``pip install openai``).

Sends one chat request twice to a running server started with ``--kv-compression dynsplit``:
with ``custom_params {"dynsplit": {"budget_fraction": 0.25}}`` (compressed) and with
``{"strategy": "none"}`` (dense), and prints both answers side by side. The server applies the
model's own chat template (``/v1/chat/completions``). SGLang's ``return_meta_info`` (an
``extra_body`` key too) adds each choice's ``meta_info`` to the OpenAI response; its
``meta_info["dynsplit"]`` is the compression report (K/V tokens attended vs dense, blocks built
and reused); ``usage`` shows prompt, completion and cached tokens.

    python examples/openai_client.py --base-url http://127.0.0.1:30000
    python examples/openai_client.py --yaml > server.yaml   # sglang serve --config server.yaml
"""

import argparse
import itertools
import sys
import textwrap

from openai import OpenAI

SITES = ["Lyon", "Porto", "Ghent", "Turin", "Basel", "Leeds", "Cork", "Bilbao", "Graz", "Malmo",
         "Brno", "Split", "Tartu", "Kaunas", "Pecs", "Aarhus", "Bergen", "Tampere", "Nantes",
         "Genoa"]
GOODS = ["apricots", "copper wire", "olive oil", "bicycle tyres", "wool", "glass jars", "rice"]
DOCUMENT = "\n".join(
    f"The warehouse in {site} holds {37 + 19 * i} crates of {GOODS[i % len(GOODS)]}, "
    f"checked on day {3 + i % 11} of the audit by team {chr(65 + i % 6)}."
    for i, site in enumerate(SITES))
QUESTION = "How many crates does the warehouse in Tartu hold, and of what?"

COMPRESSED = {"budget_fraction": 0.25}
DENSE = {"strategy": "none"}

YAML = """\
# server.yaml, for: sglang serve --config server.yaml   (flags given as well override the file)
model-path: MODEL                 # a folder or hub id, e.g. .cache/models/smollm2-135m-instruct
kv-compression: dynsplit
dynsplit-budget-fraction: 0.125   # or dynsplit-budget: 1024 (tokens)
enable-metrics: true              # sglang:dynsplit_* counters on /metrics
enable-cache-report: true         # cached_tokens in the OpenAI usage block
"""


def cpu_yaml() -> str:
    """The CPU host's flags (dynsplit_sglang.launcher.CPU_SERVER_ARGS) as YAML keys."""
    try:
        from dynsplit_sglang.launcher import CPU_SERVER_ARGS
    except ImportError:
        return ""
    lines, args = ["# on a CPU-only host, as `make demo` and the tests run it:"], CPU_SERVER_ARGS
    for flag, nxt in zip(args, args[1:] + ["--"]):
        if flag == "--disable-cuda-graph":  # deprecated: a config file refuses it
            lines += [f"cuda-graph-backend-{phase}: disabled" for phase in ("decode", "prefill")]
        elif flag.startswith("--") and f"\n{flag[2:]}:" not in YAML:
            lines.append(f"{flag[2:]}: {'true' if nxt.startswith('--') else nxt}")
    return "\n".join(lines) + "\n"


def ask(client: OpenAI, model: str, settings: dict, max_tokens: int):
    messages = [{"role": "system", "content": "Answer from the document, in one sentence."},
                {"role": "user", "content": f"{DOCUMENT}\n\n{QUESTION}"}]
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0,
        extra_body={"custom_params": {"dynsplit": settings}, "return_meta_info": True})
    choice = reply.choices[0]
    meta = (choice.model_extra or {}).get("meta_info") or {}
    return choice.message.content.strip(), meta.get("dynsplit"), reply.usage


def side_by_side(left: str, right: str, width: int = 48) -> None:
    for a, b in itertools.zip_longest(textwrap.wrap(left, width) or [""],
                                      textwrap.wrap(right, width) or [""], fillvalue=""):
        print(f"  {a:<{width}} | {b}")


def describe(name: str, report, usage) -> str:
    cached = getattr(usage.prompt_tokens_details, "cached_tokens", None)
    line = (f"  {name}: usage prompt {usage.prompt_tokens} (cached {cached}), "
            f"completion {usage.completion_tokens}")
    if not report:
        return line + "; no meta_info['dynsplit'] (server not started with --kv-compression?)"
    budget = report["budget"] or f"fraction {report['budget_fraction']}"
    return (line + f"\n    dynsplit ({report['source']}): strategy {report['strategy']}, budget "
            f"{budget}; K/V tokens attended {report['tokens_attended']} of "
            f"{report['tokens_dense']}; blocks built {report['blocks_built']}, reused "
            f"{report['blocks_reused']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:30000", help="a running server")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--yaml", action="store_true", help="print an example server.yaml and exit")
    args = ap.parse_args(argv)
    if args.yaml:
        print(YAML + cpu_yaml(), end="")
        return 0
    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    runs = {name: ask(client, model, settings, args.max_tokens)
            for name, settings in [("compressed", COMPRESSED), ("dense", DENSE)]}
    print(f"model {model}\nquestion: {QUESTION}\n")
    side_by_side(f"compressed {COMPRESSED}", f"dense {DENSE}")
    side_by_side("-" * 48, "-" * 48)
    side_by_side(runs["compressed"][0], runs["dense"][0])
    print()
    for name, (_, report, usage) in runs.items():
        print(describe(name, report, usage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
