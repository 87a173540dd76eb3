"""FlashInfer-style plan/run wrapper for one compressed decode step.

The kernel side is chosen once, when the wrapper is built (``backend="auto"``: Triton on a CUDA
device, torch on a CPU one, ``DYNSPLIT_KERNELS`` forcing a side; see ``dispatch``).

``plan`` runs once per batch step (host work allowed: it may read sizes) and takes the
SelectionPlan the caller built with ``core.plan_selection`` (the selection policy: budgets,
sink, recent window, capacity), plus what attention needs that does not depend on the query:
the summary rows and the token slots. From them it builds the attention plan: the split count
and the split workspace (Triton side) or the top-k bound (torch side), sized for the plan's
fixed per-request capacity. ``run`` is then called once per layer and does
score → select → positions_to_slots → attention with device ops only (no .item(), .cpu(),
.tolist(); every shape fixed by the plan), so it can be captured in a CUDA graph. With a
candidate plan (``refine``: core.selection.candidate_plan), select is two-stage: the score picks
candidates, their exact max q·k over the layer's keys picks the blocks (select_refined).

Split count (Triton path): flash-decoding's rule on the static capacity — enough
(request x KV head x split) programs for about two per SM, splits of at least two key tiles,
at most MAX_SPLITS (a fixed bound so a captured graph keeps its workspace). See
``sparse_decode.num_kv_splits`` and docs/kernels.md.
"""

from __future__ import annotations

import torch

from dynsplit_sglang.core.selection import (
    Selection, SelectionPlan, exact_block_scores, positions_to_slots, select,
)

from .dispatch import implementation


