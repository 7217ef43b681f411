"""Imports flow one way: engine -> distributed -> train/cli (DESIGN section 1)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "distsvi"
ENGINE = [
    p
    for p in PKG.rglob("*.py")
    if p.relative_to(PKG).parts[0] not in ("distributed", "train", "cli.py")
]
DISTRIBUTED = list((PKG / "distributed").rglob("*.py"))


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of the distsvi modules a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text() if source is None else source)
    package = ["distsvi", *path.relative_to(PKG).parent.parts]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("distsvi")}


def higher(names: set[str], layers: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == l or n.startswith(l + ".") for l in layers)}


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: str(p.relative_to(PKG)))
def test_engine_never_imports_distributed_or_train(path):
    assert not higher(
        imported_modules(path), ("distsvi.distributed", "distsvi.train", "distsvi.cli")
    )


@pytest.mark.parametrize("path", DISTRIBUTED, ids=lambda p: str(p.relative_to(PKG)))
def test_distributed_never_imports_train(path):
    assert not higher(imported_modules(path), ("distsvi.train", "distsvi.cli"))


def test_the_check_sees_a_violation():
    probe = PKG / "infer" / "probe.py"  # not written: the source is given
    names = imported_modules(probe, "from ..distributed import init\nimport distsvi.train.loop\n")
    assert higher(names, ("distsvi.distributed",)) == {
        "distsvi.distributed",
        "distsvi.distributed.init",
    }
    assert higher(names, ("distsvi.train",)) == {"distsvi.train.loop"}
