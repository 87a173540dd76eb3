"""The DynSplit backend's decode-graph methods, driven as SGLang 0.5.23's DecodeCudaGraphRunner
drives them, on SGLang's own KV pool, request pool and allocator (CPU, no server):
``init_cuda_graph_state(max_bs, max_num_tokens)``, then ``init_forward_metadata_out_graph(fb,
in_capture=True)`` and the captured forward of every layer, then per replay the view SGLang's
``build_replay_fb_view`` builds, ``init_forward_metadata_out_graph(view)`` and the replay.
GraphTape stands in for the CUDA graph. The same steps on a second backend, eagerly
(``init_forward_metadata`` + ``forward_decode``), give the reference outputs."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from dynsplit_sglang.runtime.compressor import BatchView
from dynsplit_sglang.settings import Settings

from .graph_tape import GraphTape

HQ, HKV, D, LAYERS, SLOTS, ROWS, CTX = 4, 2, 16, 2, 2048, 4, 512
MAX_BS = 4
SETTINGS = Settings.from_mapping({
    "kv_compression": "dynsplit", "budget": 48, "recent": 8, "sink": 4, "dense_layers": 0,
    "block_size": 8, "tolerance": 2, "future_window": 4, "score_layers": 0})


@pytest.fixture(scope="module")
def sglang():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

    from dynsplit_sglang.runtime.backends import backend_class

    DynSplitTorchNativeBackend = backend_class("torch_native")
    return SimpleNamespace(**locals())


@pytest.fixture
def backends(sglang, monkeypatch, tiny_model_path):
    monkeypatch.setenv("DYNSPLIT_KERNELS", "twin")  # Triton on a GPU; the core twins here
    # torch_native has no graph state of its own (SGLang never captures it); the parent's part
    # of init_cuda_graph_state is SGLang's, not under test.
    monkeypatch.setattr(sglang.TorchNativeAttnBackend, "init_cuda_graph_state",
                        lambda self, max_bs, max_num_tokens: None, raising=False)

    def build():
        rows = sglang.ReqToTokenPool(size=ROWS, max_context_len=CTX, device="cpu",
                                     enable_memory_saver=False)
        kv = sglang.MHATokenToKVPool(SLOTS, page_size=1, dtype=torch.float32, head_num=HKV,
                                     head_dim=D, layer_num=LAYERS, device="cpu",
                                     enable_memory_saver=False)
        alloc = sglang.TokenToKVPoolAllocator(SLOTS, torch.float32, "cpu", kv, need_sort=False)
        runner = SimpleNamespace(
            device="cpu", req_to_token_pool=rows, token_to_kv_pool=kv,
            token_to_kv_pool_allocator=alloc,
            model_config=SimpleNamespace(get_num_attention_heads=lambda tp: HQ,
                                         get_total_num_kv_heads=lambda: HKV),
            server_args=SimpleNamespace(tokenizer_path=str(tiny_model_path), model_path=None,
                                        tp_size=1, enable_metrics=False))
        return sglang.DynSplitTorchNativeBackend(runner, SETTINGS), runner

    return build(), build()


@pytest.fixture(scope="module")
def tiny_model_path():
    from dynsplit_sglang import models

    return models.ensure(models.TINY_MODEL)


LAYER = [SimpleNamespace(layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV,
                         qk_head_dim=D, v_head_dim=D, scaling=1 / math.sqrt(D),
                         is_cross_attention=False, sliding_window_size=-1, k_scale=None,
                         v_scale=None) for i in range(LAYERS)]


def _qkv(token, pos, layer):
    g = torch.Generator().manual_seed(7919 * token + 31 * pos + layer)
    return (torch.randn(1, HQ * D, generator=g), torch.randn(1, HKV, D, generator=g),
            torch.randn(1, HKV, D, generator=g))


def _prefill(backend, runner, row, tokens):
    """A prompt as the extend path leaves it: K/V in the pool, votes, blocks (no SGLang extend
    metadata needed: the compressor is fed directly, as forward_extend feeds it)."""
    rows, kv, alloc = runner.req_to_token_pool, runner.token_to_kv_pool, runner.token_to_kv_pool_allocator
    rows.req_generation[row] += 1
    slots = alloc.alloc(len(tokens))
    rows.req_to_token[row, :len(tokens)] = slots.to(torch.int32)
    comp = backend.compressor
    comp.begin_forward(BatchView([row], [int(rows.req_generation[row])], [len(tokens)], [0],
                                 torch.tensor(tokens), slots.long(), False))
    for layer in range(LAYERS):
        qs, ks, vs = zip(*(_qkv(t, p, layer) for p, t in enumerate(tokens)))
        kv.set_kv_buffer(LAYER[layer], slots, torch.cat(ks), torch.cat(vs))
        comp.extend_layer(layer, torch.cat(qs).view(-1, HQ, D), kv.get_key_buffer(layer),
                          LAYER[layer].scaling)
    comp.end_extend()


def _decode_batch(sglang, runner, rows, seqs):
    """The ForwardBatch fields the decode paths read, for one token per row."""
    alloc = runner.token_to_kv_pool_allocator
    loc = alloc.alloc(len(rows))
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        runner.req_to_token_pool.req_to_token[row, len(seq) - 1] = int(loc[i])
    lens = torch.tensor([len(s) for s in seqs])
    return SimpleNamespace(
        forward_mode=sglang.ForwardMode.DECODE, batch_size=len(rows),
        req_pool_indices=torch.tensor(rows), seq_lens=lens, seq_lens_cpu=lens,
        seq_lens_sum=int(lens.sum()), input_ids=torch.tensor([s[-1] for s in seqs]),
        positions=lens - 1, out_cache_loc=loc, rids=None, encoder_lens=None,
        max_seq_len_host=int(lens.max()), out_cache_loc_virtual=None, kv_loc_plan=None,
        kv_loc_cols=None, max_seq_len_override=None, spec_info=None, lora_ids=None,
        can_run_decode_cuda_graph=True)


def _inputs(fb, seqs, layer):
    q, k, v = zip(*(_qkv(s[-1], len(s) - 1, layer) for s in seqs))
    return torch.cat(q), torch.cat(k), torch.cat(v)


class Runner:
    """The decode runner's part: static input buffers, capture, replay (DecodeInputBuffers and
    DecodeCudaGraphRunner.capture_one_shape / load_batch of SGLang 0.5.23)."""

    def __init__(self, sglang, backend, bs):
        self.sglang, self.backend, self.bs = sglang, backend, bs
        z = torch.zeros(bs, dtype=torch.int64)
        self.buffers = SimpleNamespace(
            input_ids=z.clone(), positions=z.clone(), req_pool_indices=z.clone(),
            seq_lens=torch.ones(bs, dtype=torch.int64), seq_lens_cpu=torch.ones(bs, dtype=torch.int64),
            out_cache_loc=z.clone(), encoder_lens=None, mamba_track_indices=None)
        self.q = [torch.zeros(bs, HQ * D) for _ in range(LAYERS)]
        self.k = [torch.zeros(bs, HKV, D) for _ in range(LAYERS)]
        self.v = [torch.zeros(bs, HKV, D) for _ in range(LAYERS)]
        self.out = [torch.zeros(bs, HQ * D) for _ in range(LAYERS)]
        b = self.buffers
        capture_fb = SimpleNamespace(
            forward_mode=sglang.ForwardMode.DECODE, batch_size=bs,
            req_pool_indices=b.req_pool_indices, seq_lens=b.seq_lens, seq_lens_cpu=b.seq_lens_cpu,
            input_ids=b.input_ids, positions=b.positions, out_cache_loc=b.out_cache_loc,
            encoder_lens=None, spec_info=None, rids=None)  # ForwardBatch.rids: none at capture
        backend.init_cuda_graph_state(MAX_BS, MAX_BS)
        backend.init_forward_metadata_out_graph(capture_fb, in_capture=True)
        self.tape = GraphTape()
        with torch.no_grad(), self.tape:
            for layer in range(LAYERS):
                o = backend.forward_decode(self.q[layer], self.k[layer], self.v[layer],
                                           LAYER[layer], capture_fb)
                self.out[layer].copy_(o)

    def replay(self, fb, seqs):
        raw, b = fb.batch_size, self.buffers
        for name in ("input_ids", "positions", "req_pool_indices", "out_cache_loc"):
            getattr(b, name).zero_()
            getattr(b, name)[:raw].copy_(getattr(fb, name))
        for name in ("seq_lens", "seq_lens_cpu"):
            getattr(b, name).fill_(1)
            getattr(b, name)[:raw].copy_(fb.seq_lens)
        view = self.sglang.build_replay_fb_view(
            forward_batch=fb, buffers=b, bs=self.bs, raw_bs=raw, num_tokens=self.bs,
            global_num_tokens_cpu=None, seq_len_fill_value=1,
            capture_forward_mode=self.sglang.ForwardMode.DECODE, is_encoder_decoder=False)
        assert self.backend.graph_fits(fb)
        self.backend.init_forward_metadata_out_graph(view)
        for layer in range(LAYERS):
            q, k, v = _inputs(fb, seqs, layer)
            for static, x in ((self.q, q), (self.k, k), (self.v, v)):
                static[layer].zero_()
                static[layer][:raw].copy_(x)
        self.tape.replay()
        return [o[:raw].clone() for o in self.out]


def test_captured_decode_equals_eager_decode_through_sglangs_runner_calls(sglang, backends):
    (eager, r_eager), (graphed, r_graph) = backends
    rnd = random.Random(0)
    prompts = {1: [rnd.randrange(1000) for _ in range(40)],  # under the budget: dense
               2: [rnd.randrange(1000) for _ in range(200)],
               3: [rnd.randrange(1000) for _ in range(330)]}
    for backend, runner in backends:
        for row, toks in prompts.items():
            _prefill(backend, runner, row, toks)
    runner = Runner(sglang, graphed, MAX_BS)
    assert runner.tape.violations == []
    seqs = {r: list(t) for r, t in prompts.items()}
    dense_step_tokens = 0  # eager counts attended tokens on sparse steps only; graphs on all
    for step, rows in enumerate([[1, 2, 3], [3, 2], [1], [2, 3, 1]] * 5):
        for r in rows:
            seqs[r].append(rnd.randrange(1000))
        batch = [seqs[r] for r in rows]
        if all(len(b) <= SETTINGS.config.budget for b in batch):
            dense_step_tokens += sum(len(b) for b in batch) * HKV * LAYERS
        fb_e = _decode_batch(sglang, r_eager, rows, batch)
        eager.init_forward_metadata(fb_e)
        want = []
        for layer in range(LAYERS):
            q, k, v = _inputs(fb_e, batch, layer)
            want.append(eager.forward_decode(q, k, v, LAYER[layer], fb_e))
        got = runner.replay(_decode_batch(sglang, r_graph, rows, batch), batch)
        for layer in range(LAYERS):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    # The K/V the captured forward wrote at the replayed out_cache_loc are the eager ones.
    for layer in range(LAYERS):
        for row, seq in seqs.items():
            n = len(seq)
            ke = r_eager.token_to_kv_pool.get_key_buffer(layer)[
                r_eager.req_to_token_pool.req_to_token[row, :n].long()]
            kg = r_graph.token_to_kv_pool.get_key_buffer(layer)[
                r_graph.req_to_token_pool.req_to_token[row, :n].long()]
            torch.testing.assert_close(kg, ke)
    s_e, s_g = eager.compressor.stats, graphed.compressor.stats
    assert s_g["graph_steps"] == 20 and s_g["blocks_built"] == s_e["blocks_built"]
    (g_sum, g_max), (e_sum, e_max) = (graphed.compressor._attended.tolist(),
                                      eager.compressor._attended.tolist())
    assert dense_step_tokens > 0 and g_sum == e_sum + dense_step_tokens and g_max == e_max


def test_an_eager_step_after_capture_takes_the_eager_path(sglang, backends):
    (eager, r_eager), (graphed, r_graph) = backends
    toks = list(range(5, 205))
    for backend, runner in backends:
        _prefill(backend, runner, 1, toks)
    Runner(sglang, graphed, 2)
    seq = toks + [9]
    outs = []
    for backend, runner in backends:
        fb = _decode_batch(sglang, runner, [1], [seq])
        backend.init_forward_metadata(fb)  # e.g. a batch larger than any captured one
        assert backend._graph is None or not backend._graph.active
        q, k, v = _inputs(fb, [seq], 0)
        outs.append(backend.forward_decode(q, k, v, LAYER[0], fb))
    torch.testing.assert_close(outs[0], outs[1])


def test_batches_the_graph_cannot_serve_are_sent_to_the_eager_path(sglang, backends):
    from dynsplit_sglang.patches.graphs import _after_can_run_graph

    (_, _), (graphed, r_graph) = backends
    _prefill(graphed, r_graph, 1, list(range(3, 103)))
    runner = SimpleNamespace(attn_backend=graphed)
    fb = _decode_batch(sglang, r_graph, [1], [list(range(3, 104))])
    assert _after_can_run_graph(True, runner, fb) is True  # no graph state yet: SGLang decides
    graphed.init_cuda_graph_state(MAX_BS, MAX_BS)
    assert _after_can_run_graph(True, runner, fb) is True
    assert _after_can_run_graph(False, runner, fb) is False  # SGLang's own no stands
    graphed.compressor.rows[1].cfg = graphed.compressor.cfg.replace(budget=4096)
    assert _after_can_run_graph(True, runner, fb) is False
    assert graphed.compressor.stats["graph_eager_steps"] == 1
