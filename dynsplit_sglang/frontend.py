"""Per-request DynSplit overrides from SGLang's frontend language.

SGLang 0.5.23's ``RuntimeEndpoint`` builds each ``/generate`` body itself and forwards neither a
rid nor ``custom_params`` (``sgl.gen`` has no argument for them), so a frontend program cannot
reach the per-request channel. ``RuntimeEndpoint`` here is SGLang's, with one addition: every
generation it sends carries ``sampling_params.custom_params["dynsplit"]``, taken from

* the program's argument named ``dynsplit`` when the ``sgl.function`` declares one
  (``agent.run(..., dynsplit={"strategy": "fixed"})``: per call), else
* the endpoint's ``dynsplit=`` (every call through it).

The server validates it at admission (HTTP 400 naming the field) and reports what each
generation used in its meta info: ``state.get_meta_info("answer")["dynsplit"]``.
"""

from __future__ import annotations

import copy

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint as _SGLangEndpoint

from .overrides import KEY


class RuntimeEndpoint(_SGLangEndpoint):
    def __init__(self, base_url: str, *args, dynsplit: dict | None = None, **kwargs):
        super().__init__(base_url, *args, **kwargs)
        self.dynsplit = dict(dynsplit) if dynsplit else None

    def _overrides(self, s) -> dict | None:
        found = getattr(s, "arguments", {}).get(KEY)
        return dict(found) if found is not None else self.dynsplit

    def _with_overrides(self, s, sampling_params):
        found = self._overrides(s)
        if found is None:
            return sampling_params
        params = copy.copy(sampling_params)
        to_srt = params.to_srt_kwargs

        def to_srt_kwargs():
            return {**to_srt(), "custom_params": {KEY: found}}

        params.to_srt_kwargs = to_srt_kwargs
        return params

    def generate(self, s, sampling_params):
        return super().generate(s, self._with_overrides(s, sampling_params))

    def generate_stream(self, s, sampling_params):
        return super().generate_stream(s, self._with_overrides(s, sampling_params))
