"""Each request's compression, from SGLang's request to the attention backend and back into the
response's ``meta_info["dynsplit"]``; the server's settings in ``/server_info``.

Hooks (sglang.srt.plugins.hook_registry.HookRegistry, SGLang 0.5.23):
* AFTER ``sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new`` (scheduler): each
  ``Req`` of the batch gets its ``RequestCompression``, made once from the request's
  ``sampling_params.custom_params["dynsplit"]`` or rid alias and kept on the Req
  (``Req._dynsplit``), and registered under its rid (``runtime.requests.LIVE``, weak: the entry
  dies with the request), which is what the attention backend finds in ``ForwardBatch.rids``.
* AFTER ``sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class`` (scheduler):
  SGLang's own extension point for per-request output fields (``has_additional_customized_info``
  / ``build_additional_customized_info`` of ``SchedulerOutputStreamer``): a finished request's
  report rides in ``customized_info["dynsplit"]``. Not with ``SGLANG_RUST_SERVER`` (SGLang refuses
  additional fields there), where responses carry no report.
* AROUND ``sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info``:
  puts the report in ``meta_info["dynsplit"]`` as one object (SGLang would accumulate it as a
  per-token list and slice it for incremental streaming).
* AFTER ``sglang.srt.utils.common.build_server_info``: ``/server_info`` (and the deprecated
  ``/get_server_info``) list the server's ``dynsplit`` settings.
"""

from __future__ import annotations

import weakref

from dynsplit_sglang.settings import Settings

KEY = "dynsplit"
TARGETS = (
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
    "sglang.srt.utils.common.build_server_info",
)
_ON_REQ = "_dynsplit"
_streamers: dict = {}


def request_of(req):
    """The request's RequestCompression, made on first use and registered under its rid."""
    found = getattr(req, _ON_REQ, None)
    if found is None:
        from dynsplit_sglang.runtime import requests

        found = requests.of(getattr(req.sampling_params, "custom_params", None), req.rid)
        found.req = weakref.ref(req)
        setattr(req, _ON_REQ, found)
        requests.LIVE[req.rid] = found
    return found


def _after_init_new(result, cls, batch, model_runner, *args, **kwargs):
    reqs = getattr(batch, "reqs", None)
    if reqs and Settings.of(model_runner.server_args).enabled:
        for r in reqs:
            request_of(r)
    return result


def _streamer_class(base):
    if base not in _streamers:
        class DynSplitOutputStreamer(base):
            has_additional_customized_info = True

            def build_additional_customized_info(self, reqs):
                out = super().build_additional_customized_info(reqs)
                cfg = Settings.of(self.server_args).config
                out[KEY] = [[getattr(r, _ON_REQ).report(cfg)]
                            if r.finished() and getattr(r, _ON_REQ, None) is not None else []
                            for r in reqs]
                return out

        _streamers[base] = DynSplitOutputStreamer
    return _streamers[base]


def _after_get_output_streamer_class(result, scheduler, *args, **kwargs):
    if not Settings.of(scheduler.server_args).enabled:
        return result
    if getattr(scheduler, "rust_server", None) is not None:
        return result  # SGLang's Rust egress refuses additional output fields
    return _streamer_class(result)


def _around_update_request_meta_info(original, self, meta_info, state, customized_info, index,
                                     *args, **kwargs):
    if KEY not in customized_info:
        return original(self, meta_info, state, customized_info, index, *args, **kwargs)
    rest = {k: v for k, v in customized_info.items() if k != KEY}
    if rest:
        original(self, meta_info, state, rest, index, *args, **kwargs)
    mine = customized_info[KEY][index]
    if mine:
        meta_info[KEY] = mine[-1]
    return None


def _after_build_server_info(result, server_args, *args, **kwargs):
    result[KEY] = Settings.of(server_args).describe()
    return result


def register(registry, hook_type) -> list[str]:
    registry.register(TARGETS[0], _after_init_new, hook_type.AFTER)
    registry.register(TARGETS[1], _after_get_output_streamer_class, hook_type.AFTER)
    registry.register(TARGETS[2], _around_update_request_meta_info, hook_type.AROUND)
    registry.register(TARGETS[3], _after_build_server_info, hook_type.AFTER)
    return list(TARGETS)
