"""Each vocabulary is defined once (issue 33): the modality tuple, the lesion volume's mL, the version."""

from __future__ import annotations

import ast
import re
from importlib.metadata import version
from pathlib import Path

import app
from operators.modality_router import MODALITIES
from scripts.networks import MODALITIES as EXPERT_ORDER

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    path
    for folder in ("app", "operators", "bundle/scripts", "bench")
    for path in sorted((REPO / folder).rglob("*.py"))
    if "results" not in path.parts
]


def _tuple_literals(path: Path, values: tuple[str, ...]) -> list[int]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
            if tuple(e.value for e in node.elts) == values:
                found.append(node.lineno)
    return found


def test_the_modality_tuple_is_written_once_in_the_operators_and_once_in_the_bundle():
    assert MODALITIES == EXPERT_ORDER  # the router's vocabulary is the experts' order
    places = {str(path.relative_to(REPO)): lines for path in SOURCES if (lines := _tuple_literals(path, MODALITIES))}
    assert sorted(places) == ["bundle/scripts/networks.py", "operators/modality_router.py"], places
    assert all(len(lines) == 1 for lines in places.values()), places


def test_the_ml_of_a_voxel_is_computed_in_one_place():
    formula = re.compile(r"(det\(|get_zooms\(|prod\().*1000|1000.*(det\(|get_zooms\()")
    places = [
        f"{path.relative_to(REPO)}:{number}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if formula.search(line)
    ]
    assert places == ["bundle/scripts/metrics.py:" + str(_line_of(REPO / "bundle/scripts/metrics.py", "/ 1000.0"))]


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _string_constants(path: Path) -> list[str]:
    """Every string constant of a module except docstrings (history may name a version; definitions may not)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_version_is_read_from_one_place():
    assert version("mome") == app.__version__  # pyproject.toml reads app.__version__
    literal = re.compile(re.escape(app.__version__).join([r"(?<![\d.])", r"(?![\d.])"]))
    places = [str(p.relative_to(REPO)) for p in SOURCES if any(literal.search(c) for c in _string_constants(p))]
    for other in (REPO / "Dockerfile", REPO / "app" / "app.yaml", REPO / "pyproject.toml"):
        settings = [line for line in other.read_text().splitlines() if not line.lstrip().startswith("#")]
        places += [str(other.relative_to(REPO))] if any(literal.search(line.split("#")[0]) for line in settings) else []
    assert places == ["app/__init__.py"], places


def test_the_bundle_numbers_its_exit_codes_as_the_commands_do():
    from app.cli.exit_status import ExitCode
    from scripts import convert_upstream

    names = [name for name in dir(convert_upstream) if name.startswith("EXIT_")]
    bundle_codes = {name.removeprefix("EXIT_"): getattr(convert_upstream, name) for name in names}
    assert bundle_codes == {code.name: code.value for code in ExitCode if code.value < 128}
