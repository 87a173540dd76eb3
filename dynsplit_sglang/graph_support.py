"""Whether compression may run under SGLang's graph capture, decided at start-up.

SGLang 0.5.23 captures decode (``cuda_graph_config.decode``, backend ``full`` by default on a
GPU) and, on CUDA, prefill (``.prefill``, ``breakable``) into graphs. A captured forward does not
run the backend's Python per step, so anything it decides on the host (which blocks exist, the
budget, the plan) would be frozen at capture time, and SGLang's prefill graph runner never calls
``init_forward_metadata``. The graph path (``runtime/graphs.py``) is built with static shapes and
tested on CPU, but it has not run on a GPU yet. Until it has, compression with any graph phase on
is refused at start-up, with a message naming ``--disable-cuda-graph``: never a silent dense
decode.

``VERIFIED_PHASES`` lists the phases whose compressed graph path passed ``benchmarks/gpu/check.sh``
on a GPU; the check's author adds a phase here (with the check's log in CHANGELOG.md) and the
refusal lifts for it. ``DYNSPLIT_UNVERIFIED_CUDA_GRAPHS=1`` lets that check itself start a server
with graphs on; it is not for serving. Two SGLang switches that act around a captured graph stay
refused with graphs on, verified or not (``_ENV_REFUSED``).
"""

from __future__ import annotations

import os
from typing import Any

PHASES = ("decode", "prefill")
VERIFIED_PHASES: frozenset[str] = frozenset()  # none yet: no GPU run so far
UNVERIFIED_ENV = "DYNSPLIT_UNVERIFIED_CUDA_GRAPHS"


def _phases_of(cfg: Any) -> list[str]:
    return [p for p in PHASES
            if str(getattr(getattr(cfg, p, None), "backend", "disabled")).lower() != "disabled"]


def graph_phases_on(sa: Any) -> list[str]:
    """Phases for which these server arguments capture graphs.

    A resolved ServerArgs (the scheduler's, or any after ``resolve_once``) carries SGLang's own
    answer, ``cuda_graph_config``. ``prepare_server_args`` returns the record unresolved: then
    the raw flags decide, and only what SGLang 0.5.23 certainly turns off counts as off
    (``--disable-cuda-graph``, both phases' ``--disable-*-cuda-graph`` or
    ``--cuda-graph-backend-*=disabled``, and the torch_native attention backend, for which
    ``handle_attention_backend_compatibility`` disables both phases). An object with none of
    these attributes (not a ServerArgs) counts as off."""
    cfg = getattr(sa, "cuda_graph_config", None)
    if cfg is not None and not isinstance(cfg, (dict, str)):
        return _phases_of(cfg)
    if getattr(sa, "_resolution_finished", False):
        from sglang.srt.arg_groups.overrides import resolution_result

        resolved = resolution_result(sa, "cuda_graph_config")
        if resolved is not None and not isinstance(resolved, (dict, str)):
            return _phases_of(resolved)
    if not hasattr(sa, "disable_cuda_graph") or getattr(sa, "disable_cuda_graph"):
        return []
    backends = {getattr(sa, "attention_backend", None), getattr(sa, "decode_attention_backend", None),
                getattr(sa, "prefill_attention_backend", None)} - {None}
    if backends == {"torch_native"}:
        return []
    on = []
    for p in PHASES:
        off = (getattr(sa, f"disable_{p}_cuda_graph", False)
               or str(getattr(sa, f"cuda_graph_backend_{p}", None)).lower() == "disabled")
        if not off:
            on.append(p)
    return on


# SGLang 0.5.23 switches that change what runs around a captured graph, not built for here:
# the metadata glue graph captures init_forward_metadata_out_graph itself (the plan is host
# work), and post-capture KV sizing resizes the pool after the block store was sized for it.
_ENV_REFUSED = {
    "SGLANG_ENABLE_METADATA_GLUE_GRAPH": "captures the per-replay metadata step, where the "
                                         "compressed decode plans on the host",
    "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING": "resizes the KV pool after the block store was "
                                            "sized for it",
}


def cuda_graph_problem(sa: Any) -> str | None:
    """The refusal for these server arguments, or None if compression may run with them."""
    phases = graph_phases_on(sa)
    env = [f"{k}=1 ({why}): unset it" for k, why in _ENV_REFUSED.items()
           if phases and os.environ.get(k, "").lower() in ("1", "true")]
    unproven = [p for p in phases if p not in VERIFIED_PHASES]
    if unproven and os.environ.get(UNVERIFIED_ENV) != "1":
        return "; ".join(
            [f"CUDA graphs ({'/'.join(unproven)} capture is on; compressed decode under graphs "
             "is not verified on a GPU yet): add --disable-cuda-graph"] + env)
    return "; ".join(env) or None
