"""Static import rules of the repository: who may import whom, who may exit, and no import cycles.

Every module is parsed with :mod:`ast`; nothing is imported or executed. Module roles:

* bundle scripts: ``bundle/scripts/**.py`` as ``scripts.*``;
* operators: ``operators/**.py``; ``operators/bundle.py`` is the one gateway to the bundle scripts,
  ``*_operator.py`` files are SDK wrappers and all other operators modules are cores;
* app: ``app/**.py``; ``app.cli`` (with its submodules), ``app.cli_*`` and ``__main__`` are CLI modules;
* bench: ``bench/**.py`` except ``bench/results/``;
* integrations (optional): the top-level ``label``, ``worker`` and ``serving`` packages.

Each ``check_*`` function takes a repository root and returns human-readable violations; the planted
tests prove on a fake repository that each check can fail.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INTEGRATIONS = ("label", "worker", "serving")
FIRST_PARTY = ("app", "operators", "scripts", *INTEGRATIONS)
SOURCES = {"bundle/scripts": "scripts", "operators": "operators", "app": "app", "bench": "bench"}
SOURCES |= {name: name for name in INTEGRATIONS}
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


@dataclass(frozen=True)
class Module:
    """One parsed source file.

    Attributes:
        name: Dotted module name (``scripts.networks``, ``app.cli``; packages without ``.__init__``).
        rel: Path relative to the repository root, with forward slashes.
        role: ``scripts``, ``operators``, ``app``, ``bench`` or one of :data:`INTEGRATIONS`.
        is_package: Whether the file is a package ``__init__.py``.
        tree: The parsed module.
    """

    name: str
    rel: str
    role: str
    is_package: bool
    tree: ast.Module

    @property
    def is_cli(self) -> bool:
        """Whether this is an app CLI module."""
        return is_cli_name(self.name)

    @property
    def is_core(self) -> bool:
        """Whether this is an operators module other than an ``*_operator.py`` wrapper."""
        return self.role == "operators" and not self.rel.endswith("_operator.py")


@dataclass(frozen=True)
class Import:
    """One imported name, resolved to an absolute dotted module (or module attribute) name."""

    target: str
    line: int


def under(name: str, *prefixes: str) -> bool:
    """Whether dotted ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


def is_cli_name(name: str) -> bool:
    """Whether dotted ``name`` is an app CLI module: ``app.cli``/``app.cli.*``, ``app.cli_*`` or a ``__main__``."""
    parts = name.split(".")
    return (
        parts[0] == "app"
        and len(parts) > 1
        and (parts[1] == "cli" or parts[1].startswith("cli_") or parts[-1] == "__main__")
    )


def load_modules(root: Path) -> list[Module]:
    """Parses every module of every role under ``root`` (missing folders are skipped)."""
    modules = []
    for folder, package in SOURCES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")) if base.is_dir() else []:
            rel = path.relative_to(root).as_posix()
            if rel.startswith("bench/results/"):
                continue
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            modules.append(Module(name, rel, package, is_package, ast.parse(path.read_text(), filename=rel)))
    return modules


def _from_base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement imports from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".")[: None if module.is_package else -1]
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, node.module] if node.module else package)


