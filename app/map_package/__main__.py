"""``python -m app.map_package``: stage the MAP build context, make a local base, build the CPU MAP image, run it.

Subcommands (``make map``, ``make map-base`` and ``make map-run`` call them)::

    stage --out build/map_app [--context build/map_ctx]   the application folder and the packager's build context
    base [--tag localhost/mome-debian-base:bookworm]      a minimal Debian base with debootstrap (root; no registry)
    build [--base IMAGE] [--wheels DIR] [--pip-cert F]    the CPU MAP image with docker, podman or buildah
    run --input STUDY --output OUT [IMAGE]                runs the image as a MAP runs; its exit code is ours
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from app.cli.exit_status import ExitCode
from app.map_package import DEFAULT_TAG, REPO, build_context, stage_application
from app.map_package.image import (
    DEBIAN_BASE,
    ENGINES,
    IMAGE_TAG,
    BuildSpec,
    MapBuildFailed,
    MapImageError,
    build_image,
    detect_engine,
    make_debian_base,
    pip_setting,
    run_map,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except MapImageError as error:  # a failed build is an internal error; no engine, base or wheels: usage
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.INTERNAL if isinstance(error, MapBuildFailed) else ExitCode.USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.map_package", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="{stage,base,build,run}")
    stage = commands.add_parser("stage", help="stage the application folder (and the packager's build context)")
    stage.add_argument("--out", type=Path, required=True, help="application folder to stage")
    stage.add_argument("--context", type=Path, help="also run the packager (no Docker) and keep its build context")
    _add_bundle(stage, default_tag=DEFAULT_TAG)
    stage.set_defaults(command=_stage)

    base = commands.add_parser("base", help="make a minimal Debian base image with debootstrap (idempotent)")
    base.add_argument("--tag", default=DEBIAN_BASE)
    base.add_argument("--suite", default="bookworm")
    base.add_argument("--mirror", help="Debian mirror (default: the one this host's apt uses)")
    _add_engine(base)
    base.set_defaults(command=_base)

    build = commands.add_parser("build", help="build the CPU MAP image from the packager's build context")
    build.add_argument("--base", help="base image (default: the Dockerfile's slim Python image)")
    build.add_argument(
        "--wheels", help="folder of wheels (e.g. the CPU torch) mounted into the build; 'pip': pip's find-links folder"
    )
    build.add_argument("--pip-cert", help="CA bundle for pip behind a TLS-inspecting proxy; 'pip': the one pip uses")
    build.add_argument("--no-cache", action="store_true", help="build every step afresh (no cached layers)")
    build.add_argument("--workdir", type=Path, default=REPO / "build", help="where the context and build log go")
    build.add_argument("--json", type=Path, help="write the build record (size, seconds, engine) here")
    _add_bundle(build, default_tag=IMAGE_TAG)
    _add_engine(build)
    build.set_defaults(command=_build)

    run = commands.add_parser("run", help="run the image on a study as a MAP runs (mounted input/output, no network)")
    run.add_argument("image", nargs="?", default=IMAGE_TAG)
    run.add_argument("--input", type=Path, required=True, help="study folder (DICOM files or zips)")
    run.add_argument("--output", type=Path, required=True, help="output folder (created)")
    _add_engine(run)
    run.set_defaults(command=_run)
    return parser


def _add_bundle(parser: argparse.ArgumentParser, default_tag: str) -> None:
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle", help="MoME bundle folder to package")
    parser.add_argument("--tag", default=default_tag)


def _add_engine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("auto", *ENGINES), default="auto")


def _stage(args: argparse.Namespace) -> int:
    application = stage_application(args.out.resolve())
    print(f"application folder: {application}")
    if args.context:
        print(f"build context: {build_context(application, args.context.resolve(), args.bundle.resolve(), args.tag)}")
    return ExitCode.OK


def _base(args: argparse.Namespace) -> int:
    made = make_debian_base(detect_engine(args.engine), args.tag, args.suite, args.mirror)
    print(f"{'made' if made else 'already present:'} {args.tag}")
    return ExitCode.OK


def _build(args: argparse.Namespace) -> int:
    engine = detect_engine(args.engine)
    workdir = args.workdir.resolve()
    application = stage_application(workdir / "map_app")
    context = build_context(application, workdir / "map_ctx", args.bundle.resolve(), args.tag)
    mounts = engine.name != "docker"  # docker build mounts nothing: 'pip' then means nothing
    wheels = _from_pip(args.wheels, "find-links", Path.is_dir, mounts)
    pip_cert = _from_pip(args.pip_cert, "cert", Path.is_file, mounts)
    spec = BuildSpec(context, args.tag, args.base, wheels, pip_cert, no_cache=args.no_cache)
    print(f"building {args.tag} with {engine.name} (log: {workdir / 'map_build.log'})", flush=True)
    record = build_image(spec, engine, log=workdir / "map_build.log")
    print(f"built {record['tag']}: {record['size_bytes'] / 1e9:.2f} GB in {record['build_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return ExitCode.OK


def _run(args: argparse.Namespace) -> int:
    result = run_map(args.image, args.input, args.output, detect_engine(args.engine))
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def _from_pip(value: str | None, key: str, exists: Callable[[Path], bool], mounts: bool = True) -> Path | None:
    """``value`` as a path that must exist; ``pip``: the first existing one pip's ``key`` setting names, if any
    (none when the engine ``mounts`` nothing)."""
    if value is None:
        return None
    if value == "pip":
        return next((Path(v) for v in pip_setting(key) if exists(Path(v))), None) if mounts else None
    if not exists(Path(value)):
        raise MapImageError(f"--{'wheels' if key == 'find-links' else 'pip-cert'} {value} does not exist")
    return Path(value)


if __name__ == "__main__":
    sys.exit(main())
