"""The package layers point one way (README, "Layout"): each layer imports only from those below it.

Bottom to top: `utils/`; `model/` and `data_loader/` (each imports only itself and utils);
`trainer/` (anything below); the top (train.py, eval.py, preprocessing/, pretrained/, bench/,
tests/), which nothing in the packages imports. The evaluation code (k-NN, linear probing, feature
extraction) does not load the training loop, not even through another module. Read from the source
with `ast`: every `import x` and `from x import y`, at any depth (inside functions included).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "model", "data_loader", "trainer")
# what each package may import from the project, besides itself
ALLOWED = {
    "utils": set(),
    "model": {"utils"},
    "data_loader": {"utils"},
    "trainer": {"utils", "model", "data_loader"},
}
TRAINING_LOOP = "trainer.trainer"
EVALUATION = ("trainer.knn", "trainer.linear_probe", "trainer.features")


def project_names(root: Path = ROOT) -> set[str]:
    """The top-level names an import of this project starts with: its modules and folders of modules."""
    names = {p.stem for p in root.glob("*.py")}
    names |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))}
    return names


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, root: Path = ROOT) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def resolve(module: Optional[str], level: int, importer: str, is_package: bool) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `importer`."""
    if not level:
        return module or ""
    base = importer.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """The modules `path` imports; `from a import b` counts as `a.b` where that is a module."""
    importer = module_name(path, root)
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module, node.level, importer, is_package)
            if base == "__future__":
                continue
            subs = [f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}", root)]
            found.update(subs or [base])
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of the packages and the project modules it imports."""
    project = project_names(root)
    graph = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            graph[module_name(path, root)] = {m for m in imports_of(path, root) if m.split(".")[0] in project}
    return graph


def loads(graph: dict[str, set[str]], start: str, target: str) -> Optional[list[str]]:
    """The chain of imports by which `start` loads `target` (`start` first), or None."""
    chains, seen = [[start]], {start}
    while chains:
        chain = chains.pop(0)
        for imported in sorted(graph.get(chain[-1], ())):
            if imported == target or imported.startswith(target + "."):
                return chain + [imported]
            if imported not in seen:
                seen.add(imported)
                chains.append(chain + [imported])
    return None


def violations(root: Path = ROOT) -> list[str]:
    """`module -> imported module` for each import that points up, or that loads the training loop
    into the evaluation code."""
    graph = import_graph(root)
    found = []
    for module, imported in sorted(graph.items()):
        package = module.split(".")[0]
        for target in sorted(imported):
            top = target.split(".")[0]
            if top != package and top not in ALLOWED[package]:
                found.append(f"{module} -> {target}")
    for module in EVALUATION:
        chain = loads(graph, module, TRAINING_LOOP)
        if chain:
            via = f" (via {' -> '.join(chain[1:-1])})" if len(chain) > 2 else ""
            found.append(f"{module} -> {chain[-1]}{via}: the evaluation code loads the training loop")
    return found


def test_imports_point_down_the_layers():
    found = violations()
    assert not found, "imports against the layers (README, Layout):\n" + "\n".join(found)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_check_finds_imports_that_point_up(tmp_path):
    write(tmp_path, {
        "train.py": "",
        "utils/__init__.py": "",
        "utils/cli.py": "from trainer.checkpoint import load\nimport utils.config\n",
        "utils/config.py": "def f():\n    from model import loss\n",
        "model/__init__.py": "from . import loss\n",
        "model/loss.py": "import torch\nfrom data_loader.base import x\n",
        "data_loader/base.py": "from utils import config\n",
        "trainer/checkpoint.py": "import trainer.trainer\nfrom model.loss import g\nimport train\n",
        "trainer/trainer.py": "",
        "trainer/features.py": "",
        "trainer/linear_probe.py": "from trainer import trainer\n",
        "trainer/knn.py": "from .checkpoint import load\n",
    })
    assert violations(tmp_path) == [
        "model.loss -> data_loader.base",
        "trainer.checkpoint -> train",
        "utils.cli -> trainer.checkpoint",
        "utils.config -> model.loss",
        "trainer.knn -> trainer.trainer (via trainer.checkpoint): the evaluation code loads the training loop",
        "trainer.linear_probe -> trainer.trainer: the evaluation code loads the training loop",
    ]
