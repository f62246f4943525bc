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
LEVERS = "sftjob_trainer.levers"

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


def switch_of(path: Path) -> str | None:
    """The `SWITCH = "name"` a lever module defines at its top level; None elsewhere."""
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "SWITCH" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    return None


def lever_breaches(roots: Iterable[Path], package: str = LEVERS) -> list[str]:
    """Imports that break the levers' boundary, one line each.

    Everything under `package` imports no project module outside it (the trainer's
    settings, failures or train; the operator): only third-party libraries and its own
    modules. A lever (a module with a SWITCH) imports none of the other levers, only the
    modules without a switch (the contract, the shared leaves, its mechanics), and those
    import no lever, so that no lever reaches another through them.
    """
    files: dict[str, Path] = {}
    for root in roots:
        files.update(modules_under(root))
    graph = import_graph(roots)
    inside = {m for m in files if m == package or m.startswith(package + ".")}
    levers = {m for m in inside if switch_of(files[m]) is not None}
    found = []
    for module in sorted(inside):
        for target in sorted(graph[module]):
            if target not in inside:
                found.append(f"{module} imports {target}, outside {package}")
            elif target in levers and module in levers:
                found.append(f"the lever {module} imports the lever {target}")
            elif target in levers:
                found.append(f"{module} (no switch) imports the lever {target}")
    return found


def test_levers_import_only_the_contract_and_leaves() -> None:
    assert not lever_breaches(PRODUCTION_ROOTS), "\n".join(lever_breaches(PRODUCTION_ROOTS))


def test_every_switch_has_one_lever_module() -> None:
    """The switches of SpeedOptions (the contract) and the levers' SWITCH names match."""
    files = modules_under(ROOT / "trainer_image")
    contract = ast.parse(files[f"{LEVERS}.contract"].read_text())
    (options,) = (
        n for n in contract.body if isinstance(n, ast.ClassDef) and n.name == "SpeedOptions"
    )
    switches = [
        n.target.id
        for n in options.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    ]
    levers = [
        switch
        for module, path in files.items()
        if module.startswith(LEVERS + ".") and (switch := switch_of(path)) is not None
    ]
    assert len(switches) >= 10
    assert sorted(levers) == sorted(switches)


def test_the_lever_rule_finds_each_kind_of_breach(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "trainer/__init__.py": "",
            "trainer/failures.py": "",
            "trainer/planner.py": "from .levers import fast, slow\nfrom .failures import E\n",
            "trainer/levers/__init__.py": "",
            "trainer/levers/contract.py": "import torch\n",
            "trainer/levers/leaf.py": "from .contract import Choice\n",
            "trainer/levers/mechanics.py": "def f():\n    from . import slow\n",
            "trainer/levers/fast.py": 'SWITCH = "fast"\n'
            "from .contract import Choice\nfrom . import leaf\n"
            "def apply():\n    from .mechanics import f\n",
            "trainer/levers/slow.py": 'SWITCH = "slow"\n'
            "def decide():\n    from trainer.levers.fast import decide\n"
            "    from ..failures import ConfigError\n",
        },
    )
    assert lever_breaches([root], "trainer.levers") == [
        "trainer.levers.mechanics (no switch) imports the lever trainer.levers.slow",
        "trainer.levers.slow imports trainer.failures, outside trainer.levers",
        "the lever trainer.levers.slow imports the lever trainer.levers.fast",
    ]
    (root / "trainer/levers/mechanics.py").write_text("import json\n")
    (root / "trainer/levers/slow.py").write_text('SWITCH = "slow"\nfrom .contract import J\n')
    assert lever_breaches([root], "trainer.levers") == []


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
