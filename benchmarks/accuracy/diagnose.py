"""Why a compressed method misses the needle: where the answer fell, and whether each head got it.

For one sample of the accuracy suite (tasks.py) and one method (strategy, budget, block score),
runs the pure-core evaluation (core_eval: the prefill, segmentation and decode the parity test
holds the SGLang server to) with its trace hook, and records at every decode step, compressed
layer and KV head, for each expected answer (every occurrence of its string in the prompt):

* the blocks holding the answer's tokens: their scores, their rank in the step's score order
  (among the selectable blocks, as ``core.select`` sorts them), whether they were kept, and the
  tokens of the blocks ranked above them; ``need`` is the smallest block budget that would have
  kept a whole occurrence, against ``block_budget`` (the budget less sink and recent window);
* the head's dense attention mass on the answer tokens (softmax of q·k over every key of that
  step, mean over the KV head's query heads), ``mass_kept`` the part on tokens it did attend,
  and ``oracle_rank``: the best answer block's rank if blocks were ordered by dense mass;
* the first blocks of the score order (score, length, dense mass).

Outputs: a markdown report (block boundaries around the answers, a step x layer selection grid,
the blocks that beat the answer where a head wanted it, output vs full KV with a repetition
flag), a JSON of the records and a heatmap PNG. With several samples, an aggregate table per
method on the same samples: the mass-weighted fraction of the answer attended (the number that
explains accuracy), ranks, how often the answer is cut across blocks and what keeping it costs.

    python benchmarks/accuracy/diagnose.py --task niah_single --context 2048 --index 0 \\
        --method dynsplit fixed --score gauss bound --budget 0.125 --out /tmp/diag
    python benchmarks/accuracy/diagnose.py --samples 6 --method dynsplit fixed --score gauss bound
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import core_eval  # noqa: E402
from repetition import repetition  # noqa: E402
import tasks as T  # noqa: E402

from dynsplit_sglang.core import DynSplitConfig  # noqa: E402

TOP = 5  # blocks of the score order kept per record
WANT = 0.05  # dense answer mass from which a head counts as wanting the needle (highlighted)
SHOWN = 4  # records detailed in the report's "blocks that beat the answer"
CONTEXT_TOKENS = 12  # tokens shown either side of an answer occurrence
INF = float("inf")


# -- answers in the prompt --------------------------------------------------------------------


def token_pieces(tokenizer, ids) -> list[str]:
    return tokenizer.batch_decode([[int(i)] for i in ids])


def locate(pieces: list[str], answer: str, limit: int) -> list[list[int]]:
    """Token indices of every occurrence of `answer` (case-insensitive) in the text the pieces
    make, keeping the occurrences that end before token `limit`."""
    starts = list(itertools.accumulate((len(p) for p in pieces), initial=0))
    text, want = "".join(pieces).lower(), answer.lower()
    found, at = [], text.find(want)
    while at >= 0 and want:
        first = bisect.bisect_right(starts, at) - 1
        last = bisect.bisect_right(starts, at + len(want) - 1) - 1
        if last < limit:
            found.append(list(range(first, last + 1)))
        at = text.find(want, at + 1)
    return found


def block_ids(starts: list[int], lens: list[int]) -> torch.Tensor:
    """The block of every position of the split prompt (blocks tile it)."""
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))


# -- tracing ------------------------------------------------------------------------------------


class Tracer:
    """core_eval's trace callback: turns each (step, layer) into per-(KV head, answer) records."""

    def __init__(self, starts, lens, prompt_len: int, occurrences: list, raw: bool = False):
        self.nb = len(starts)
        self.block_of = block_ids(starts, lens)
        self.prompt_len = prompt_len
        of = self.block_of.tolist()
        # Per answer: its blocks, its tokens (every occurrence), each occurrence's tokens/blocks.
        self.answers = [(sorted({of[t] for o in occ for t in o}),
                         torch.tensor(sorted({t for o in occ for t in o}), dtype=torch.long),
                         [torch.tensor(o) for o in occ], [sorted({of[t] for t in o}) for o in occ])
                        for occ in occurrences]
        self.records, self.plans = [], {}
        self.raw = {} if raw else None

    def __call__(self, step, layer, q, k, scale, scores, kept, plan):
        nb, hkv = self.nb, scores.shape[0]
        scores, kept = scores[:, :nb].float(), kept[:, :nb]
        clip = plan.clip_len[0, :nb]
        sink, r0, budget = plan.sink, int(plan.recent_start[0]), int(plan.block_budget[0])
        ok = (clip > 0)[None] & torch.isfinite(scores)
        order = torch.sort(scores.masked_fill(~ok, -INF), dim=-1, descending=True,
                           stable=True).indices  # as core.select orders them
        rank = _ranks(order)
        len_sorted = torch.gather(clip.expand(hkv, nb), 1, order) * torch.gather(ok, 1, order)
        above = torch.empty_like(len_sorted).scatter_(1, order, len_sorted.cumsum(1) - len_sorted)
        hq, d = q.shape
        prob = (torch.einsum("hgd,thd->hgt", q.float().view(hkv, hq // hkv, d), k.float())
                * scale).softmax(-1)  # [Hkv, G, T]: the head's dense attention at this step
        bmass = prob.new_zeros(prob.shape[:2] + (nb,)).index_add_(
            2, self.block_of, prob[..., :self.block_of.numel()]).mean(1)  # [Hkv, NB]
        orank = _ranks(torch.sort(bmass.masked_fill(~ok, -INF), dim=-1, descending=True,
                                  stable=True).indices)
        pos = torch.arange(self.prompt_len)
        att = ((pos < sink) | (pos >= r0))[None].expand(hkv, -1).clone()
        if nb:
            att |= kept[:, self.block_of]  # attended prompt positions of each head
        self.plans[step] = dict(seq=int(plan.seq_lens[0]), sink=sink, recent_start=r0,
                                block_budget=budget)
        if self.raw is not None:
            self.plans[step]["clip_len"] = clip.tolist()
            self.raw[f"{step}/{layer}"] = dict(
                scores=[[s if math.isfinite(s) else None for s in row] for row in scores.tolist()],
                kept=kept.tolist())
        L = dict(rank=rank.tolist(), ok=ok.tolist(), above=above.tolist(), orank=orank.tolist(),
                 scores=scores.tolist(), kept=kept.tolist(), clip=clip.tolist(),
                 bmass=bmass.tolist(), order=order[:, :TOP].tolist(), budget=budget)
        for a, (blocks, union, occ, occ_blocks) in enumerate(self.answers):
            p = prob[:, :, union]  # [Hkv, G, U]
            m, mk = p.sum(-1), (p * att[:, None, union]).sum(-1)
            whole = torch.stack([att[:, o].all(1) for o in occ]).any(0) if occ else \
                torch.ones(hkv, dtype=torch.bool)
            per_head = dict(mass=m.mean(1).tolist(), mass_max=m.amax(1).tolist(),
                            mass_kept=mk.mean(1).tolist(), whole=whole.tolist(),
                            attended=att[:, union].float().mean(1).tolist() if len(union)
                            else [1.0] * hkv)
            for h in range(hkv):
                self.records.append(self._record(step, layer, h, a, blocks, occ_blocks, L,
                                                 {key: v[h] for key, v in per_head.items()}))

    @staticmethod
    def _record(step, layer, h, a, blocks, occ_blocks, L, head) -> dict:
        ok, rank, above = L["ok"][h], L["rank"][h], L["above"][h]
        sel = [j for j in blocks if ok[j]]
        # The block budget that keeps an occurrence: its worst-ranked block's cost plus length;
        # None where a block of every occurrence is out of the race (refine: not a candidate).
        reach = [b for b in occ_blocks if all(ok[j] or L["clip"][j] == 0 for j in b)]
        need = min((max([above[j] + L["clip"][j] for j in b if ok[j]], default=0)
                    for b in reach), default=None if occ_blocks else 0)
        return dict(
            step=step, layer=layer, head=h, answer=a, blocks=blocks,
            ranks=[rank[j] if ok[j] else None for j in blocks],
            scores=[L["scores"][h][j] for j in blocks], kept=[L["kept"][h][j] for j in blocks],
            block_mass=[L["bmass"][h][j] for j in blocks],
            cost_above=[above[j] if ok[j] else None for j in blocks],
            best_rank=min((rank[j] for j in sel), default=None),
            worst_rank=max((rank[j] for j in sel), default=None),
            oracle_rank=min((L["orank"][h][j] for j in sel), default=None),
            selectable=sum(ok), need=need, block_budget=L["budget"], **head,
            top=[[j, L["scores"][h][j], L["clip"][j], L["kept"][h][j], L["bmass"][h][j]]
                 for j in L["order"][h] if ok[j]])


def _ranks(order: torch.Tensor) -> torch.Tensor:
    ar = torch.arange(order.shape[-1]).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


# -- running ------------------------------------------------------------------------------------


def votes_key(cfg: DynSplitConfig):
    """What a prefill's importance votes depend on (None: the strategy reads none)."""
    if not cfg.strategy_impl.needs_votes:
        return None
    return (cfg.alpha, cfg.future_window, cfg.score_layers, cfg.sink)


class Prefills:
    """Dense prefills of one prompt shared by every method (a prefill that votes serves the
    methods that read no vote too: its cache and logits are the plain prefill's)."""

    def __init__(self, model, ids, cfgs=()):
        self.model, self.ids, self.done = model, ids, {}
        self.voting = next((c for c in cfgs if votes_key(c) is not None), None)

    def get(self, cfg: DynSplitConfig):
        if votes_key(cfg) is None and self.voting is not None:
            cfg = self.voting
        key = votes_key(cfg)
        if key not in self.done:
            self.done[key] = core_eval.prefill(self.model, self.ids, cfg if key else None)
        return self.done[key]


def diagnose(model, tok, sample: T.Sample, cfg: DynSplitConfig, first_token: str = "dense",
             max_new_tokens: int | None = None, prefilled=None, full_ids=None,
             raw: bool = False) -> dict:
    """Run one method on one sample under the trace; returns the JSON-able result."""
    ids = list(sample.input_ids)
    max_new = max_new_tokens or sample.max_new_tokens
    prefilled = prefilled or core_eval.prefill(model, ids, cfg)
    closed = len(ids) - (first_token == "compressed")
    scores = prefilled[2]
    seg = core_eval.segmentation(tok, ids[:closed], cfg, None if scores is None else scores[:closed])
    nb = int(seg.ends.numel())
    ends = seg.ends.tolist()
    starts = [0] + [e + 1 for e in ends[:-1]] if nb else []
    lens = [e - s + 1 for s, e in zip(starts, ends)]
    pieces = token_pieces(tok, ids)
    occurrences = [locate(pieces, a, closed) for a in sample.answers]
    tracer = Tracer(starts, lens, closed, occurrences, raw)
    out = core_eval.generate(model, tok, ids, cfg, max_new, prefilled, first_token, trace=tracer)
    if (out["block_starts"], out["block_lens"]) != (starts, lens):
        raise RuntimeError("diagnose: core_eval split the prompt differently")
    if full_ids is None:
        full_ids = core_eval.generate(model, tok, ids, cfg.replace(budget_fraction=1.0), max_new,
                                      prefilled, first_token)["output_ids"]
    text, full = tok.decode(out["output_ids"]), tok.decode(full_ids)
    answers = []
    for a, occ, traced in zip(sample.answers, occurrences, tracer.answers):
        per = traced[3]
        cost = [sum(lens[j] for j in b) for b in per]
        best = min(range(len(occ)), key=lambda i: cost[i]) if occ else None
        answers.append(dict(text=a, occurrences=occ, blocks=per, cost=cost,
                            cut=best is not None and len(per[best]) > 1,
                            min_cost=cost[best] if occ else None))
    return dict(
        sample=dict(id=sample.id, task=sample.task, context_len=sample.context_len,
                    answers=sample.answers, needle_pos=sample.needle_pos, depths=sample.depths),
        method=method_label(cfg), config=cfg.to_dict(), first_token=first_token,
        prompt_len=closed, budget=cfg.token_budget(len(ids)), block_starts=starts,
        block_lens=lens, answers=answers, output_ids=out["output_ids"], output=text,
        full_ids=list(full_ids), full_output=full, score=T.score(text, sample.answers),
        full_score=T.score(full, sample.answers),
        repetition=repetition(token_pieces(tok, out["output_ids"])),
        full_repetition=repetition(token_pieces(tok, full_ids)),
        tokens_attended=out["tokens_attended"], plans=tracer.plans, records=tracer.records,
        raw=tracer.raw, pieces=pieces)


def method_label(cfg: DynSplitConfig) -> str:
    b = cfg.budget_fraction if cfg.budget is None else cfg.budget
    return f"{cfg.strategy}-{cfg.score}-{b:g}"


def method_cfg(strategy: str, budget: str, score: str, overrides: dict | None = None):
    b = float(budget)
    size = {"budget_fraction": b} if b <= 1 else {"budget": int(b)}
    return DynSplitConfig().replace(strategy=strategy, score=score, **size, **(overrides or {}))


# -- aggregate ----------------------------------------------------------------------------------


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate(results: list[dict]) -> dict:
    """Per-method numbers over the results (every sample, step, layer, head and answer)."""
    recs = [r for res in results for r in res["records"]]
    mass = sum(r["mass"] for r in recs)
    answers = [a for res in results for a in res["answers"] if a["occurrences"]]
    return dict(
        samples=len(results), score=_mean([r["score"] for r in results]),
        full_score=_mean([r["full_score"] for r in results]),
        kept_mass=sum(r["mass_kept"] for r in recs) / mass if mass else float("nan"),
        whole_mass=sum(r["mass"] * r["whole"] for r in recs) / mass if mass else float("nan"),
        whole=_mean([float(r["whole"]) for r in recs]),
        rank=_mean([r["best_rank"] for r in recs]), oracle_rank=_mean([r["oracle_rank"] for r in recs]),
        cut=_mean([float(a["cut"]) for a in answers]), cost=_mean([a["min_cost"] for a in answers]),
        need=_mean([r["need"] for r in recs]), block_budget=_mean([r["block_budget"] for r in recs]),
        degenerate=sum(r["repetition"] is not None for r in results), records=len(recs))


AGG_COLUMNS = (("samples", "n", "{:d}"), ("score", "acc", "{:.2f}"), ("full_score", "full", "{:.2f}"),
               ("kept_mass", "mass kept", "{:.3f}"), ("whole_mass", "mass-w whole", "{:.3f}"),
               ("whole", "whole kept", "{:.3f}"), ("rank", "rank", "{:.1f}"),
               ("oracle_rank", "oracle rank", "{:.1f}"), ("cut", "cut", "{:.2f}"),
               ("cost", "answer blk tok", "{:.1f}"), ("need", "need", "{:.0f}"),
               ("block_budget", "blk budget", "{:.0f}"), ("degenerate", "degen", "{:d}"))


def render_aggregate(by_method: dict[str, dict]) -> str:
    head = "| method | " + " | ".join(c[1] for c in AGG_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(AGG_COLUMNS) + 1)]
    for m, agg in by_method.items():
        lines.append(f"| {m} | " + " | ".join(f.format(agg[k]) for k, _, f in AGG_COLUMNS) + " |")
    return "\n".join(lines + [
        "", "mass kept: Σ dense mass on attended answer tokens / Σ dense answer mass over (sample, "
        "step, layer, head); mass-w whole: the same weights on 'a whole occurrence attended'; "
        "rank/oracle rank: best answer block by score / by dense block mass (0 = first); cut: "
        "answers split over several blocks; need: block budget that would keep the answer."])


# -- markdown report ----------------------------------------------------------------------------


def _clean(s: str) -> str:
    return s.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")


def boundaries(result: dict, tokens: list[int], around: int = CONTEXT_TOKENS) -> str:
    """The prompt around `tokens`, ⟦ at each block start and ⟧ at each block end."""
    pieces, starts, lens = result["pieces"], result["block_starts"], result["block_lens"]
    first, last = max(0, tokens[0] - around), min(result["prompt_len"], tokens[-1] + around + 1)
    opens, closes = set(starts), {s + n - 1 for s, n in zip(starts, lens)}
    out = "…" if first > 0 else ""
    for t in range(first, last):
        out += ("⟦" if t in opens else "") + _clean(pieces[t]) + ("⟧" if t in closes else "")
    return out + ("…" if last < result["prompt_len"] else "")


def _snippet(result, j, width=48) -> str:
    s, n = result["block_starts"][j], result["block_lens"][j]
    text = _clean("".join(result["pieces"][s:s + n]))
    return text if len(text) <= width else text[:width - 1] + "…"


def _cell(r) -> str:
    mark = "✓" if r["whole"] else ("◐" if r["attended"] > 0 else "✗")
    s = f"{mark}{'' if r['best_rank'] is None else r['best_rank']}"
    if r["mass"] >= WANT:
        s = f"{s}·{r['mass']:.2f}"
        s = s if r["whole"] else f"**{s}**"
    return s


def render(result: dict, tok) -> str:
    recs = result["records"]
    steps = sorted(result["plans"], key=int)
    layers = sorted({r["layer"] for r in recs})
    off = result["first_token"] == "dense"  # step s then produces output token s + 1
    L = [f"# {result['sample']['id']} — {result['method']}", "",
         f"context {result['sample']['context_len']} tokens, budget {result['budget']} tokens per "
         f"KV head, first token {result['first_token']}, {len(result['block_lens'])} blocks, "
         f"needle depths {result['sample']['depths']}", "",
         "## Output", "",
         f"* expected: {result['sample']['answers']}",
         f"* compressed: `{_clean(result['output'])}` (score {result['score']:.2f})"
         + (f" — **degenerate repetition** of `{_clean(result['repetition']['unit'])}`"
            if result["repetition"] else ""),
         f"* full KV: `{_clean(result['full_output'])}` (score {result['full_score']:.2f})"
         + (" — degenerate repetition" if result["full_repetition"] else ""), "",
         "## Block boundaries around the answer", ""]
    for a in result["answers"]:
        if not a["occurrences"]:
            L.append(f"* `{a['text']}`: not in the split prompt")
        for occ, blocks, cost in zip(a["occurrences"], a["blocks"], a["cost"]):
            lens = [result["block_lens"][j] for j in blocks]
            L += [f"* `{a['text']}` at tokens {occ[0]}–{occ[-1]}: blocks {blocks} of lengths "
                  f"{lens}; keeping it whole costs {cost} tokens" + (" (cut)" if len(blocks) > 1
                                                                     else ""),
                  f"  `{boundaries(result, occ)}`"]
    L += ["", "## Selection per step", "",
          "Cell per KV head: ✓ answer attended whole, ◐ partly, ✗ not; then the best answer "
          f"block's rank; ·mass where the head's dense mass on the answer is ≥ {WANT} (bold "
          "when it did not get it).", "",
          "| step | token | full KV | mass kept | whole kept | mean rank | wanted, dropped |",
          "|---|---|---|---|---|---|---|"]
    out, full = result["output_ids"], result["full_ids"]
    for s in steps:
        rs = [r for r in recs if r["step"] == int(s)]
        i = int(s) + off
        m = sum(r["mass"] for r in rs)
        L.append(f"| {s} | `{_clean(tok.decode(out[i:i + 1]))}` | "
                 f"`{_clean(tok.decode(full[i:i + 1]))}` | "
                 f"{sum(r['mass_kept'] for r in rs) / m if m else float('nan'):.3f} | "
                 f"{_mean([float(r['whole']) for r in rs]):.2f} | "
                 f"{_mean([r['best_rank'] for r in rs]):.1f} | "
                 f"{sum(r['mass'] >= WANT and not r['whole'] for r in rs)} |")
    for a, ans in enumerate(result["answers"]):
        L += ["", f"`{ans['text']}`, layer × step:", "",
              "| layer | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
        cells = {(r["layer"], r["step"]): [] for r in recs}
        for r in recs:
            if r["answer"] == a:
                cells[(r["layer"], r["step"])].append(_cell(r))
        for ly in layers:
            L.append(f"| {ly} | " + " | ".join(" ".join(cells.get((ly, int(s)), []))
                                                for s in steps) + " |")
    L += ["", "## Blocks that beat the answer", ""]
    missed = sorted((r for r in recs if not r["whole"]), key=lambda r: -r["mass"])
    shown = (missed or sorted(recs, key=lambda r: -r["mass"]))[:SHOWN]
    if not missed:
        L.append("(every head attended the answer at every step; the heads that want it most:)")
    for r in shown:
        L += [f"### step {r['step']}, layer {r['layer']}, head {r['head']}, "
              f"`{result['answers'][r['answer']]['text']}`", "",
              f"dense mass on the answer {r['mass']:.3f} (max over query heads "
              f"{r['mass_max']:.3f}), attended {r['mass_kept']:.3f}; best rank {r['best_rank']} "
              f"of {r['selectable']} (oracle {r['oracle_rank']}); need {r['need']} vs block budget "
              f"{r['block_budget']}", "",
              "| rank | block | len | score | dense mass | kept | text |", "|---|---|---|---|---|---|---|"]
        for i, (j, sc, n, kept, bm) in enumerate(r["top"]):
            L.append(f"| {i} | {j} | {n} | {sc:.2f} | {bm:.3f} | {'✓' if kept else ''} | "
                     f"`{_snippet(result, j)}` |")
        for j, rk, sc, kept, bm in zip(r["blocks"], r["ranks"], r["scores"], r["kept"],
                                       r["block_mass"]):
            L.append(f"| {rk if rk is not None else 'window'} | **{j}** (answer) | "
                     f"{result['block_lens'][j]} | {sc:.2f} | {bm:.3f} | {'✓' if kept else ''} | "
                     f"`{_snippet(result, j)}` |")
        L.append("")
    return "\n".join(L)


def plot(result: dict, path: Path) -> None:
    """Heatmap per (answer, KV head): layer x step, blue = attended whole, red = not, intensity
    sqrt(dense mass on the answer); dropped cells carry the best answer block's rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = result["records"]
    steps = sorted(int(s) for s in result["plans"])
    layers = sorted({r["layer"] for r in recs})
    na = min(4, len(result["answers"]))
    heads = 1 + max((r["head"] for r in recs), default=0)
    fig, axes = plt.subplots(na, heads, squeeze=False, figsize=(
        1.2 + heads * (0.8 + 0.3 * len(steps)), 1 + na * (0.6 + 0.16 * len(layers))))
    vmax = max([math.sqrt(r["mass"]) for r in recs] + [0.2])
    for a, h in itertools.product(range(na), range(heads)):
        ax, grid = axes[a][h], np.full((len(layers), len(steps)), np.nan)
        for r in recs:
            if r["answer"] == a and r["head"] == h:
                y, x = layers.index(r["layer"]), steps.index(r["step"])
                grid[y, x] = math.sqrt(r["mass"]) * (1 if r["whole"] else -1)
                if not r["whole"] and r["best_rank"] is not None:
                    ax.text(x, y, str(r["best_rank"]), ha="center", va="center", fontsize=5)
        im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_xticks(range(len(steps)), steps, fontsize=6)
        ax.set_yticks(range(len(layers)), layers, fontsize=5)
        ax.set_title(f"{result['answers'][a]['text']} · KV head {h}", fontsize=7)
        ax.set_xlabel("decode step", fontsize=6)
        if h == 0:
            ax.set_ylabel("layer", fontsize=6)
    fig.colorbar(im, ax=axes, shrink=0.6).set_label("±√(dense answer mass): + kept, − dropped",
                                                    fontsize=6)
    fig.suptitle(f"{result['sample']['id']} {result['method']}: {result['output']!r} "
                 f"(score {result['score']:.2f}, full KV {result['full_score']:.2f})", fontsize=7)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def save(result: dict, tok, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['sample']['id']}-{result['method']}"
    Path(f"{stem}.md").write_text(render(result, tok) + "\n")
    Path(f"{stem}.json").write_text(json.dumps(
        {k: v for k, v in result.items() if k != "pieces" and v is not None}))
    plot(result, Path(f"{stem}.png"))
    return stem


# -- CLI ----------------------------------------------------------------------------------------


def load_model(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynsplit_sglang.models import ensure, model_path

    path = Path(name)
    if not path.exists():
        path = ensure(name) if name in ("smollm2-135m-instruct", "tiny-llama") else model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def pick(n_total: int, samples: int) -> list[int]:
    """`samples` indices spread over the suite's n (depths are stratified by index)."""
    return sorted({min(n_total - 1, (2 * i + 1) * n_total // (2 * samples)) for i in range(samples)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", nargs="+", default=["niah_single"], choices=T.TASKS)
    ap.add_argument("--context", nargs="+", type=int, default=[2048])
    ap.add_argument("--index", nargs="+", type=int, default=[0], help="sample indices")
    ap.add_argument("--samples", type=int, help="aggregate over N samples spread over the suite")
    ap.add_argument("--suite-n", type=int, default=20, help="samples per cell in the suite")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", nargs="+", default=["dynsplit"], help="strategies")
    ap.add_argument("--budget", nargs="+", default=["0.125"], help="fractions (<= 1) or tokens")
    ap.add_argument("--score", nargs="+", default=["gauss"], choices=["gauss", "bound"])
    ap.add_argument("--first-token", default="dense", choices=["compressed", "dense"])
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                    help="other config fields, e.g. dense_layers=1")
    ap.add_argument("--out", type=Path, help="write <sample>-<method>.md/.json/.png here")
    ap.add_argument("--raw", action="store_true", help="also keep every score and kept flag")
    args = ap.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfgs = [method_cfg(m, b, s, overrides)
            for m, b, s in itertools.product(args.method, args.budget, args.score)]
    model, tok = load_model(args.model)
    indices = pick(args.suite_n, args.samples) if args.samples else args.index
    results: dict[str, list] = {method_label(c): [] for c in cfgs}
    single = len(args.task) * len(args.context) * len(indices) == 1
    for task, ctx in itertools.product(args.task, args.context):
        batch = T.generate(task, tok, ctx, max(args.suite_n, max(indices) + 1), args.seed)
        for i in indices:
            s = batch[i]
            pre, full = Prefills(model, s.input_ids, cfgs), None
            for cfg in cfgs:
                r = diagnose(model, tok, s, cfg, args.first_token, args.max_new_tokens,
                             pre.get(cfg), full, args.raw)
                full = r["full_ids"]
                results[r["method"]].append(r)
                if single:
                    print(render(r, tok) + "\n")
                if args.out:
                    print(f"wrote {save(r, tok, args.out)}.{{md,json,png}}", file=sys.stderr)
                del r["pieces"], r["raw"]  # keep only what aggregate reads
            print(f"{s.id}: " + ", ".join(f"{m} {v[-1]['score']:.0f}" for m, v in results.items()),
                  file=sys.stderr)
    if not single:
        table = render_aggregate({m: aggregate(v) for m, v in results.items()})
        print(table)
        if args.out:
            (args.out / "aggregate.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
