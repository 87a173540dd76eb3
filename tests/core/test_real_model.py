"""DD-Select on the real default model (SmolLM2-135M-Instruct) over prose mixed with Python."""

import inspect

import pytest
import torch

from dynsplit_sglang.core import DynSplitConfig, segment, segmentation

PROSE = (
    "DynSplit-KV splits the cache at delimiters chosen by an importance score. Rigid splitting "
    "loses accuracy, because semantic boundaries depend on the scenario! Code differs from prose; "
    "models differ too. Which delimiter matters? The score decides.\n\n"
)


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynsplit_sglang.models import DEFAULT_MODEL, ensure

    path = ensure(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model, tok


def test_boundaries_fall_on_delimiters_far_more_often_than_fixed(smollm):
    from dynsplit_sglang.hf_reference import prefill_and_segment

    model, tok = smollm
    text = (PROSE + inspect.getsource(segmentation.segment) + "\n" + PROSE) * 2
    ids = tok(text, return_tensors="pt").input_ids[0][:768]
    cfg = DynSplitConfig(block_size=16, tolerance=4)
    seg, scores, cands = prefill_and_segment(model, tok, ids, cfg)
    assert torch.isfinite(scores[:-1]).all()
    inner = seg.ends[:-1]
    on_delim = cands[inner].float().mean().item()
    fixed = segment(cfg.replace(strategy="fixed", tolerance=0), ids.numel()).ends[:-1]
    fixed_on_delim = cands[fixed].float().mean().item()
    assert on_delim >= 0.85, on_delim
    assert on_delim >= 2.5 * fixed_on_delim, (on_delim, fixed_on_delim)
    assert seg.next_start == ids.numel()


def test_real_prefix_is_split_identically_whatever_follows(smollm):
    from dynsplit_sglang.hf_reference import prefill_and_segment

    model, tok = smollm
    head = tok(PROSE * 3, return_tensors="pt").input_ids[0]
    tail_a = tok(" def f(x):\n    return x + 1\n" * 4, return_tensors="pt").input_ids[0]
    tail_b = tok(" Another sentence, entirely different; yes." * 4, return_tensors="pt").input_ids[0]
    cfg = DynSplitConfig(block_size=12, tolerance=4)
    seg_a, _, _ = prefill_and_segment(model, tok, torch.cat([head, tail_a]), cfg)
    seg_b, _, _ = prefill_and_segment(model, tok, torch.cat([head, tail_b]), cfg)
    settled = head.numel() - cfg.block_size - cfg.tolerance - cfg.future_window
    a = seg_a.ends[seg_a.ends < settled]
    b = seg_b.ends[seg_b.ends < settled]
    assert a.numel() >= 4 and torch.equal(a, b)