def imports_of(module: Module, known: set[str]) -> list[Import]:
    """Every import of ``module``, at any depth, including literal ``importlib.import_module`` calls.

    ``from pkg import name`` imports ``pkg.name`` when that is a known module or ``pkg`` is third-party
    (so ``from monai import deploy`` counts as ``monai.deploy``), and ``pkg`` otherwise.
    """
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                third_party = base.split(".")[0] not in FIRST_PARTY and alias.name != "*"
                found.append(Import(sub if sub in known or third_party else base, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in {"importlib.import_module", "import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value, node.lineno))
    return sorted(dict.fromkeys(found), key=lambda imp: imp.line)


def _import_violations(root: Path, forbidden: Callable[[Module, str], bool], rule: str) -> list[str]:
    """``path:line: imports X (rule)`` for each import ``X`` of a module for which ``forbidden(module, X)`` holds."""
    modules = load_modules(root)
    known = {module.name for module in modules}
    return [
        f"{module.rel}:{imp.line}: imports {imp.target} ({rule})"
        for module in modules
        for imp in imports_of(module, known)
        if forbidden(module, imp.target)
    ]


def check_bundle_scripts_import_only_third_party(root: Path) -> list[str]:
    """Rule 1: bundle scripts import only third-party packages and themselves."""
    first_party = ("app", "operators", "bench", "tests", *INTEGRATIONS)
    rule = "rule 1: bundle scripts import only third-party packages and scripts"
    return _import_violations(
        root, lambda module, target: module.role == "scripts" and under(target, *first_party), rule
    )


def check_operators_reach_scripts_only_through_gateway(root: Path) -> list[str]:
    """Rule 2: only ``operators/bundle.py`` imports bundle scripts; operators never import app or integrations."""

    def forbidden(module: Module, target: str) -> bool:
        gateway = module.rel == "operators/bundle.py"
        return module.role == "operators" and (
            under(target, "app", *INTEGRATIONS) or under(target, "scripts") and not gateway
        )

    rule = "rule 2: only operators/bundle.py imports scripts; operators never import app or integrations"
    return _import_violations(root, forbidden, rule)


def check_operator_cores_are_sdk_free(root: Path) -> list[str]:
    """Rule 3: operator cores never import ``monai.deploy`` or ``holoscan`` (``*_operator.py`` wrappers may)."""
    rule = "rule 3: operator cores never import monai.deploy or holoscan"
    return _import_violations(
        root, lambda module, target: module.is_core and under(target, "monai.deploy", "holoscan"), rule
    )


def check_app_layering(root: Path) -> list[str]:
    """Rule 4: app graph/API modules never import CLI modules; app/operators/scripts/bench never import integrations."""

    def forbidden(module: Module, target: str) -> bool:
        graph_imports_cli = module.role == "app" and not module.is_cli and is_cli_name(target)
        return (
            graph_imports_cli
            or module.role in ("app", "operators", "scripts", "bench")
            and under(target, *INTEGRATIONS)
        )

    return _import_violations(root, forbidden, "rule 4: app graph/API modules never import CLI modules or integrations")


def _module_scope(tree: ast.Module) -> Iterator[ast.AST]:
    """Nodes executed in module scope (function and class bodies not entered)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def _exit_handling(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``(line, what)`` for each ``sys.exit``/``exit`` call, ``raise SystemExit`` and module-level ``EXIT_*`` name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in {"sys.exit", "exit"}:
            yield node.lineno, f"calls {ast.unparse(node.func)}()"
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                yield node.lineno, "raises SystemExit"
    for node in _module_scope(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names = [node.id]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.asname or alias.name.split(".")[0] for alias in node.names]
        else:
            names = [node.name] if isinstance(node, SCOPES[:3]) else []
        yield from ((node.lineno, f"defines {name}") for name in names if name.startswith("EXIT_"))


def check_only_cli_parses_arguments_or_exits(root: Path) -> list[str]:
    """Rule 5: non-CLI app/operators modules never import argparse, exit, raise SystemExit or define ``EXIT_*``."""
    rule = "rule 5: only CLI modules parse arguments or map exit codes"

    def applies(module: Module) -> bool:
        return module.role in ("app", "operators") and not module.is_cli

    found = _import_violations(root, lambda module, target: applies(module) and under(target, "argparse"), rule)
    for module in filter(applies, load_modules(root)):
        found += [f"{module.rel}:{line}: {what} ({rule})" for line, what in sorted(set(_exit_handling(module.tree)))]
    return sorted(found, key=lambda violation: (violation.split(":")[0], int(violation.split(":")[1])))


def check_bench_never_imports_cli(root: Path) -> list[str]:
    """Rule 6: bench never imports app CLI modules."""
    rule = "rule 6: bench never imports app CLI modules"
    return _import_violations(root, lambda module, target: module.role == "bench" and is_cli_name(target), rule)


def import_graph(modules: list[Module]) -> dict[str, dict[str, tuple[str, int]]]:
    """First-party import graph: ``graph[a][b]`` is the ``(path, line)`` where running ``a`` first imports ``b``.

    Importing ``x.y.z`` also runs the ``__init__`` of ``x`` and ``x.y`` unless the importer is already inside them.
    """
    nodes = {module.name for module in modules if module.role != "bench"}
    graph: dict[str, dict[str, tuple[str, int]]] = {name: {} for name in nodes}
    for module in modules:
        if module.role == "bench":
            continue
        for imp in imports_of(module, nodes):
            parts = imp.target.split(".")
            prefixes = [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in nodes]
            for prefix in prefixes:
                runs = prefix == prefixes[-1] or not under(module.name, prefix)
                if runs and prefix != module.name:
                    graph[module.name].setdefault(prefix, (module.rel, imp.line))
    return graph


def _shortest_cycle(graph: dict[str, dict[str, tuple[str, int]]], start: str) -> list[str] | None:
    """The shortest import chain from ``start`` back to itself, without repeating ``start``; None if none."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in graph[node]:
            if successor == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return chain[::-1]
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    return None


def check_no_import_cycles(root: Path) -> list[str]:
    """Rule 7: no import cycles among first-party modules (all imports, function-level ones included).

    Each module on a cycle contributes its shortest cycle; cycles are reported once, starting at their smallest name.
    """
    graph = import_graph(load_modules(root))
    cycles = set()
    for start in sorted(graph):
        if ring := _shortest_cycle(graph, start):
            first = ring.index(min(ring))
            cycles.add(tuple(ring[first:] + ring[:first]))
    found = []
    for ring in sorted(cycles):
        path, line = graph[ring[0]][ring[1]]
        chain = " -> ".join([*ring, ring[0]])
        found.append(f"{path}:{line}: imports {ring[1]} (rule 7: no import cycles: {chain})")
    return found


RULES = [
    check_bundle_scripts_import_only_third_party,
    check_operators_reach_scripts_only_through_gateway,
    check_operator_cores_are_sdk_free,
    check_app_layering,
    check_only_cli_parses_arguments_or_exits,
    check_bench_never_imports_cli,
    check_no_import_cycles,
]
RULE_IDS = [f"rule{number}-{check.__name__.removeprefix('check_')}" for number, check in enumerate(RULES, 1)]

CLEAN_REPO = {  # every role, each using what its rules allow
    "bundle/scripts/__init__.py": "from .networks import Net\n",
    "bundle/scripts/networks.py": "import torch\nfrom .layers import Block\nclass Net(Block): ...\n",
    "bundle/scripts/layers.py": "import argparse, sys\nEXIT_OK = 0\nclass Block: ...\nsys.exit(0)\n",
    "operators/__init__.py": '"""Operators."""\n',
    "operators/bundle.py": "def load():\n    from scripts import networks\n",
    "operators/seg_writer.py": "import numpy\nfrom operators.bundle import load\n",
    "operators/seg_writer_operator.py": "from monai.deploy.core import Operator\nfrom operators import seg_writer\n",
    "app/__init__.py": "from app.runtime import setup\n",
    "app/runtime.py": "def setup():\n    try: ...\n    except SystemExit: ...\n",
    "app/graph.py": "from operators.seg_writer_operator import Operator\ndef run(): ...\n",
    "app/cli/__init__.py": "import argparse, sys\nfrom app.graph import run\nEXIT_OK = 0\nsys.exit(run())\n",
    "app/cli_convert.py": "from app.cli import main\nraise SystemExit(main())\n",
    "app/__main__.py": "from app.cli import main\nexit(main())\n",
    "bench/timing.py": "import argparse\nfrom app.graph import run\nfrom scripts import networks\n",
    "bench/results/old_run.py": "from app.cli import main\nimport worker\n",
    "worker/__init__.py": "from app.graph import run\n",
    "worker/jobs.py": "from worker import run\n",
}
PLANTED = [  # (id, check, files added to or replacing CLEAN_REPO's, text the one violation must contain)
    (
        "1-app",
        RULES[0],
        {"bundle/scripts/bad.py": "def f():\n    from app import graph\n"},
        "bad.py:2: imports app.graph",
    ),
    ("1-tests", RULES[0], {"bundle/scripts/bad.py": "import tests.helpers\n"}, "bad.py:1: imports tests.helpers"),
    ("2-scripts", RULES[1], {"operators/router.py": "from scripts import networks\n"}, "imports scripts.networks"),
    ("2-app", RULES[1], {"operators/router.py": "import os\nimport app.graph\n"}, "router.py:2: imports app.graph"),
    ("3-holoscan", RULES[2], {"operators/router.py": "from holoscan.core import Fragment\n"}, "imports holoscan.core"),
    ("3-deploy", RULES[2], {"operators/bundle.py": "from monai import deploy\n"}, "bundle.py:1: imports monai.deploy"),
    ("4-cli_", RULES[3], {"app/api.py": "from app import cli_convert\n"}, "api.py:1: imports app.cli_convert"),
    ("4-cli", RULES[3], {"app/api.py": "def f():\n    import app.cli\n"}, "api.py:2: imports app.cli"),
    ("4-integration", RULES[3], {"bench/queue.py": "from serving import api\n"}, "queue.py:1: imports serving"),
    ("5-argparse", RULES[4], {"operators/router.py": "from argparse import ArgumentParser\n"}, "imports argparse"),
    ("5-sys.exit", RULES[4], {"app/api.py": "import sys\ndef f():\n    sys.exit(1)\n"}, "api.py:3: calls sys.exit()"),
    ("5-exit", RULES[4], {"app/api.py": "def f():\n    exit(1)\n"}, "api.py:2: calls exit()"),
    ("5-SystemExit", RULES[4], {"operators/router.py": "def f():\n    raise SystemExit(2)\n"}, "raises SystemExit"),
    ("5-EXIT_", RULES[4], {"app/api.py": "EXIT_USAGE: int = 2\n"}, "api.py:1: defines EXIT_USAGE"),
    ("6-cli_", RULES[5], {"bench/cli.py": "from app.cli_convert import main\n"}, "cli.py:1: imports app.cli_convert"),
    ("6-main", RULES[5], {"bench/cli.py": "import app.__main__\n"}, "cli.py:1: imports app.__main__"),
    (
        "7-local",
        RULES[6],
        {"operators/a.py": "def f():\n    from operators import b\n", "operators/b.py": "import operators.a\n"},
        "a.py:2: imports operators.b (rule 7: no import cycles: operators.a -> operators.b -> operators.a)",
    ),
    (
        "7-init",
        RULES[6],
        {"bundle/scripts/layers.py": "from . import Net\n"},
        "scripts -> scripts.networks -> scripts.layers -> scripts",
    ),
    ("7-parent-init", RULES[6], {"operators/__init__.py": "import app.graph\n"}, "app.graph -> operators -> app.graph"),
]


def make_repo(root: Path, files: dict[str, str]) -> Path:
    """Writes ``files`` (relative path to source) under ``root`` and returns ``root``."""
    for rel, source in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    return root


@pytest.mark.parametrize("check", RULES, ids=RULE_IDS)
def test_repo_follows_rule(check: Callable[[Path], list[str]]) -> None:
    violations = check(REPO)
    assert not violations, f"{len(violations)} violation(s) of {check.__name__}:\n" + "\n".join(violations)


@pytest.mark.parametrize("check", RULES, ids=RULE_IDS)
def test_checker_passes_clean_fake_repo(tmp_path: Path, check: Callable[[Path], list[str]]) -> None:
    assert check(make_repo(tmp_path, CLEAN_REPO)) == []


@pytest.mark.parametrize(("check", "files", "expected"), [pytest.param(*case[1:], id=case[0]) for case in PLANTED])
def test_checker_finds_planted_violation(
    tmp_path: Path, check: Callable[[Path], list[str]], files: dict[str, str], expected: str
) -> None:
    violations = check(make_repo(tmp_path, CLEAN_REPO | files))
    assert len(violations) == 1, violations
    assert expected in violations[0], violations
