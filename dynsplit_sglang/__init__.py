"""DynSplit-KV KV-cache compression for SGLang.

Servers pick it up through the ``sglang.srt.plugins`` entry point (``--kv-compression dynsplit``).
For ``sgl.Engine(kv_compression=..., dynsplit_config=...)``, call ``activate()`` first so the
keyword arguments are understood (or set ``SGLANG_DYNSPLIT`` to the settings' JSON). Per request:
``sampling_params.custom_params["dynsplit"]`` (see ``dynsplit_sglang.overrides``).
"""

__version__ = "0.1.0"


def activate() -> None:
    """Load SGLang's plugins (ours included) in this process now, before an Engine is built."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


def request_id(unique=None, **overrides) -> str:
    """A request id carrying per-request DynSplit overrides: the alias of
    ``sampling_params.custom_params["dynsplit"]`` (see ``dynsplit_sglang.overrides``)."""
    from .overrides import request_id as make

    return make(unique, **overrides)
