"""``mome-convert SRC --out BUNDLE_DIR``: the authors' checkpoint folder -> a runnable MoME bundle.

The conversion is the bundle's own (``scripts.convert_upstream``, which parses its arguments and returns its exit
code); this command only makes the installed bundle's scripts importable first.
"""

from __future__ import annotations

from collections.abc import Sequence

from operators.bundle import bundle_scripts

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """Runs the converter on ``argv``; returns its exit code."""
    return int(bundle_scripts("convert_upstream").main(list(argv)))
