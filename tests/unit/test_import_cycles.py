"""No import cycles in production code: operator/ and trainer_image/.

Every import counts, wherever it sits: module level, inside a function (a cycle hidden
from the interpreter by a late import is still two modules that cannot be understood
apart), and under `if TYPE_CHECKING:`. The scan reads the source with `ast`; nothing is
imported, so it costs no heavy dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_ROOTS = (ROOT / "operator", ROOT / "trainer_image")

Graph = dict[str, set[str]]


def modules_under(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every package directly under `root`."""
    found: dict[str, Path] = {}
    for package in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
        for path in package.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported_names(module: str, path: Path, known: set[str]) -> set[str]:
    """Names this file imports: a submodule when `from pkg import sub` names one."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.add(submodule if submodule in known else source)
    return names


def _owning_module(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(roots: Iterable[Path]) -> Graph:
    """module -> the project modules it imports (third-party imports are left out)."""
    files: dict[str, Path] = {}
    for root in roots:
        files.update(modules_under(root))
    known = set(files)
    graph: Graph = {}
    for module, path in files.items():
        targets = {_owning_module(name, known) for name in _imported_names(module, path, known)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def test_production_code_has_no_import_cycles() -> None:
    graph = import_graph(PRODUCTION_ROOTS)
    assert len(graph) > 50, "the scan found too few modules: is the layout what it expects?"
    found = cycles(graph)
    assert not found, "import cycles (break them with a module both sides import): " + "; ".join(
        " <-> ".join(group) for group in found
    )


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_scan_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/speed.py": "def f():\n    from .lean import g\n",
            "pkg/lean.py": "from pkg.kept import h\n",
            "pkg/kept.py": "def h():\n    from . import speed\n",
            "pkg/leaf.py": "import json\nfrom pkg import kept\n",
        },
    )
    assert cycles(import_graph([root])) == [["pkg.kept", "pkg.lean", "pkg.speed"]]


def test_the_scan_counts_type_checking_imports_and_crosses_packages(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "node/__init__.py": "",
            "node/worker.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .host import Host\n",
            "node/host.py": "from .worker import Worker\n",
            "cli/__init__.py": "",
            "cli/main.py": "def run():\n    from runner.local import go\n",
            "runner/__init__.py": "",
            "runner/local.py": "from cli.main import table\n",
        },
    )
    assert cycles(import_graph([root])) == [
        ["cli.main", "runner.local"],
        ["node.host", "node.worker"],
    ]


def test_the_scan_sees_no_cycle_in_a_tree(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import x\n",
            "pkg/a.py": "from .b import y\nimport os.path\n",
            "pkg/b.py": "import pkg.c\n",
            "pkg/c.py": "",
        },
    )
    graph = import_graph([root])
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"}
    assert cycles(graph) == []


def test_the_local_control_plane_uses_only_kmocks_public_api() -> None:
    """kmock's `_internal` may change in any release; its public names carry the same types."""
    private = []
    for module, path in modules_under(ROOT / "operator").items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            private += [
                f"{module}: {name}"
                for name in names
                if name.split(".")[0] == "kmock" and any(p.startswith("_") for p in name.split("."))
            ]
    assert not private, private
