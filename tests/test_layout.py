"""The daemons meet only on the wire: the sampler (heterorl/node) never imports the learner (heterorl/server) nor
the reverse, and what both share (heterorl/common) imports neither. Imports are read with `ast`, so an import
inside a function, a `from . import` or an `importlib`-free alias all count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "heterorl"
FORBIDDEN = {
    "node": ("heterorl.server",),
    "server": ("heterorl.node",),
    "common": ("heterorl.server", "heterorl.node"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a module of the heterorl package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from heterorl import server`
    return found


def crossings(side: str) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / side).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[side]):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("side", sorted(FORBIDDEN))
def test_daemons_share_only_common(side):
    assert (PACKAGE / side).is_dir()
    assert not crossings(side), "\n".join(crossings(side))


def test_the_import_reader_sees_every_form(tmp_path, monkeypatch):
    """The checker itself can fail: each form of a forbidden import is found."""
    fake = tmp_path / "heterorl"
    (fake / "node").mkdir(parents=True)
    (fake / "node" / "bad.py").write_text(
        "import heterorl.server.tokens\n"
        "from heterorl.server import errors\n"
        "from heterorl import server\n"
        "from ..server.errors import Refused\n"
        "def late():\n    import heterorl.server.service as s\n"
        "from heterorl.common import contract  # allowed\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = crossings("node")
    assert sorted({int(line.split(":")[1].split()[0]) for line in found}) == [1, 2, 3, 4, 6], found
