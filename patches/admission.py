"""Requests refused at admission, with an HTTP 400, instead of failing in the scheduler.

Hooks (sglang.srt.plugins.hook_registry.HookRegistry, SGLang 0.5.23), both in the process that
runs ``TokenizerManager`` (the HTTP server / Engine); a ``ValueError`` raised there is SGLang's
own "bad request" path (``/generate`` and the OpenAI endpoints answer 400 with its message):

* BEFORE ``sglang.srt.managers.tokenizer_manager.TokenizerManager._init_req_state``: runs once per
  ``generate_request``, after SGLang normalised the request and before any part of a batch is
  tokenized or sent, so a bad item refuses the whole batch and nothing half-runs. Checks every
  item's DynSplit override (``sampling_params.custom_params["dynsplit"]`` or the rid alias, see
  ``dynsplit_sglang.overrides``) against the server's settings and context length, and refuses
  literally empty prompts.
* BEFORE ``sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request``: the
  tokenized prompt. Zero tokens (``{"text": ""}`` with a tokenizer that adds no BOS) kill the
  scheduler in SGLang 0.5.23's rotary embedding, with or without compression; token ids outside
  the model's vocabulary fail in its embedding lookup.

Error messages name the field and never echo more than a few dozen characters of the input.
"""

from __future__ import annotations

from dynsplit_sglang import overrides
from dynsplit_sglang.core import ConfigError
from dynsplit_sglang.settings import Settings

TARGETS = (
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._init_req_state",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
)


def _items(obj):
    if getattr(obj, "is_single", True):
        return [obj]
    return [obj[i] for i in range(len(obj.rid))]


def check_request(item, settings: Settings, context_len: int | None) -> None:
    """ValueError (an HTTP 400) naming what is wrong with this generate request."""
    params = item.sampling_params if isinstance(item.sampling_params, dict) else {}
    custom = params.get("custom_params")
    if settings.enabled and custom is not None and not isinstance(custom, dict):
        # It would carry no override at all, and the client would never learn its own was lost.
        # On a dense server SGLang's own handling of the field stands.
        raise ValueError(f"custom_params must be a JSON object of name: value, got "
                         f"{type(custom).__name__}")
    given = custom.get(overrides.KEY) if isinstance(custom, dict) else None
    try:
        from_rid = overrides.from_request_id(item.rid)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if given is None and from_rid is None:
        return
    if given is not None and from_rid is not None:
        raise ValueError("custom_params.dynsplit and a 'dynsplit:' request id both set "
                         "overrides; give them once")
    if not settings.enabled:
        raise ValueError("custom_params.dynsplit: this server runs without KV compression "
                         "(start it with --kv-compression)")
    try:
        if given is not None:
            overrides.check(given, settings.config, context_len=context_len)
        else:
            overrides.check(from_rid, settings.config, overrides.RID_WHERE,
                            context_len=context_len, from_text=True)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def _empty(item) -> bool:
    if getattr(item, "input_embeds", None) is not None or _multimodal(item):
        return False
    ids = getattr(item, "input_ids", None)
    if ids is not None:
        return len(ids) == 0
    return item.text == ""


def _multimodal(item) -> bool:
    contains = getattr(item, "contains_mm_input", None)
    return bool(contains and contains())


def _before_init_req_state(self, obj, *args, **kwargs):
    from sglang.srt.managers.io_struct import GenerateReqInput

    if not isinstance(obj, GenerateReqInput):
        return None
    settings = Settings.of(self.server_args)
    for item in _items(obj):
        if _empty(item):
            raise ValueError("the prompt is empty: give at least one token of text or input_ids")
        check_request(item, settings, self.context_len)
    return None


def _before_validate_one_request(self, obj, input_ids, *args, **kwargs):
    from sglang.srt.managers.io_struct import GenerateReqInput

    if not isinstance(obj, GenerateReqInput) or input_ids is None:
        return None
    if len(input_ids) == 0 and not _multimodal(obj):
        raise ValueError("the prompt is empty (0 tokens after tokenization): give at least one "
                         "token")
    vocab = getattr(self.model_config, "vocab_size", None)
    if vocab and not _multimodal(obj) and (min(input_ids) < 0 or max(input_ids) >= vocab):
        bad = next(t for t in input_ids if t < 0 or t >= vocab)
        raise ValueError(f"input_ids: token id {bad} is outside the model's vocabulary "
                         f"[0, {vocab})")
    return None


def register(registry, hook_type) -> list[str]:
    registry.register(TARGETS[0], _before_init_req_state, hook_type.BEFORE)
    registry.register(TARGETS[1], _before_validate_one_request, hook_type.BEFORE)
    return list(TARGETS)
