"""Stand-in for ``sgl_kernel.speculative``. SGLang 0.5.23 imports
``reconstruct_indices_from_tree_mask`` from it at module level on the CPU path
(``sglang.kernels.ops.speculative.reconstruct_tree``). Every name is a stub that raises
NotImplementedError when called."""

from sgl_kernel import make_module_getattr

__getattr__ = make_module_getattr(__name__)