class SparseDecodeWrapper:
    """Compressed decode attention for a batch whose block table is fixed for the step.

    num_q_heads / num_kv_heads / head_dim_v size the Triton workspace (like FlashInfer's plan
    arguments); they are only needed on the Triton side. device/backend choose the kernels.
    """

    def __init__(self, num_q_heads: int | None = None, num_kv_heads: int | None = None,
                 head_dim_v: int | None = None, max_splits: int | None = None, *,
                 device: torch.device | str = "cpu", backend: str = "auto"):
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim_v = head_dim_v
        self.max_splits = max_splits
        self.kernels = implementation(device, backend)
        self.selection_plan: SelectionPlan | None = None
        self.last_selection: Selection | None = None
        self._summary_index = self._token_slots = None
        self.candidates: SelectionPlan | None = None  # two-stage selection's first stage
        self._max_cand = None  # CPU top-k bound of the candidate stage
        self._l2 = False
        self._mid = None  # Triton split workspace (outputs, LSEs) for the planned shapes
        self._max_kept = None  # CPU top-k selection bound for the planned batch
        self._step = None  # CPU: what the step's layers share (kernels.cpu.DecodeStep)
        self._buffer = None  # workspace storage, reused across plans when large enough
        self._scratch = None  # CPU work buffers, reused across plans (kernels.cpu.Scratch)
        self._summaries = None  # (center, radius) of every compressed layer: run_layer's
        self.layer_counts: torch.Tensor | None = None  # run_layer: [L, B, Hkv] tokens attended
        self._layer_set = None  # CPU: every layer of the step as one bound fused call
        self._pools: dict = {}  # the layers' pools, checked once (kernels.native.LayerSet)

    def plan(self, selection: SelectionPlan, summary_index: torch.Tensor,
             token_slots: torch.Tensor, l2=False, summaries=None,
             refine: SelectionPlan | None = None) -> None:
        """selection: the step's SelectionPlan (core.plan_selection); summary_index: [B, NB]
        summary rows of the plan's blocks (-1 = none); token_slots: [B, T] position → KV slot;
        l2: the score's radius norm (core.selection.score_blocks), one bool or a [B] tensor;
        summaries: (center, radius) [L, M, Hkv, D], every compressed layer's block summaries,
        fixed for the step: then run_layer(li, ...) runs layer li (and counts its tokens);
        refine: the candidate plan of a two-stage selection (core.selection.candidate_plan of
        `selection`), None for the score alone."""
        side = self.kernels.side
        if side == "triton" and isinstance(l2, bool):  # the kernel reads a per-request flag
            l2 = torch.full((selection.seq_lens.shape[0],), int(l2), dtype=torch.int32,
                            device=token_slots.device)
        self._install(selection, summary_index, token_slots, l2, refine)
        if side == "torch":
            from . import cpu
            self._max_kept = cpu.max_kept_blocks(selection)  # host read: plan time only
            if refine is not None:
                self._max_cand = cpu.max_kept_blocks(refine)
            if self.num_kv_heads is not None:
                self._scratch = self._scratch or cpu.Scratch()
                self._step = cpu.DecodeStep(selection, summary_index, token_slots,
                                            self.num_kv_heads, l2, self._max_kept,
                                            self._scratch, cand=refine,
                                            max_cand=self._max_cand)
        if summaries is not None:
            center, radius = self._summaries = summaries
            self.layer_counts = torch.zeros(center.shape[0], selection.seq_lens.shape[0],
                                            center.shape[2], dtype=torch.int64,
                                            device=token_slots.device)
            if self._step is not None and self.num_q_heads is not None:
                self._layer_set = self._step.layer_set(
                    center, radius, self.layer_counts, self.num_q_heads,
                    self.head_dim_v or center.shape[3], self._pools)

    def plan_static(self, selection: SelectionPlan, summary_index: torch.Tensor,
                    token_slots: torch.Tensor, l2: torch.Tensor,
                    refine: SelectionPlan | None = None) -> None:
        """Use a plan whose tensors the caller keeps and refreshes in place (a captured CUDA
        graph reads them by address: runtime/graphs.py), the per-request radius norm included
        (l2: bool [B]) and the candidate plan (refine, with a static capacity). No host read;
        the selection is the core's on every side."""
        self._install(selection, summary_index, token_slots, l2, refine)

    def _install(self, selection, summary_index, token_slots, l2, refine=None) -> None:
        self.selection_plan = selection
        self.candidates = refine
        self._max_cand = None
        self._summary_index = summary_index
        self._token_slots = token_slots
        self._l2 = l2
        self.last_selection = None
        self._mid = None
        self._max_kept = None
        self._step = None
        self._summaries = self.layer_counts = self._layer_set = None
        if self.kernels.side == "triton" and self.num_kv_heads is not None:
            batch = selection.seq_lens.shape[0]
            self._mid = self._workspace(batch, selection.capacity, token_slots.device)

    def reserve(self, max_batch: int, dev) -> None:
        """Allocate the Triton split workspace for batches up to `max_batch` once, so that later
        plans never move it (captured graphs keep its address)."""
        if self.kernels.side != "triton" or self.num_kv_heads is None:
            return
        from . import sparse_decode as sd
        need = max_batch * self.num_q_heads * (self.max_splits or sd.MAX_SPLITS) * (
            self.head_dim_v + 1)
        self._buffer = torch.empty(need, dtype=torch.float32, device=dev)

    def _workspace(self, batch: int, capacity: int, dev: torch.device):
        from . import sparse_decode as sd  # imports triton: only on the Triton side
        if self.num_q_heads is None or self.head_dim_v is None:
            raise ValueError("SparseDecodeWrapper: give num_q_heads, num_kv_heads, head_dim_v")
        block_n = sd.default_block_n(self.head_dim_v)
        splits = sd.num_kv_splits(batch, self.num_kv_heads, capacity, dev, block_n,
                                  self.max_splits or sd.MAX_SPLITS)
        hq, dv = self.num_q_heads, self.head_dim_v
        need = batch * hq * splits * (dv + 1)
        if self._buffer is None or self._buffer.numel() < need or self._buffer.device != dev:
            self._buffer = torch.empty(need, dtype=torch.float32, device=dev)
        o = self._buffer[: batch * hq * splits * dv].view(batch, hq, splits, dv)
        lse = self._buffer[batch * hq * splits * dv: need].view(batch, hq, splits)
        return o, lse

    @property
    def num_splits(self) -> int:
        return 1 if self._mid is None else self._mid[1].shape[2]

    def select(self, q, center, radius, k_buffer=None) -> Selection:
        """Score the blocks and pick the positions each (request, KV head) attends to.
        k_buffer: the layer's key pool [S, Hkv, D], which a two-stage selection reads."""
        if self.selection_plan is None:
            raise RuntimeError("SparseDecodeWrapper: plan() first")
        if self.candidates is not None and k_buffer is None:
            raise ValueError("SparseDecodeWrapper: a two-stage selection (refine) reads the "
                             "keys: give k_buffer")
        if self._step is not None:
            self.last_selection = sel = self._step.select(q, center, radius, k_buffer)
            return sel
        scores = self.kernels.score_blocks(q, center, radius, self._summary_index, self._l2)
        if self.candidates is not None:
            cand = self._keep(scores, self.candidates, self._max_cand)
            scores = exact_block_scores(q, k_buffer, self._token_slots, cand, self.candidates)
        self.last_selection = sel = self._keep(scores, self.selection_plan, self._max_kept)
        return sel

    @staticmethod
    def _keep(scores, plan: SelectionPlan, max_kept: int | None) -> Selection:
        if max_kept is not None:
            from . import cpu  # top-k select: the same result for a fraction of the CPU time
            return cpu.select(scores, plan, max_kept)
        return select(scores, plan)

    def run(self, q, k_buffer, v_buffer, center, radius, scale=None, return_lse=False):
        """q: [B, Hq, D]; k_buffer/v_buffer: the layer's pool [S, Hkv, D(v)]; center/radius:
        the layer's block summaries [M, Hkv, D]. Returns out [B, Hq, Dv] (and lse [B, Hq] if
        asked)."""
        if self._step is not None:
            fused = self._step.run(q, k_buffer, v_buffer, center, radius, scale, return_lse)
            if fused is not None:
                out, self.last_selection = fused
                return out
        sel = self.select(q, center, radius, k_buffer)
        if self._step is not None:
            return self._step.attend(q, k_buffer, v_buffer, sel, scale, return_lse)
        slots = positions_to_slots(sel.positions, self._token_slots)
        opts = {"counts": sel.counts}  # valid entries form a prefix of each list
        if self._mid is not None:
            opts["mid"] = self._mid
        return self.kernels.sparse_decode_attention(q, k_buffer, v_buffer, slots, scale,
                                                    return_lse, **opts)

    def run_layer(self, li: int, q, k_buffer, v_buffer, scale=None):
        """run for compressed layer li of the summaries given to plan (out [B, Hq, Dv]); its
        tokens attended go to layer_counts[li]. On the CPU, the step's bound fused call (a few
        pointer writes per layer: kernels.native.LayerSet); else run."""
        fused = self._layer_set
        if fused is not None:
            out = fused(li, q, k_buffer, v_buffer, scale)
            if out is not None:
                return out
        if self._summaries is None:
            raise RuntimeError("SparseDecodeWrapper: run_layer needs plan(..., summaries=...)")
        center, radius = self._summaries
        if not 0 <= li < center.shape[0]:
            raise IndexError(f"SparseDecodeWrapper: layer {li} of {center.shape[0]}")
        out = self.run(q, k_buffer, v_buffer, center[li], radius[li], scale)
        self.layer_counts[li].copy_(self.last_selection.counts)
        return out

    def tokens_attended(self) -> torch.Tensor | None:
        """int64 [B, Hkv]: tokens each KV head attended to in the last run (device tensor; read
        it outside the captured region, e.g. for counters)."""
        return None if self.last_selection is None else self.last_selection.counts
