"""Reading the requests MONAI Label hands to the tasks, and wording the answers, the same way in every task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["flag", "without_folder"]


def flag(value: Any) -> bool:
    """A request option as a boolean: ``true``, ``1``, ``yes``, ``on`` (any case; JSON ``true`` too)."""
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def without_folder(error: Exception, path: Path) -> str:
    """An error message without the server's folders: ``path`` is named by its file name only."""
    return str(error).replace(str(path), path.name)
