"""DD-Select's delimiter importance score, accumulated during prefill.

    s_i = E_{layer, head, q in F_i} [ sum_{k in O_i(q)} A_qk  -  alpha * sum_{k in D_i} A_qk ]

with F_i = (i, i + w_f] (future queries), O_i(q) = (i, q] (the context a boundary at i keeps local)
and D_i = [sink, i] (the distant context a boundary at i cuts off; attention sinks excluded).
A high score marks a position after which the following tokens stop looking back.

Never materialises an L×L attention map: A_qk = exp(scale·q·k - lse_q) is only evaluated on the
w_f-wide band of keys before each query and on the sink keys; sum_D follows from
1 - sum_sink - sum_O. The per-query log-sum-exp is exact (chunked over queries), or supplied by
the caller when the prefill attention kernel already returns it.

Causal by construction: s_i depends on tokens up to i + w_f only, which is what makes the
segmentation of a shared prefix independent of whatever follows it.
"""

from __future__ import annotations

import math

import torch

from .config import DynSplitConfig

_LSE_CHUNK = 256


def _causal_logits(q, k, q_start, scale, key_ok=None):
    """Chunks of causal attention logits: yields (c0, c1, logits [Hkv, G, c, kend]), with keys
    after each query and keys where key_ok [len(k)] is False at -inf."""
    lq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.float().reshape(lq, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]
    for c0 in range(0, lq, _LSE_CHUNK):
        c1 = min(c0 + _LSE_CHUNK, lq)
        kend = q_start + c1
        kk = k[:kend].float().permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, kend]
        logits = torch.matmul(qg[:, :, c0:c1], kk) * scale  # [Hkv, G, c, kend]
        qpos = torch.arange(q_start + c0, q_start + c1, device=q.device)
        kpos = torch.arange(kend, device=q.device)
        hidden = kpos[None, :] > qpos[:, None]
        if key_ok is not None:
            hidden = hidden | ~key_ok[None, :kend]
        logits.masked_fill_(hidden, float("-inf"))
        yield c0, c1, logits


