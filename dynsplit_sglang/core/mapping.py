"""Uniform mapping: variable-length semantic blocks in a fixed-shape format.

Every block, whatever its length (≤ C+Δ), is represented by two key vectors per KV head, the
channel-wise min and max of its keys (Quest-style bounds). Block tables are padded to a fixed
capacity, so scoring and selection are batched tensor ops with static shapes instead of loops
over ragged blocks (the paper's 4.9× selection-overhead cut). Summaries are kept in the K
buffer's own dtype: a min/max of bf16 values is exactly a bf16 value, and one summary row has the
shape of one K slot, so summaries can live in slots of the token pool.

The functions with an ``out_*`` argument are the torch twins of the Triton kernels; the naive
``*_ragged`` variant is the baseline for the overhead comparison.
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
    out_kmin: torch.Tensor,
    out_kmax: torch.Tensor,
    out_index: torch.Tensor,
    max_block_len: int,
) -> None:
    """Write the min/max keys of every block into out_*[out_index[b, j]] (skipped where < 0).

    k_buffer: [slots, Hkv, D]; token_slots: [B, T] slot of each position of each request;
    out_kmin/out_kmax: [M, Hkv, D]; out_index: [B, NB] int64.
    """
    b, nb = table.starts.shape
    valid = (table.lens > 0) & (out_index >= 0)
    if not bool(valid.any()):
        return
    t = torch.arange(max_block_len, device=k_buffer.device)
    pos = table.starts.long()[..., None] + t  # [B, NB, S]
    inside = t < table.lens.long()[..., None]
    pos = torch.where(inside, pos, table.starts.long()[..., None])  # pad with the first token
    slots = torch.gather(token_slots.long(), 1, pos.view(b, -1).clamp(max=token_slots.shape[1] - 1))
    keys = k_buffer[slots.view(b, nb, max_block_len)]  # [B, NB, S, Hkv, D]
    kmin = keys.amin(dim=2)[valid]
    kmax = keys.amax(dim=2)[valid]
    dst = out_index[valid]
    out_kmin[dst] = kmin.to(out_kmin.dtype)
    out_kmax[dst] = kmax.to(out_kmax.dtype)


def summarize(k: torch.Tensor, table: BlockTable, max_block_len: int):
    """Summaries of contiguous per-request keys k: [B, L, Hkv, D] → (kmin, kmax) [B, NB, Hkv, D]."""
    bsz, length, hkv, d = k.shape
    nb = table.capacity
    kmin = k.new_zeros(bsz * nb, hkv, d)
    kmax = k.new_zeros(bsz * nb, hkv, d)
    idx = torch.arange(bsz * nb, device=k.device).view(bsz, nb)
    slots = contiguous_slots(bsz, length, k.device)
    block_summaries(k.reshape(bsz * length, hkv, d), slots, table, kmin, kmax, idx, max_block_len)
    return kmin.view(bsz, nb, hkv, d), kmax.view(bsz, nb, hkv, d)


def summarize_ragged(k: torch.Tensor, ends: torch.Tensor):
    """Naive variable-length variant for one request (k: [L, Hkv, D]): one slice per block."""
    out_min, out_max, s = [], [], 0
    for e in ends.tolist():
        blk = k[s:e + 1]
        out_min.append(blk.amin(dim=0))
        out_max.append(blk.amax(dim=0))
        s = e + 1
    return out_min, out_max
