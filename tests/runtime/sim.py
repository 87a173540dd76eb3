"""A simulated KV pool driving the Compressor the way an attention backend does (no SGLang).

q and k of a position depend only on (token, position, layer), so the simulation is causal like a
real model; slots are handed out by a free list like SGLang's allocator.
"""

import math

import torch

from dynsplit_sglang.core import DynSplitConfig
from dynsplit_sglang.runtime.compressor import BatchView, Compressor

VOCAB, LAYERS, HQ, HKV, D = 64, 4, 4, 2, 16


def vocab_masks():
    punct = torch.zeros(VOCAB, dtype=torch.bool)
    punct[:12] = True
    sentence = torch.zeros(VOCAB, dtype=torch.bool)
    sentence[:4] = True
    return {"punct": punct, "sentence": sentence, "all": torch.ones(VOCAB, dtype=torch.bool)}


def _feat(tokens, positions, layer, which, width):
    g = torch.Generator().manual_seed(1000 * layer + (1 if which == "q" else 2))
    emb = torch.randn(VOCAB, width, generator=g)
    pos = torch.randn(4096, width, generator=g) * 0.3
    return emb[tokens] + pos[positions]


class SimPool:
    pass_token_ids = False  # BatchView.token_ids (the cold tier's position keys)

    def __init__(self, cfg: DynSplitConfig, slots=8192, rows=16, max_ctx=2048):
        self.k = [torch.zeros(slots, HKV, D) for _ in range(LAYERS)]
        self.v = [torch.zeros(slots, HKV, D) for _ in range(LAYERS)]
        self.req_to_token = torch.zeros(rows, max_ctx, dtype=torch.int32)
        self.free = list(range(slots - 1, 0, -1))
        self.gen = [0] * rows
        self.comp = Compressor(cfg, LAYERS, HQ, HKV, D, torch.float32, "cpu", slots, rows,
                               max_ctx, self.req_to_token, lambda l: self.k[l], vocab_masks())
        self.scale = 1 / math.sqrt(D)

    def new_row(self, row):
        self.gen[row] += 1

    def alloc(self, n):
        out = self.free[-n:][::-1]
        del self.free[len(self.free) - n:]
        return torch.tensor(out, dtype=torch.int32)

    def _forward(self, rows, tokens_per_row, prefix_lens, decode, final=None, owned=None,
                 known=True):
        """final/owned: BatchView.final/owned_from (an extend's default: each ends its prompt,
        every new token is the request's own); known=False: the SGLang Reqs were not found
        (BatchView.final is None)."""
        ids, locs, seqs = [], [], []
        for row, toks, p in zip(rows, tokens_per_row, prefix_lens):
            new = toks[p:]
            slots = self.alloc(len(new))
            self.req_to_token[row, p:len(toks)] = slots
            ids.append(torch.tensor(new))
            locs.append(slots)
            seqs.append(len(toks))
        if not decode and final is None and known:
            final = [True] * len(rows)
        view = BatchView(rows, [self.gen[r] for r in rows], seqs, list(prefix_lens),
                         torch.cat(ids), torch.cat(locs).long(), decode, final=final,
                         owned_from=owned,
                         token_ids=None if decode or not self.pass_token_ids
                         else [list(t) for t in tokens_per_row])
        self.comp.begin_forward(view)
        outs = []
        for layer in range(LAYERS):
            qs = []
            for row, toks, p in zip(rows, tokens_per_row, prefix_lens):
                pos = torch.arange(p, len(toks))
                t = torch.tensor(toks[p:])
                slots = self.req_to_token[row, p:len(toks)].long()
                self.k[layer][slots] = _feat(t, pos, layer, "k", HKV * D).view(-1, HKV, D)
                self.v[layer][slots] = _feat(t, pos, layer, "v", HKV * D).view(-1, HKV, D)
                qs.append(_feat(t, pos, layer, "q", HQ * D).view(-1, HQ, D))
            q = torch.cat(qs)
            if decode:
                outs.append(self.comp.decode_layer(layer, q, self.k[layer], self.v[layer],
                                                   self.scale))
            else:
                self.comp.extend_layer(layer, q, self.k[layer], self.scale)
        if not decode:
            self.comp.end_extend()
        return outs

    def prefill(self, row, tokens, shared_len=0, shared_slots=None):
        if shared_len:
            self.req_to_token[row, :shared_len] = shared_slots[:shared_len]
        return self._forward([row], [tokens], [shared_len], decode=False)

    def decode(self, rows, seqs):
        """One decode step; seqs[i] already holds the new token at its end."""
        return self._forward(rows, seqs, [len(s) - 1 for s in seqs], decode=True)

    def blocks(self, row):
        n = self.comp.rows[row].nblocks
        st = self.comp.store
        return list(zip(st.row_start[row, :n].tolist(), st.row_len[row, :n].tolist()))
