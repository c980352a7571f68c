"""``python -m app.map_package``: stage the MAP application folder (and, with ``--context``, its build context)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app.map_package import DEFAULT_TAG, REPO, build_context, stage_application


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.map_package", description="Stage the MoME MAP application folder and its build context."
    )
    parser.add_argument("--out", type=Path, required=True, help="application folder to stage")
    parser.add_argument("--context", type=Path, help="also run the packager (no Docker) and keep its build context")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle", help="MoME bundle folder to package")
    parser.add_argument("--tag", default=DEFAULT_TAG)
    args = parser.parse_args(argv)
    application = stage_application(args.out.resolve())
    print(f"application folder: {application}")
    if args.context:
        print(f"build context: {build_context(application, args.context.resolve(), args.bundle.resolve(), args.tag)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
