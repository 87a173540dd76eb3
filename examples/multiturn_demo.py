"""Multi-turn chat against SGLang with DynSplit-KV compression, showing the radix prefix cache.

Each turn re-sends the whole conversation (system prompt + earlier turns), so from the second
turn on SGLang finds the shared prefix in its radix cache: ``cached_tokens`` > 0. Each turn also
prints its ``meta_info["dynsplit"]`` report (SGLang's ``return_meta_info``): K/V tokens attended
vs what dense attention reads. Turns this short run dense: the budget never goes below the sink
and recent window (68 tokens by default), so the report shows attended = dense until the
conversation is longer than that.

    python examples/multiturn_demo.py                      # starts and stops its own server
    python examples/multiturn_demo.py --no-compression     # its own server, without compression
    python examples/multiturn_demo.py --base-url http://127.0.0.1:30000   # a running server
    python examples/multiturn_demo.py --server-arg=--dtype --server-arg=bfloat16

Its own server runs SmolLM2-135M-Instruct with this CPU host's flags
(``dynsplit_sglang.launcher.CPU_SERVER_ARGS``), ``COMPRESSION`` unless ``--no-compression``, and
any ``--server-arg``. A server of your own (``--base-url``, any device) gets no flags from here.
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from dynsplit_sglang import launcher, models

COMPRESSION = ["--kv-compression", "dynsplit", "--dynsplit-budget-fraction", "0.25"]
SYSTEM = "You are a helpful assistant."
QUESTIONS = [
    "What is the capital of France?",
    "Name one famous landmark in that city.",
    "What is it made of?",
]


def chat_turn(base_url: str, messages: list[dict], max_tokens: int) -> tuple[str, dict, dict]:
    reply = launcher.post_json(
        base_url + "/v1/chat/completions",
        {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
         "return_meta_info": True},
    )
    choice = reply["choices"][0]
    return (choice["message"]["content"], reply.get("usage") or {},
            (choice.get("meta_info") or {}).get("dynsplit") or {})


def run_conversation(base_url: str, max_tokens: int) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    cached = []
    for i, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question})
        t0 = time.monotonic()
        answer, usage, report = chat_turn(base_url, messages, max_tokens)
        messages.append({"role": "assistant", "content": answer})
        hit = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        cached.append(hit)
        print(f"\n--- turn {i} ({time.monotonic() - t0:.1f} s)")
        print(f"user:      {question}")
        print(f"assistant: {answer.strip()}")
        print(f"prompt_tokens={usage.get('prompt_tokens')} cached_tokens={hit}", flush=True)
        if report:
            print(f"dynsplit: strategy {report['strategy']}, K/V tokens attended "
                  f"{report['tokens_attended']} of {report['tokens_dense']} dense", flush=True)
        else:
            print("dynsplit: no report (the server runs without --kv-compression)", flush=True)
    return cached


def _exit_on_sigterm(*_):
    # SystemExit unwinds through the `with` block in main(), which stops the server; a second
    # SIGTERM must not interrupt that clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(143)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="use a running server instead of starting one")
    parser.add_argument("--model", default=None,
                        help="model folder for its own server (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--no-compression", action="store_true",
                        help="start its own server without --kv-compression dynsplit")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra launch_server flag for its own server")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--health-timeout", type=float, default=300.0)
    parser.add_argument("--log-file", default=None, help="server log (default: .cache/logs/)")
    args = parser.parse_args(argv)
    if args.base_url and (args.no_compression or args.server_arg or args.model):
        parser.error("--no-compression, --server-arg and --model apply to the example's own "
                     "server, not to --base-url")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    if args.base_url:
        cached = run_conversation(args.base_url.rstrip("/"), args.max_tokens)
    else:
        model = args.model or models.ensure(models.DEFAULT_MODEL)
        log = Path(args.log_file or models.cache_dir() / "logs" / "demo-server.log")
        extra = ([] if args.no_compression else COMPRESSION) + args.server_arg
        print(f"starting SGLang on {model} (CPU; {' '.join(extra) or 'no compression'}; "
              f"log: {log}) ...", flush=True)
        t0 = time.monotonic()
        with launcher.start_server(model, extra, log,
                                   health_timeout=args.health_timeout) as server:
            print(f"server healthy at {server.base_url} after {time.monotonic() - t0:.0f} s",
                  flush=True)
            cached = run_conversation(server.base_url, args.max_tokens)
            print("\nstopping the server ...", flush=True)
        print("server stopped")

    later_hits = all(c > 0 for c in cached[1:])
    print(f"\ncached_tokens per turn: {cached} -> radix prefix reuse on later turns: "
          f"{'yes' if later_hits else 'NO'}")
    return 0 if later_hits else 1


if __name__ == "__main__":
    sys.exit(main())
