"""Uniform mapping: variable-length semantic blocks in a fixed-shape format.

Every block, whatever its length n (≤ C+Δ), is represented by two key vectors per KV head, a
*center* and a *radius*, from which ``core.selection.score_blocks`` estimates the block's largest
q·k without reading its keys:

* ``spread=None`` (Quest's box): center = (min + max) / 2 and radius = (max - min) / 2 channel
  by channel, so that q·center + Σ_d |q_d|·radius_d is exactly Quest's bound
  Σ_d max(q_d·kmax_d, q_d·kmin_d).
* ``spread=λ`` (the default score, "gauss"): center = the mean key and radius =
  λ·sqrt(2 ln n)·std per channel, so that q·center + sqrt(Σ_d q_d²·radius_d²) is the mean logit
  plus λ times the expected maximum deviation of n draws along q. Unlike the box, which adds up
  each channel's extreme from different tokens and so grows with n much faster than the true
  maximum (docs/accuracy.md), it prefers no block for being long.

Block tables are padded to a fixed capacity, so scoring and selection are batched tensor ops with
static shapes instead of loops over ragged blocks (the paper's 4.9× selection-overhead cut).
Summaries are computed in fp32 and kept in the K buffer's own dtype; one summary row has the shape
of one K slot, so summaries can live in slots of the token pool.

The functions with an ``out_*`` argument are the torch twins of the Triton kernels; the naive
``*_ragged`` variant is a reference (the kernel benchmark's ragged baseline is a vectorised one:
benchmarks/kernels/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class BlockTable:
    """Fixed-shape block layout of a batch: entry (b, j) is block j of request b."""

    starts: torch.Tensor  # int32 [B, NB], position of the block's first token
    lens: torch.Tensor  # int32 [B, NB], 0 for padding entries

    @property
    def capacity(self) -> int:
        return self.starts.shape[1]

    @property
    def counts(self) -> torch.Tensor:
        return (self.lens > 0).sum(dim=1)

    @classmethod
    def from_ends(
        cls,
        ends_per_request: Sequence[torch.Tensor],
        starts_at: Sequence[int] | None = None,
        capacity: int | None = None,
        device: torch.device | str = "cpu",
    ) -> "BlockTable":
        """Pack per-request block end positions (inclusive) into a padded table."""
        nbs = [int(e.numel()) for e in ends_per_request]
        cap = max(nbs + [1]) if capacity is None else capacity
        if max(nbs + [0]) > cap:
            raise ValueError(f"BlockTable: {max(nbs)} blocks exceed the capacity {cap}")
        b = len(ends_per_request)
        starts = torch.zeros(b, cap, dtype=torch.int32)
        lens = torch.zeros(b, cap, dtype=torch.int32)
        for i, ends in enumerate(ends_per_request):
            n = nbs[i]
            if n == 0:
                continue
            ends = ends.to("cpu", torch.long)
            first = 0 if starts_at is None else int(starts_at[i])
            st = torch.cat([ends.new_tensor([first]), ends[:-1] + 1])
            starts[i, :n] = st.to(torch.int32)
            lens[i, :n] = (ends - st + 1).to(torch.int32)
        return cls(starts.to(device), lens.to(device))


def contiguous_slots(batch: int, length: int, device="cpu") -> torch.Tensor:
    """Token-slot map for K stored request after request: position p of request b is slot
    b*length + p (handy for tests and for the core-only evaluation path)."""
    return torch.arange(batch * length, device=device).view(batch, length)


def block_summaries(
    k_buffer: torch.Tensor,
    token_slots: torch.Tensor,
    table: BlockTable,
    out_center: torch.Tensor,
    out_radius: torch.Tensor,
    out_index: torch.Tensor,
    max_block_len: int,
    spread: float | None = None,
) -> None:
    """Write every block's center and radius into out_*[out_index[b, j]] (skipped where < 0).

    k_buffer: [slots, Hkv, D]; token_slots: [B, T] slot of each position of each request;
    out_center/out_radius: [M, Hkv, D]; out_index: [B, NB] int64; spread: None for Quest's
    min/max box, else the gauss spread λ (see the module docstring).
    """
    block_summaries_layers([k_buffer], token_slots, table, out_center[None], out_radius[None],
                           out_index, max_block_len, spread)


# Keys gathered per group of layers in block_summaries_layers, at most (fp32): about an L2. A
# block freeze (one block, a few KiB per layer) takes every layer in one group; a prefill chunk
# takes one layer at a time, as before: stacking a 4096-token chunk's keys over Qwen's 24 layers
# (63 MB) took 139 ms against 93 ms layer by layer (one thread), the temporaries out of cache.
LAYER_GROUP_BYTES = 2 << 20


def block_summaries_layers(
    k_buffers,
    token_slots: torch.Tensor,
    table: BlockTable,
    out_center: torch.Tensor,
    out_radius: torch.Tensor,
    out_index: torch.Tensor,
    max_block_len: int,
    spread: float | None = None,
) -> None:
    """block_summaries for the same blocks in several layers at once: out_center[l] and
    out_radius[l] ([L, M, Hkv, D]) from k_buffers[l] ([slots, Hkv, D] each). The block
    positions are resolved once and the reductions run over all the layers of a group, instead
    of once per layer (a decode step that freezes a block builds its summary in every layer)."""
    b, nb = table.starts.shape
    valid = (table.lens > 0) & (out_index >= 0)
    if not bool(valid.any()):
        return
    dev = k_buffers[0].device
    t = torch.arange(max_block_len, device=dev)
    lens = table.lens.long().clamp(max=max_block_len)
    pos = table.starts.long()[..., None] + t  # [B, NB, S]
    inside = t < lens[..., None]
    pos = torch.where(inside, pos, table.starts.long()[..., None])  # pad with the first token
    slots = torch.gather(token_slots.long(), 1, pos.view(b, -1).clamp(max=token_slots.shape[1] - 1))
    rows = slots.view(b, nb, max_block_len)[valid].view(-1)  # [N * S]
    inside, lens, dst = inside[valid], lens[valid], out_index[valid]
    n_layers, (_, hkv, d) = len(k_buffers), k_buffers[0].shape
    group = max(1, LAYER_GROUP_BYTES // max(rows.numel() * hkv * d * 4, 1))
    for l0 in range(0, n_layers, group):
        layers = range(l0, min(l0 + group, n_layers))
        keys = torch.stack([k_buffers[li].index_select(0, rows) for li in layers]).float()
        center, radius = _center_radius(keys.view(len(layers), -1, max_block_len, hkv, d),
                                        inside, lens, spread)
        out_center[layers.start:layers.stop, dst] = center.to(out_center.dtype)
        out_radius[layers.start:layers.stop, dst] = radius.to(out_radius.dtype)


def _center_radius(keys, inside, lens, spread):
    """keys [..., N, S, Hkv, D] (fp32; rows past a block's length repeat its first key), inside
    [N, S], lens [N] -> (center, radius) [..., N, Hkv, D]."""
    if spread is None:
        lo, hi = keys.amin(dim=-3), keys.amax(dim=-3)
        return (lo + hi) / 2, (hi - lo) / 2
    m = inside[..., None, None].float()
    n = lens.float()[:, None, None]
    mean = (keys * m).sum(dim=-3) / n
    std = (((keys - mean.unsqueeze(-3)) ** 2 * m).sum(dim=-3) / n).sqrt()
    z = torch.sqrt(2 * torch.log(lens.float().clamp(min=2)))[:, None, None]
    return mean, spread * z * std


def summarize(k: torch.Tensor, table: BlockTable, max_block_len: int, spread: float | None = None):
    """Summaries of contiguous per-request keys k: [B, L, Hkv, D] -> (center, radius)
    [B, NB, Hkv, D]."""
    bsz, length, hkv, d = k.shape
    nb = table.capacity
    center = k.new_zeros(bsz * nb, hkv, d)
    radius = k.new_zeros(bsz * nb, hkv, d)
    idx = torch.arange(bsz * nb, device=k.device).view(bsz, nb)
    slots = contiguous_slots(bsz, length, k.device)
    block_summaries(k.reshape(bsz * length, hkv, d), slots, table, center, radius, idx,
                    max_block_len, spread)
    return center.view(bsz, nb, hkv, d), radius.view(bsz, nb, hkv, d)


def summarize_ragged(k: torch.Tensor, ends: torch.Tensor, spread: float | None = None):
    """Naive variable-length variant for one request (k: [L, Hkv, D]): one slice per block."""
    centers, radii, s = [], [], 0
    for e in ends.tolist():
        blk = k[s:e + 1].float()[None]
        c, r = _center_radius(blk, torch.ones(blk.shape[:2], dtype=torch.bool),
                              torch.tensor([blk.shape[1]]), spread)
        centers.append(c[0].to(k.dtype))
        radii.append(r[0].to(k.dtype))
        s = e + 1
    return centers, radii
