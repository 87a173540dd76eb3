"""Reference decode attention: dense, and sparse over per-(request, KV head) slot lists.

These are the torch twins the Triton decode kernel is checked against, and the CPU path itself.
K/V are read in place from a token pool ([slots, Hkv, D]); GQA query heads share their KV head's
slot list, so K/V are never repeated per query head. Accumulation is in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sparse_decode_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                            kv_slots: torch.Tensor, scale: float | None = None,
                            return_lse: bool = False):
    """q: [B, Hq, D]; k_buffer/v_buffer: [S, Hkv, D(v)]; kv_slots: [B, Hkv, N] (-1 = skip).

    Returns out [B, Hq, Dv] in q's dtype (and lse [B, Hq] float32, natural log, if asked).
    A (request, head) with no slot gets zeros and lse = -inf.
    """
    b, hq, d = q.shape
    hkv = k_buffer.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = kv_slots >= 0
    slots = kv_slots.clamp(min=0).long()
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    k = k_buffer[slots, heads].float()  # [B, Hkv, N, D]
    v = v_buffer[slots, heads].float()
    qg = q.float().view(b, hkv, g, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, k) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", p, v).reshape(b, hq, -1).to(q.dtype)
    if return_lse:
        return out, lse.reshape(b, hq)
    return out


def dense_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    token_slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Full attention of each request's decode query over its first seq_lens[b] positions,
    the way SGLang's torch_native backend does it: gather the request's slots, then SDPA."""
    b, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs = []
    for i in range(b):
        slots = token_slots[i, : int(seq_lens[i])].long()
        k = k_buffer[slots].transpose(0, 1)  # [Hkv, L, D]
        v = v_buffer[slots].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[i][:, None, :], k, v, scale=scale, enable_gqa=True
        )  # [Hq, 1, Dv]
        outs.append(o[:, 0])
    return torch.stack(outs)
