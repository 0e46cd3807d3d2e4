"""The house rules of the af3dist package, checked on its source (see README's layout section).

- Lower layers never import upward: `data` (the data library) imports neither the embedded stand-ins nor the
  cluster, training, inference, generation, serving or captioning code built on it; `model` and `generation`
  stay below the jobs too.
- Local-versus-URL is decided in one module, `af3dist.storage`: no other module tests for "://".
- The embedded stand-ins live in `af3dist.embedded`, no file of it over 300 lines.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "af3dist"
JOBS = {"cli", "evaluate", "recipe", "data_check", "training", "server", "captioning", "cluster", "inference",
        "generation", "embedded", "assets"}
# package -> af3dist subpackages/modules it must not import
FORBIDDEN = {
    "data": JOBS,
    "model": JOBS,
    "generation": JOBS - {"generation"},
    "storage": JOBS | {"data", "model", "config"},
    "config": JOBS | {"data", "model"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _imported(tree: ast.AST) -> set[str]:
    """The first component under af3dist of everything `tree` imports (at any depth: lazy imports count)."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "af3dist" else [f"af3dist.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out.update(n.split(".")[1] for n in names if n.startswith("af3dist."))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_nothing_imports_upward(package):
    offenders = []
    for path, tree in _modules():
        rel = path.relative_to(PACKAGE)
        owner = rel.parts[0].removesuffix(".py")
        if owner != package:
            continue
        bad = _imported(tree) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, f"af3dist.{package} imports upward: " + "; ".join(offenders)


def test_only_storage_tells_urls_from_paths():
    offenders = [str(path.relative_to(PACKAGE)) for path, tree in _modules()
                 if path.name != "storage.py"
                 and any(isinstance(n, ast.Constant) and n.value == "://" for n in ast.walk(tree))]
    assert not offenders, f'"://" tested outside af3dist/storage.py: {offenders}'


def test_embedded_package_files_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "embedded").glob("*.py")}
    assert {"captions.py", "sounds.py", "encoding.py", "plan.py", "audiocaps.py", "tiny_model.py",
            "assets.py"} <= set(sizes)
    assert max(sizes.values()) <= 300, sizes
    assert not (PACKAGE / "data" / "synthetic.py").exists()
