"""Small HTTP helpers for the server tests."""

import json
import random

from dynsplit_sglang.launcher import post_json

WORDS = ("the model reads a long document , then answers ; every block ends at a delimiter . "
         "semantic splitting keeps related tokens together ! code ( x ) differs from prose ? "
         "\n").split(" ")


def text(n_words, seed):
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(n_words))


def generate(server, prompts, rids=None, max_new=12):
    payload = {"text": prompts, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                    "ignore_eos": True}}
    if rids is not None:
        payload["rid"] = rids
    out = post_json(server.base_url + "/generate", payload)
    return [o["text"] for o in out], [o["meta_info"] for o in out]


def stats(server):
    return json.loads(server.stats_path.read_text()) if server.stats_path.exists() else {}


def flush(server):
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(server.base_url + "/flush_cache",
                                                  method="POST"), timeout=60).read()
