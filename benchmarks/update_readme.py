"""Splice the generated sections into README.md and docs/results.md.

    python benchmarks/update_readme.py            # every section, from the committed results
    python benchmarks/update_readme.py --check    # exit 1 if README.md or docs/results.md is out of date

Each section lives between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``:

* ``performance``, ``kernels``, ``accuracy``, ``memory`` in docs/results.md: the
  ``README-section.md`` that the benchmark's ``report.py`` wrote, so the results show measured
  numbers only, never hand-typed ones. A report writes its links relative to the repository root;
  they are rebased to the file the section lands in, nothing else is changed.
* ``flags`` in README.md: one row per flag the plugin adds to SGLang's parser
  (``dynsplit_sglang.settings.add_arguments``), its default from ``DynSplitConfig`` and its help
  (``flag_help.FIELD_HELP``) cut to its first sentence.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs/results.md"
# name -> (the report it comes from, the file it goes to)
SECTIONS = {
    "performance": (ROOT / "benchmarks/serving/results/README-section.md", RESULTS),
    "kernels": (ROOT / "benchmarks/kernels/results/README-section.md", RESULTS),
    "accuracy": (ROOT / "benchmarks/accuracy/results/README-section.md", RESULTS),
    "memory": (ROOT / "benchmarks/memory/results/README-section.md", RESULTS),
}
ROW_WIDTH = 118  # a flags-table row aims at this many characters; its help is cut to fit
MIN_HELP = 80  # ... but keeps at least this many where a sentence is longer


def splice(text: str, name: str, body: str, where: Path = README) -> str:
    pattern = re.compile(rf"(<!-- BEGIN generated:{name} -->\n).*?(<!-- END generated:{name} -->)",
                         re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where.relative_to(ROOT)} has no markers for section {name!r}")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def rebase_links(body: str, dest: Path) -> str:
    """Markdown link targets written relative to the repository root, made relative to ``dest``'s
    folder (URLs, anchors and absolute paths are left alone)."""
    base = dest.parent

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|#|/", target):
            return m.group(0)
        path, sep, anchor = target.partition("#")
        rel = Path(os.path.relpath(ROOT / path, base)).as_posix()
        return m.group(1) + rel + sep + anchor + m.group(3)

    return re.sub(r"(\]\()([^)\s]+)(\))", fix, body)


# -- the flags table ------------------------------------------------------------------------------


def _depths(text: str) -> list[int]:
    """Bracket depth at each character (an opening bracket counts inside its group)."""
    depth, out = 0, []
    for ch in text:
        depth += ch in "([{"
        out.append(depth)
        depth = max(0, depth - (ch in ")]}"))
    return out


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    d = _depths(text)
    for m in re.finditer(r"\.\s+(?=[\w|`-])", text):
        i = m.start()
        if d[i] == 0 and text[max(0, i - 3):i] not in ("e.g", "i.e"):
            return text[:i + 1]
    return text


def _drop_asides(text: str) -> str:
    """Top-level parentheticals removed; intervals such as (0, 1] kept."""
    out, depth = "", 0
    for i, ch in enumerate(text):
        if depth == 0 and ch == "(" and not re.match(r"\(\s*[-\d]", text[i:]):
            out, depth = out.rstrip(" "), 1
        elif depth:
            depth += (ch == "(") - (ch == ")")
        else:
            out += ch
    return out


def _cut(text: str, limit: int) -> str:
    """Cut at the last clause boundary within ``limit`` (else the first one past it), marked."""
    d = _depths(text)
    strong = [m.start() for m in re.finditer(r"[;:] | \(", text) if d[m.start()] == 0]
    weak = [m.start() for m in re.finditer(r", ", text) if d[m.start()] == 0]
    for cuts in (strong, weak):
        fit = [c for c in cuts if 30 <= c <= limit]
        if fit:
            return text[:max(fit)].rstrip(" ,;:") + " …"
    later = sorted(c for c in strong + weak if c > limit)
    return text[:later[0]].rstrip(" ,;:") + " …" if later else text


def short_help(text: str, limit: int) -> str:
    """The help's first sentence; past ``limit`` characters without its asides, then cut at a
    clause boundary (marked …)."""
    s = first_sentence(text)
    if len(s) > limit:
        s = _drop_asides(s)
    if len(s) > limit:
        s = _cut(s, limit)
    return s


def flag_rows() -> list[tuple[str, str, str, str]]:
    """(flag, choices, default, help) for every flag ``settings.add_arguments`` adds."""
    from dynsplit_sglang.core import DynSplitConfig
    from dynsplit_sglang.settings import Settings, as_fields, flag_parser

    defaults = DynSplitConfig()
    rows = []
    for action in flag_parser()._actions:
        if not action.option_strings:
            continue
        ((field, _),) = as_fields({action.dest: None}).items()
        if field == "kv_compression":
            default = Settings().method
        elif field == "dynsplit_config":
            default = None
        else:
            default = getattr(defaults, field)
        shown = "off" if default is False else "—" if default is None else f"`{default}`"
        choices = "{" + ",".join(action.choices) + "}" if action.choices else ""
        rows.append((action.option_strings[0], choices, shown, action.help or ""))
    return rows


def flags_table() -> str:
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for flag, choices, default, text in flag_rows():
        prefix = f"| `{flag}{' ' + choices if choices else ''}` | {default} | "
        help_ = short_help(text, max(MIN_HELP, ROW_WIDTH - len(prefix) - 2)).replace("|", r"\|")
        lines.append(f"{prefix}{help_} |")
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------


def updated() -> dict[Path, tuple[str, str]]:
    """Each target file -> (its text now, its text with every section spliced in)."""
    files = {README: README.read_text(), RESULTS: RESULTS.read_text()}
    new = dict(files)
    for name, (src, dest) in SECTIONS.items():
        if src.exists():
            new[dest] = splice(new[dest], name, rebase_links(src.read_text(), dest), dest)
        else:
            print(f"{name}: {src.relative_to(ROOT)} not generated yet; section left as is")
    new[README] = splice(new[README], "flags", flags_table(), README)
    return {path: (files[path], new[path]) for path in files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="only report whether README.md and docs/results.md are current")
    args = ap.parse_args(argv)
    stale = 0
    for path, (old, new) in updated().items():
        rel = path.relative_to(ROOT)
        if args.check:
            print(f"{rel} is current" if new == old else f"{rel} is out of date")
        elif new != old:
            path.write_text(new)
            print(f"{rel} updated")
        else:
            print(f"{rel} already current")
        stale += new != old
    return int(args.check and stale > 0)


if __name__ == "__main__":
    # The package's own strategies only: a strategy registered through the environment (by a
    # user, or by the test session) would add a --kv-compression choice to the table.
    os.environ.pop("DYNSPLIT_STRATEGIES", None)
    sys.exit(main())
