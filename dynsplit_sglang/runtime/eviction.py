"""Which settled blocks a request gives back to the KV pool (pure torch, no SGLang).

A block's importance is the most distinctive of its keys (core.key_distinctiveness: how far a
key points from the mean key direction of its extend, averaged over KV heads, the max over the
scored layers): query-agnostic, so a prefix compressed once is right for every request that later
shares it. The least important blocks go first, whole, until the excess is covered.
"""

from __future__ import annotations

import torch


def block_heat(token_heat: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Max of token_heat [T] over each block [starts, starts + lens) (lens > 0): float32 [N]."""
    width = int(lens.max())
    offs = torch.arange(width, device=starts.device)
    pos = starts[:, None] + offs[None, :]
    inside = offs[None, :] < lens[:, None]
    vals = token_heat[pos.clamp(max=token_heat.numel() - 1)]
    return vals.masked_fill(~inside, float("-inf")).amax(dim=1)


def pick_victims(heat: torch.Tensor, lens: torch.Tensor, excess: int) -> torch.Tensor:
    """Indices of the coldest blocks whose lengths first add up to >= excess (all of them if
    they never do). Ties go to the earlier block, so the choice is deterministic."""
    order = torch.sort(heat, stable=True).indices
    covered = torch.cumsum(lens[order], dim=0)
    take = int(torch.searchsorted(covered, torch.tensor(excess, device=covered.device))) + 1
    return order[: min(take, order.numel())]
