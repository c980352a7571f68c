"""Writing a benchmark's current result summary: ``bench/results/<name>.json`` and ``.md``, the Markdown printed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, results: dict[str, Any], write_markdown: Callable[[dict[str, Any], Path], None]) -> None:
    """Writes ``results`` as JSON and, through ``write_markdown``, as Markdown under ``bench/results/``; prints it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, RESULTS / f"{name}.md")
    print((RESULTS / f"{name}.md").read_text())
