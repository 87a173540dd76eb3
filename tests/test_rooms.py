"""Data flows one way: SGLang → patches → runtime → core/kernels. A lower room never imports a
higher one (it is handed a callback: runtime/hooks.py); the core imports no SGLang. Read from the
source (every import statement, inside functions too), so a late import cannot hide."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dynsplit_sglang"
# room -> the top-level names and package parts its files must never import
FORBIDDEN = {
    PACKAGE / "core": ("sglang", "patches", "runtime", "kernels"),
    PACKAGE / "runtime": ("patches",),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(REPO).with_suffix("").parts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(parts[:-node.level]) if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out += [(node.lineno, name + "." + a.name if not node.module else name)
                    for a in node.names]
    return out


def _bad(module: str, forbidden: tuple[str, ...]) -> bool:
    parts = module.split(".")
    inside = parts[1:] if parts[0] == "dynsplit_sglang" else None
    for f in forbidden:
        if f == "sglang" and parts[0] == "sglang":
            return True
        if inside is not None and inside[:1] == [f]:
            return True
    return False


@pytest.mark.parametrize("room", sorted(FORBIDDEN), ids=lambda p: p.name)
def test_a_lower_room_never_imports_a_higher_one(room):
    bad = [f"{path.relative_to(REPO)}:{line} imports {mod}"
           for path in sorted(room.rglob("*.py")) for line, mod in _imports(path)
           if _bad(mod, FORBIDDEN[room])]
    assert not bad, "\n".join(bad)


def test_the_check_sees_late_and_relative_imports(tmp_path):
    # What the rooms test must catch, in the shapes the runtime used before hooks.py.
    room = PACKAGE / "runtime"
    probe = room / "_probe_for_test_rooms.py"
    probe.write_text("def f():\n    from dynsplit_sglang.patches.memory import PLAN\n"
                     "    from ..patches import eviction\n")
    try:
        found = [m for _, m in _imports(probe) if _bad(m, FORBIDDEN[room])]
    finally:
        probe.unlink()
    assert found == ["dynsplit_sglang.patches.memory", "dynsplit_sglang.patches"]
