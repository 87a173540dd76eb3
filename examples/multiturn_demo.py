"""Multi-turn chat against SGLang on CPU, showing the radix prefix cache at work.

Each turn re-sends the whole conversation (system prompt + earlier turns), so from the second
turn on SGLang finds the shared prefix in its radix cache: ``cached_tokens`` > 0.

    python examples/multiturn_demo.py                      # starts and stops its own server
    python examples/multiturn_demo.py --base-url http://127.0.0.1:30000   # a running server
    python examples/multiturn_demo.py --server-arg=--dtype --server-arg=bfloat16

The own server uses ``dynsplit_sglang.launcher.CPU_SERVER_ARGS`` plus any ``--server-arg``.
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from dynsplit_sglang import launcher, models

SYSTEM = "You are a helpful assistant."
QUESTIONS = [
    "What is the capital of France?",
    "Name one famous landmark in that city.",
    "What is it made of?",
]


def chat_turn(base_url: str, messages: list[dict], max_tokens: int) -> tuple[str, dict]:
    reply = launcher.post_json(
        base_url + "/v1/chat/completions",
        {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0},
    )
    return reply["choices"][0]["message"]["content"], reply.get("usage") or {}


def run_conversation(base_url: str, max_tokens: int) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    cached = []
    for i, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question})
        t0 = time.monotonic()
        answer, usage = chat_turn(base_url, messages, max_tokens)
        messages.append({"role": "assistant", "content": answer})
        hit = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        cached.append(hit)
        print(f"\n--- turn {i} ({time.monotonic() - t0:.1f} s)")
        print(f"user:      {question}")
        print(f"assistant: {answer.strip()}")
        print(f"prompt_tokens={usage.get('prompt_tokens')} cached_tokens={hit}", flush=True)
    return cached


def _exit_on_sigterm(*_):
    # SystemExit unwinds through the `with` block in main(), which stops the server; a second
    # SIGTERM must not interrupt that clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(143)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="use a running server instead of starting one")
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra launch_server flag")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--health-timeout", type=float, default=300.0)
    parser.add_argument("--log-file", default=None, help="server log (default: .cache/logs/)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    if args.base_url:
        cached = run_conversation(args.base_url.rstrip("/"), args.max_tokens)
    else:
        model = args.model or models.ensure(models.DEFAULT_MODEL)
        log = Path(args.log_file or models.cache_dir() / "logs" / "demo-server.log")
        print(f"starting SGLang on {model} (CPU; log: {log}) ...", flush=True)
        t0 = time.monotonic()
        with launcher.start_server(model, args.server_arg, log, health_timeout=args.health_timeout) as server:
            print(f"server healthy at {server.base_url} after {time.monotonic() - t0:.0f} s", flush=True)
            cached = run_conversation(server.base_url, args.max_tokens)
            print("\nstopping the server ...", flush=True)
        print("server stopped")

    later_hits = all(c > 0 for c in cached[1:])
    print(f"\ncached_tokens per turn: {cached} -> radix prefix reuse on later turns: "
          f"{'yes' if later_hits else 'NO'}")
    return 0 if later_hits else 1


if __name__ == "__main__":
    sys.exit(main())
