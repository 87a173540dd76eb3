"""Splice the benchmarks' generated README sections into README.md.

    python benchmarks/update_readme.py            # every section, from the committed results
    python benchmarks/update_readme.py --check    # exit 1 if README.md is out of date

Each section lives between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``
and is replaced by the ``README-section.md`` that the benchmark's ``report.py`` wrote: the README
shows measured results only, never hand-typed numbers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "performance": ROOT / "benchmarks/serving/results/README-section.md",
    "kernels": ROOT / "benchmarks/kernels/results/README-section.md",
    "accuracy": ROOT / "benchmarks/accuracy/results/README-section.md",
    "memory": ROOT / "benchmarks/memory/results/README-section.md",
}


def splice(readme: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN generated:{name} -->\n).*?(<!-- END generated:{name} -->)",
                         re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no markers for section {name!r}")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), readme)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether README.md is current")
    args = ap.parse_args(argv)
    readme_path = ROOT / "README.md"
    old = readme_path.read_text()
    new = old
    for name, src in SECTIONS.items():
        if src.exists():
            new = splice(new, name, src.read_text())
        else:
            print(f"{name}: {src.relative_to(ROOT)} not generated yet; section left as is")
    if args.check:
        print("README.md is current" if new == old else "README.md is out of date")
        return int(new != old)
    readme_path.write_text(new)
    print("README.md updated" if new != old else "README.md already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
