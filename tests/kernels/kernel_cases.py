"""Random but realistic inputs for the kernel tests: a scattered KV pool, ragged requests,
block tables from the core's own segmentation, summaries in scattered rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynsplit_sglang.core import BlockTable, DynSplitConfig, block_summaries, segment

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # bf16: output rounding
SPREADS = [None, 1.5]  # the two summary kinds: Quest's box, the gauss default


@dataclass
class Batch:
    k: torch.Tensor  # pool [S, Hkv, D]
    v: torch.Tensor  # pool [S, Hkv, Dv]
    token_slots: torch.Tensor  # [B, T]
    seq_lens: torch.Tensor  # [B]
    table: BlockTable
    center: torch.Tensor  # [M, Hkv, D]
    radius: torch.Tensor
    summary_index: torch.Tensor  # [B, NB], -1 = padding
    spread: float | None = None  # what the summaries were built with (None: Quest's box)

    @property
    def l2(self) -> bool:
        """The radius norm that scores these summaries."""
        return self.spread is not None

    def to(self, device) -> "Batch":
        moved = {k: v.to(device) for k, v in self.__dict__.items() if torch.is_tensor(v)}
        table = BlockTable(self.table.starts.to(device), self.table.lens.to(device))
        return Batch(**moved, table=table, spread=self.spread)


def make_batch(lens, hkv, d, dtype, strategy="fixed", block_size=16, tolerance=4, seed=0,
               device="cpu", dv=None, spread=None, runs=False) -> Batch:
    """runs: each request's blocks are two runs of consecutive summary rows (its second half
    stored before its first, requests in reverse order), as a block store lays them out;
    otherwise every block has a random summary row."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lens), max(lens)
    size = 2 * sum(lens) + 11  # a larger pool: other requests' slots are in between
    k = torch.randn(size, hkv, d, generator=g)
    v = torch.randn(size, hkv, dv or d, generator=g)
    perm = torch.randperm(size, generator=g)
    token_slots = torch.zeros(b, t, dtype=torch.int64)
    at = 0
    for i, n in enumerate(lens):
        token_slots[i, :n] = perm[at:at + n]
        at += n
    cfg = DynSplitConfig(strategy=strategy, block_size=block_size, tolerance=tolerance)
    ends = []
    for n in lens:
        scores = torch.randn(n, generator=g)
        cands = torch.rand(n, generator=g) < 0.3
        ends.append(segment(cfg, n, scores, cands).ends)
    table = BlockTable.from_ends(ends)
    nb = table.capacity
    m = b * nb + 5
    index = torch.randperm(m, generator=g)[: b * nb].view(b, nb)
    if runs:
        at = 3
        for i in reversed(range(b)):
            n = int((table.lens[i] > 0).sum())
            for lo, hi in ((n // 2, n), (0, n // 2)):
                index[i, lo:hi] = torch.arange(at, at + hi - lo)
                at += hi - lo + 1
    index = index.masked_fill(table.lens == 0, -1)
    center = torch.zeros(m, hkv, d)
    radius = torch.zeros(m, hkv, d)
    block_summaries(k.to(dtype), token_slots, table, center, radius, index, cfg.max_block_len,
                    spread)
    to = dict(device=device)
    return Batch(
        k=k.to(dtype=dtype, **to), v=v.to(dtype=dtype, **to), token_slots=token_slots.to(**to),
        seq_lens=torch.tensor(lens, **to), table=BlockTable(table.starts.to(**to), table.lens.to(**to)),
        center=center.to(dtype=dtype, **to), radius=radius.to(dtype=dtype, **to),
        summary_index=index.to(**to), spread=spread,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
