"""The --help text of each --dynsplit-* flag (``settings.add_arguments``): what it does, its unit
and its valid range; ``{default}`` is filled in with the DynSplitConfig default."""

FIELD_HELP = {
    "budget": "K/V tokens attended per decode step, per KV head of each compressed layer, sink "
              "and recent window included: an integer >= sink + recent and at most the model's "
              "context length. Requests no longer than it run dense. Default {default} unless "
              "--dynsplit-budget-fraction is given.",
    "budget_fraction": "The budget as the fraction of the context KEPT (attended) at each "
                       "decode step, in (0, 1]: 0.125 attends 1/8 of the tokens (never fewer "
                       "than sink + recent). Replaces --dynsplit-budget.",
    "block_size": "C: the target block length in tokens; blocks end at a delimiter between "
                  "C - Δ and C + Δ tokens. Integer in [2, 4096]. Default {default}.",
    "tolerance": "Δ: how far, in tokens, a block's length may stray from C. Integer in "
                 "[0, C - 1]. Default {default}.",
    "alpha": "α: weight of the distant-context penalty in a delimiter's importance score "
             "(0 = only the attention its block keeps). Number in [0, 100]. Default {default}.",
    "future_window": "|F|: the queries after a candidate delimiter that vote on it, in tokens. "
                     "Integer in [1, 256]. Default {default}.",
    "sink": "Tokens at the start of the context that are always attended (attention sink). "
            "Integer in [0, 1024]. Default {default}.",
    "recent": "Most recent tokens that are always attended. Integer in [1, 65536]. "
              "Default {default}.",
    "candidates": "Which tokens may end a block: punct (punctuation, newlines), sentence "
                  "(. ! ? newline only) or all. "
                  "Default {default}.",
    "dense_layers": "The first N layers decode densely (uncompressed). Integer in [0, 1024]. "
                    "Default {default}.",
    "score_layers": "Layers (evenly spaced) whose attention votes on block boundaries; 0 = all "
                    "layers. Default {default}.",
    "score": "How a block is scored against the query from its summary, without reading its "
             "keys: gauss (the block's mean key plus --dynsplit-spread expected-maximum "
             "deviations of its keys along the query) or bound (Quest's upper bound from the "
             "keys' channel-wise min/max box). Default {default}.",
    "spread": "gauss score only: how many expected-maximum deviations above a block's mean key "
              "its score reaches; higher favours blocks whose keys vary more. Number in "
              "(0, 16]. Default {default}.",
    "refine": "Two-stage block selection: the block score picks candidate blocks for this "
              "many times the budget, then their keys are read and their exact max q·k picks "
              "the budget among them (1 = the score alone; 2 reads one extra budget of keys "
              "per step). Number in [1, 64]. Default {default}.",
    "min_sparse_len": "Decode attends densely while a request's context is shorter than this "
                      "many tokens, where a compressed step would cost more time than the keys "
                      "it skips (0 = compress whenever the context exceeds the budget). Integer "
                      "in [0, 16777216]. Default {default}.",
    "evict": "Free the KV slots of each request's least important blocks, keeping sink, "
             "recent window and top blocks within the budget (memory, not only attention). "
             "Needs --disable-overlap-schedule (added when omitted).",
    "evict_scope": "When --dynsplit-evict decides: prompt (once the request's whole prompt, "
                   "question included, is in: blocks of its own part, past any prefix shared "
                   "in the radix tree, ranked by the attention of the prompt's last "
                   "--dynsplit-evict-window queries) or chunk (after every prefill chunk, "
                   "among its new tokens, by key distinctiveness: query-agnostic, a lower "
                   "peak). Default {default}.",
    "evict_window": "--dynsplit-evict-scope prompt: how many of the prompt's last queries "
                    "rank the blocks (SnapKV's observation window). Integer in [1, 4096]. "
                    "Default {default}.",
    "evict_keep": "--dynsplit-evict-scope prompt: the first N positions of every prompt are "
                  "never evicted, as a prefix shared in the radix tree is not (per request: "
                  "a client marks what other requests will share, e.g. an agent's system and "
                  "tool prompt, before anyone has matched it). Integer in [0, 16777216]. "
                  "Default {default}.",
    "evict_hold": "--dynsplit-evict-scope prompt: 0 keeps the whole prompt until it is in (the "
                  "peak of a request is its prompt); h >= 1 bounds the peak: after every "
                  "prefill chunk the request's own part keeps at most h times its budget at the "
                  "length so far (blocks ranked by key distinctiveness), and the prompt's "
                  "end decides the rest with the question. Peak per request: about h x budget "
                  "+ one chunk. 0 or a number in [1, 64]. Default {default}.",
    "evict_tier": "--dynsplit-evict-scope prompt: none frees evicted blocks for good; host "
                  "keeps their K/V (every layer) in a cold tier outside the KV pool, and a "
                  "request that extends an evicted prompt through the radix tree (a next "
                  "turn) brings its blocks back before its prompt's end decides again with "
                  "the new question. Default {default}.",
    "evict_tier_mb": "--dynsplit-evict-tier host: the tier's size in MiB (per TP rank); past "
                     "it the least recently used blocks are dropped for good, counted. "
                     "Integer in [1, 1048576]. Default {default}.",
    "evict_pool": "--dynsplit-evict-scope prompt: the window's attention is max-pooled over "
                  "this many neighbouring positions before blocks are ranked. Odd integer in "
                  "[1, 255]. Default {default}.",
}
