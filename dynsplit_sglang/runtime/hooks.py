"""What the runtime needs from the SGLang side that only ``patches/`` knows, handed in from above.

Data flows one way (SGLang → patches → runtime → core/kernels): the runtime never imports
``patches/``. The patch modules set these when they are imported, and ``patches.apply_all``
imports every one of them in each SGLang process before any attention backend (and so any
compressor) is built.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

# patches/eviction.py: for an extend of SGLang's Req ending at seq_len, (whether it ends the
# prompt, the first position that is the request's own); None until eviction's patch is loaded.
prompt_ownership: Callable[[Any, int], tuple[bool, int]] | None = None
# patches/eviction.py: copy the zeros eviction wrote into a request's row into its radix-tree
# path; False when the process has no slot-counting tree.
revise_tree: Callable[[Any, Any], bool] | None = None
# patches/eviction.py: the token ids of SGLang's Req through its current extend (the cold tier's
# position keys).
token_ids: Callable[[Any], Any] | None = None
# The other way: what the radix tree tells the runtime (the cold tier, runtime/cold.py). Each
# listener has ``flushed()`` (the tree was emptied) and ``dropped(token_ids, positions)`` (a node
# whose evicted positions are these left the tree: nothing can match them any more). Compressors
# add themselves; patches/eviction.py calls them.
tree_listeners: "weakref.WeakSet" = weakref.WeakSet()
# patches/memory.py: this process's pool sizing (dense and compressed tokens, cell and store
# bytes), updated in place when SGLang sizes the pool.
memory_plan: dict = {}
