"""Stand-in for ``sgl_kernel.mamba``. SGLang 0.5.23 imports ``causal_conv1d_fn_cpu``,
``causal_conv1d_update_cpu`` and ``chunk_gated_delta_rule_cpu`` from it at module level on the
CPU path (``sglang.srt.layers.attention.linear.gdn_backend``, ``kda_backend``,
``kernels.gdn_triton``). Every name is a stub that raises NotImplementedError when called."""

from sgl_kernel import make_module_getattr

__getattr__ = make_module_getattr(__name__)
