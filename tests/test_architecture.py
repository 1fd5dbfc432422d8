"""The layers of the code: every module imports, pure cores load neither ray nor vllm, no
module imports a layer above its own, and no import cycle exists. Imports under
``TYPE_CHECKING`` count too: a type-only circle is still a circle.

Layers, bottom to top (a module may import its own layer and those below):

    constitutions -> core -> actors -> learners -> workflows.runtime -> workflows (the jobs) -> workflows.cli

``learners`` is what runs inside the Ray Train workers; ``workflows.runtime`` is the drivers'
Ray plumbing; ``workflows`` the jobs.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("constitutions", "core", "actors", "learners", "workflows")
LAYERS = ("constitutions", "core", "actors", "learners", "workflows.runtime", "workflows", "workflows.cli")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":
                continue  # runs the command when imported
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports anywhere: in functions and under TYPE_CHECKING too."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # `from workflows.runtime import job_client` names a module
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in modules}


def layer(module: str) -> int:
    return max(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imported(path, modules) - {module} for module, path in modules.items()}


def test_every_module_imports_and_pure_cores_load_neither_ray_nor_vllm():
    modules = sorted(project_modules())
    core = [m for m in modules if layer(m) <= LAYERS.index("core")]
    script = (
        "import importlib, json, sys\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        "pure = sorted(m for m in ('ray', 'vllm') if m in sys.modules)\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(pure))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], "the pure cores loaded ray or vllm"


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{module} ({LAYERS[layer(module)]}) imports {target} ({LAYERS[layer(target)]})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layer(target) > layer(module)]
    assert upward == []


def test_no_import_cycle():
    graph, cycles, state = import_graph(), [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_layer_rules_see_real_imports():
    """The checks above are only as good as the graph: it holds the imports we know of."""
    graph = import_graph()
    assert "core.ppo_math" in graph["learners.ppo_loop"]
    assert "workflows.runtime.job_client" in graph["workflows.cli.operations"]  # a function-level import
    assert "workflows.runtime.training" in graph["workflows.ppo"]
    assert "learners.ppo_config" in graph["workflows.runtime.frozen_group"]


def test_type_only_imports_count(tmp_path):
    """An import under TYPE_CHECKING is an edge of the graph (a circle through one is a circle)."""
    module = tmp_path / "typed.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from core import ppo_math\n")
    assert imported(module, project_modules()) == {"core.ppo_math"}


def test_the_learners_get_a_typed_context_not_a_dict():
    """Every learner loop takes ``learners.context.LearnerContext``; nothing reads a
    ``train_loop_config`` dict by key."""
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in project_modules().values()
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if "train_loop_config[" in line or "loop_config[" in line]
    assert offenders == []


def test_every_benchmark_parses_and_names_what_the_project_has():
    """Benchmarks run by hand, not in the suite: each one must still parse, and every name it
    imports from the project (at the top or inside a function) must exist where it looks."""
    script = (
        "import ast, importlib, json, pathlib\n"
        "missing = []\n"
        "for path in sorted(pathlib.Path('benchmarks').glob('*.py')):\n"
        "    for node in ast.walk(ast.parse(path.read_text())):\n"
        "        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in "
        f"{PACKAGES!r}:\n"
        "            module = importlib.import_module(node.module)\n"
        "            for alias in node.names:\n"
        "                if not hasattr(module, alias.name):\n"
        "                    try:\n"
        "                        importlib.import_module(node.module + '.' + alias.name)\n"
        "                    except ImportError:\n"
        "                        missing.append(f'{path}: {node.module}.{alias.name}')\n"
        "print(json.dumps(missing))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
