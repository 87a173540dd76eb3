"""README.md and docs/results.md: generated sections current, the README short, its flags table
complete, every relative link alive (no server)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "results.md"
MAX_README_LINES = 220


def generated(text: str, name: str) -> str:
    m = re.search(rf"<!-- BEGIN generated:{name} -->\n(.*?)<!-- END generated:{name} -->", text,
                  re.S)
    assert m, f"no generated:{name} markers"
    return m.group(1)


def test_generated_sections_are_current():
    # A subprocess with the environment's strategies removed, as `python
    # benchmarks/update_readme.py --check` runs for a user: a strategy the test session
    # registered (tests/integration/test_strategies.py) is not the package's own.
    env = {k: v for k, v in os.environ.items() if k != "DYNSPLIT_STRATEGIES"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "update_readme.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, (
        f"run `python benchmarks/update_readme.py`\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    assert "README.md is current" in proc.stdout
    assert "docs/results.md is current" in proc.stdout


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}); results go to docs/results.md")


def test_benchmark_sections_live_in_results_not_in_readme():
    readme, results = README.read_text(), RESULTS.read_text()
    for name in ("performance", "kernels", "accuracy", "memory"):
        assert f"generated:{name}" not in readme, name
        assert generated(results, name).strip(), name


def test_flags_table_lists_exactly_the_parser_flags():
    from dynsplit_sglang.settings import flag_parser

    parser_flags = [s for a in flag_parser()._actions for s in a.option_strings]
    rows = [ln for ln in generated(README.read_text(), "flags").splitlines()
            if ln.startswith("| `")]
    table_flags = [re.match(r"\| `(--[a-z0-9-]+)", ln).group(1) for ln in rows]
    assert len(table_flags) == len(set(table_flags)), "a flag is listed twice"
    assert set(table_flags) == set(parser_flags), (
        f"missing: {sorted(set(parser_flags) - set(table_flags))}, "
        f"not a flag: {sorted(set(table_flags) - set(parser_flags))}")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _links(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # code blocks hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_relative_links_point_to_existing_files():
    dead = []
    for doc in (README, RESULTS):
        text = doc.read_text()
        anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
        for target in _links(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            if not path:
                if anchor not in anchors:
                    dead.append(f"{doc.name}: #{anchor} (no such heading)")
            elif not (doc.parent / path).exists():
                dead.append(f"{doc.relative_to(REPO)}: {target}")
    assert not dead, "dead links:\n" + "\n".join(dead)