def causal_lse(q: torch.Tensor, k: torch.Tensor, q_start: int, scale: float,
               key_ok: torch.Tensor | None = None) -> torch.Tensor:
    """Log-sum-exp of each query's causal attention logits.

    q: [Lq, Hq, D] at absolute positions q_start.. ; k: [>= q_start+Lq, Hkv, D]; key_ok: keys
    that exist (evicted ones do not). Returns [Lq, Hkv, G] with G = Hq // Hkv (query heads
    grouped by their KV head).
    """
    lq, hq, _ = q.shape
    hkv = k.shape[1]
    fused = None if key_ok is not None else _fused_lse(q, k, q_start, scale)
    if fused is not None:
        return fused.permute(2, 0, 1).contiguous()
    out = torch.empty(hkv, hq // hkv, lq, dtype=torch.float32, device=q.device)
    for c0, c1, logits in _causal_logits(q, k, q_start, scale, key_ok):
        out[:, :, c0:c1] = torch.logsumexp(logits, dim=-1)
    return out.permute(2, 0, 1).contiguous()


def _fused_lse(q, k, q_start, scale):
    """causal_lse as [Hkv, G, Lq] from torch's fused CPU attention kernel, which returns each
    query's log-sum-exp without materialising the logits (the chunked logits cost about 4x SDPA
    on the same shapes: +55% on a 32k prefill). Two calls: the keys before the chunk, seen by
    every query (query heads folded into the query length, so K is not repeated per group),
    and the chunk's own keys, causal and square; merged by logaddexp. None where the kernel is
    not there (another device, an older torch): the chunked path runs."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    lq, hq, d = q.shape
    hkv = k.shape[1]
    if op is None or q.device.type != "cpu" or lq == 0:
        return None
    g = hq // hkv
    qf = q.float()
    own = k[q_start:q_start + lq].float().repeat_interleave(g, dim=1)  # [Lq, Hq, D]
    own = own.permute(1, 0, 2).unsqueeze(0)
    _, lse = op(qf.permute(1, 0, 2).unsqueeze(0), own, own, 0.0, True, scale=scale)
    lse = lse.view(hkv, g, lq)
    if q_start > 0:
        qg = qf.reshape(lq, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * lq, d)
        before = k[:q_start].float().permute(1, 0, 2).unsqueeze(0)
        _, lse_before = op(qg, before, before, 0.0, False, scale=scale)
        lse = torch.logaddexp(lse, lse_before.view(hkv, g, lq))
    return lse


def key_distinctiveness(k: torch.Tensor) -> torch.Tensor:
    """Query-agnostic importance of keys k [L, Hkv, D]: 1 - cos(key, mean key direction),
    averaged over KV heads; float32 [L].

    The idea of KeyDiff (Park et al., 2025): keys that point where most keys point draw attention
    from every query alike and carry little, distinctive keys are the ones a specific later
    question retrieves. Needs no query, so it can decide on a prefix before its question exists.
    """
    kn = torch.nn.functional.normalize(k.float(), dim=-1)
    anchor = torch.nn.functional.normalize(kn.mean(dim=0, keepdim=True), dim=-1)
    return (1.0 - (kn * anchor).sum(dim=-1)).mean(dim=-1)


def window_heat(q: torch.Tensor, k: torch.Tensor, q_start: int, scale: float,
                key_ok: torch.Tensor | None = None, pool: int = 7) -> torch.Tensor:
    """Question-aware importance of every key: the attention the prompt's last queries pay it.

    SnapKV's observation window (Li et al., 2024): q [W, Hq, D] are the queries at positions
    q_start.. (the prompt's end, where the question is), k [q_start + W, Hkv, D]. Each query's
    causal softmax (keys where key_ok is False take no part) is averaged over the window and the
    query heads of each KV head, max-pooled over `pool` neighbouring positions (so a value is
    kept with its neighbours, not token by token) and maxed over KV heads: a position that one
    head needs is kept for all, since a KV slot holds every head. float32 [q_start + W].
    """
    lq, hq, _ = q.shape
    hkv = k.shape[1]
    kend = q_start + lq
    acc = torch.zeros(hkv, kend, dtype=torch.float32, device=q.device)
    for _, c1, logits in _causal_logits(q, k, q_start, scale, key_ok):
        probs = torch.softmax(logits, dim=-1)  # [Hkv, G, c, q_start + c1]
        acc[:, : q_start + c1] += probs.sum(dim=(1, 2))
    acc /= lq * (hq // hkv)
    if pool > 1:
        acc = torch.nn.functional.max_pool1d(acc[None], pool, stride=1, padding=pool // 2)[0]
    return acc.amax(dim=0)


def layer_votes(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    cfg: DynSplitConfig,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's votes: [Lq, w_f] where entry (t, j) is the head-averaged vote of the query at
    position q_start + t for the candidate at position q_start + t - (j + 1)."""
    lq, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if lse is None:
        lse = causal_lse(q, k, q_start, scale)
    wf, sink = cfg.future_window, cfg.sink
    dev = q.device
    qpos = torch.arange(q_start, q_start + lq, device=dev)
    qg = q.float().reshape(lq, hkv, g, d)

    # Band keys q, q-1, ..., q-wf+1 (column j holds key q-j).
    j = torch.arange(wf, device=dev)
    kidx = qpos[:, None] - j[None, :]
    band_ok = kidx >= 0
    kb = k[kidx.clamp(min=0)].float()  # [Lq, wf, Hkv, D]
    band = torch.einsum("thgd,tjhd->thgj", qg, kb) * scale
    band = torch.exp(band - lse[..., None]).masked_fill(~band_ok[:, None, None, :], 0.0)
    kept = band.cumsum(dim=-1)  # kept[..., j] = sum over keys (q-j-1, q] = sum_O for i = q-j-1

    if sink > 0:
        ks = k[:sink].float()  # [S, Hkv, D]
        sl = torch.einsum("thgd,shd->thgs", qg, ks) * scale
        sl = torch.exp(sl - lse[..., None])
        future = torch.arange(ks.shape[0], device=dev)[None, :] > qpos[:, None]  # [Lq, S]
        sink_mass = sl.masked_fill(future[:, None, None, :], 0.0).sum(dim=-1, keepdim=True)
    else:
        sink_mass = torch.zeros_like(kept[..., :1])

    cand = qpos[:, None] - (j[None, :] + 1)  # candidate position of column j
    distant = (1.0 - sink_mass - kept).clamp(min=0.0)
    has_d = (cand >= sink)[:, None, None, :]
    vote = kept - cfg.alpha * torch.where(has_d, distant, torch.zeros_like(distant))
    return vote.mean(dim=(1, 2))  # [Lq, wf]


class ImportanceAccumulator:
    """Running sums of the votes, position by position; feed it layer by layer, chunk by chunk.

    Each (layer, query) pair votes once for each candidate in (q - w_f, q); the score is the mean
    vote. Positions nobody voted for yet read as -inf.
    """

    def __init__(self, cfg: DynSplitConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.sums = torch.zeros(0, dtype=torch.float64, device=device)
        self.counts = torch.zeros(0, dtype=torch.float64, device=device)

    def _grow(self, n: int) -> None:
        if n > self.sums.numel():
            pad = n - self.sums.numel()
            self.sums = torch.cat([self.sums, self.sums.new_zeros(pad)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(pad)])

    def add_layer(self, q, k, q_start: int = 0, scale=None, lse=None) -> None:
        """Votes of one layer's queries at [q_start, q_start + len(q)); k holds keys 0..end."""
        votes = layer_votes(q, k, q_start, self.cfg, scale=scale, lse=lse).double()
        self.add_votes(votes, q_start)

    def add_votes(self, votes: torch.Tensor, q_start: int) -> None:
        lq, wf = votes.shape
        self._grow(q_start + lq)
        for j in range(wf):
            # Column j votes for position q - j - 1.
            lo = max(0, j + 1 - q_start)  # first row whose candidate is >= 0
            if lo >= lq:
                continue
            dst0 = q_start + lo - j - 1
            n = lq - lo
            self.sums[dst0:dst0 + n] += votes[lo:, j]
            self.counts[dst0:dst0 + n] += 1

    def scores(self, length: int | None = None) -> torch.Tensor:
        n = self.sums.numel() if length is None else length
        self._grow(n)
        s, c = self.sums[:n], self.counts[:n]
        out = torch.full_like(s, float("-inf"))
        voted = c > 0
        out[voted] = s[voted] / c[voted]
        return out.float()


def importance_scores(layers_qk, cfg: DynSplitConfig, scale: float | None = None) -> torch.Tensor:
    """Convenience for a whole prompt: layers_qk is an iterable of (q [L,Hq,D], k [L,Hkv,D])."""
    acc = None
    length = 0
    for q, k in layers_qk:
        acc = acc or ImportanceAccumulator(cfg, device=q.device)
        acc.add_layer(q, k, 0, scale=scale)
        length = q.shape[0]
    if acc is None:
        return torch.zeros(0)
    return acc.scores(length)
