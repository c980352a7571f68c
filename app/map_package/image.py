"""Builds and runs the CPU MAP image with the container engine the host has: Docker, else Podman, else Buildah.

``monai-deploy package`` needs ``docker buildx`` and a registry base image; hosts without a Docker engine (CI
runners, locked-down hospital servers) still build the same MAP layout daemonless from the packager's own build
context and the project's ``Dockerfile``. Podman and Buildah build with ``--isolation chroot`` (no runtime needed
inside a container) and, on vfs storage, without intermediate layers (vfs copies the whole image per layer).

A run follows ``monai-deploy run`` (holoscan-cli 4.2.0): the study is mounted at the MAP's input path (read-only
here), the output folder at its output path, ``HOLOSCAN_HOSTING_SERVICE=HOLOSCAN_RUN``, the caller's uid:gid, the
shared memory of ``pkg.json``; and, unlike it, no network.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from app import __version__
from app.map_package import APP_CONFIG, REPO

__all__ = [
    "DEBIAN_BASE",
    "ENGINES",
    "IMAGE_TAG",
    "BuildSpec",
    "Engine",
    "MapBuildFailed",
    "MapImageError",
    "apt_mirror",
    "build_image",
    "detect_engine",
    "make_debian_base",
    "pip_setting",
    "run_map",
]

ENGINES = ("docker", "podman", "buildah")
IMAGE_TAG = f"mome-app-cpu:{__version__}"
DEBIAN_BASE = "localhost/mome-debian-base:bookworm"
DOCKERFILE = REPO / "Dockerfile"
MAP_INPUT = "/var/holoscan/input"
MAP_OUTPUT = "/var/holoscan/output"
WHEELS_MOUNT = "/mome-wheels"
CA_MOUNT = "/mome-ca.crt"
PYPI = "https://pypi.org/simple"
# runc cannot raise a limit above the one the host grants; Podman's defaults (1M files, 4M processes) can be.
PODMAN_NPROC = 4096


class MapImageError(RuntimeError):
    """The image cannot be built or run as asked (no engine, a missing base or wheel folder, a bad setting)."""


class MapBuildFailed(MapImageError):
    """The engine ran and the build or base import failed (its log says why)."""


@dataclass(frozen=True)
class Engine:
    """One OCI engine: ``docker``, ``podman`` or ``buildah`` (build only)."""

    name: str
    storage_driver: str | None = None

    @property
    def can_run(self) -> bool:
        return self.name != "buildah"

    def image_exists(self, image: str) -> bool:
        command = {"docker": ["docker", "image", "inspect"], "podman": ["podman", "image", "exists"]}
        argv = command.get(self.name, ["buildah", "inspect", "--type", "image"]) + [image]
        return subprocess.run(argv, capture_output=True).returncode == 0

    def inspect(self, image: str) -> dict:
        """The image's configuration as ``docker image inspect`` reports it (``Size``, ``Config.Labels``, ...)."""
        tool = "podman" if self.name == "buildah" and shutil.which("podman") else self.name
        argv = [tool, "image", "inspect", image] if tool != "buildah" else ["buildah", "inspect", image]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise MapImageError(f"{self.name} cannot inspect {image}: {result.stderr.strip()}")
        found = json.loads(result.stdout)
        return found[0] if isinstance(found, list) else found

    def build_argv(self, spec: BuildSpec) -> list[str]:
        argv = [self.name, "bud" if self.name == "buildah" else "build"]
        if self.name != "docker":
            argv += ["--isolation", "chroot", "--network", "host"]
            argv += ["--pull=missing"] if self.name == "podman" else []
            argv += ["--layers=false"] if self.storage_driver == "vfs" else []
            argv += [f"-v={mount}" for mount in spec.mounts()]
        elif spec.mounts():
            raise MapImageError("docker build cannot mount a wheel folder or CA bundle; use podman or buildah for them")
        argv += ["--no-cache"] if spec.no_cache else []
        for key, value in spec.build_args().items():
            argv += ["--build-arg", f"{key}={value}"]
        return argv + ["-f", str(spec.dockerfile), "-t", spec.tag, str(spec.context)]

    def run_argv(
        self, image: str, study: Path, output: Path, arguments: Sequence[str] = (), name: str | None = None
    ) -> list[str]:
        if not self.can_run:
            raise MapImageError("buildah cannot run a MAP; install podman or docker")
        argv = [self.name, "run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}"]
        argv += ["--name", name] if name else []
        argv += ["--shm-size", shared_memory(), "-e", "HOLOSCAN_HOSTING_SERVICE=HOLOSCAN_RUN"]
        argv += ["-v", f"{study.resolve()}:{MAP_INPUT}:ro", "-v", f"{output.resolve()}:{MAP_OUTPUT}"]
        if self.name == "podman":
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            argv += ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", f"nproc={PODMAN_NPROC}:{PODMAN_NPROC}"]
        return argv + [image, *arguments]


@dataclass(frozen=True)
class BuildSpec:
    """What to build: the packager's build context, the base image and where pip finds its packages."""

    context: Path
    tag: str = IMAGE_TAG
    base_image: str | None = None
    wheels: Path | None = None
    pip_cert: Path | None = None
    dockerfile: Path = DOCKERFILE
    no_cache: bool = False

    def mounts(self) -> list[str]:
        mounts = [f"{self.wheels.resolve()}:{WHEELS_MOUNT}:ro"] if self.wheels else []
        return mounts + ([f"{self.pip_cert.resolve()}:{CA_MOUNT}:ro"] if self.pip_cert else [])

    def build_args(self) -> dict[str, str]:
        args = {"MOME_VERSION": __version__}
        args |= {"BASE_IMAGE": self.base_image} if self.base_image else {}
        args |= {"WHEELS": WHEELS_MOUNT} if self.wheels else {}
        if self.wheels and any(self.wheels.glob("torch-*+cpu-*.whl")):
            args.setdefault("TORCH_INDEX_URL", PYPI)  # the wheel folder holds the CPU torch; its dependencies: PyPI
        return args | ({"PIP_CERT": CA_MOUNT} if self.pip_cert else {})


def detect_engine(requested: str = "auto") -> Engine:
    """The engine named, or the first that works here: a Docker with a reachable daemon, Podman, Buildah."""
    if requested not in ("auto", *ENGINES):
        raise MapImageError(f"unknown container engine {requested!r}; expected auto or one of {', '.join(ENGINES)}")
    for name in ENGINES if requested == "auto" else (requested,):
        if not shutil.which(name):
            continue
        if name == "docker" and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
            continue  # a client without a daemon
        return Engine(name, _storage_driver(name))
    wanted = "docker (with a daemon), podman or buildah" if requested == "auto" else requested
    raise MapImageError(f"no container engine: install {wanted}")


def _storage_driver(name: str) -> str | None:
    if name == "docker":
        return None
    field_name = "{{.Store.GraphDriverName}}" if name == "podman" else "{{.store.GraphDriverName}}"
    result = subprocess.run([name, "info", "--format", field_name], capture_output=True, text=True)
    return result.stdout.strip() or None if result.returncode == 0 else None


def build_image(spec: BuildSpec, engine: Engine, log: Path | None = None) -> dict:
    """Builds the image; returns its tag, engine, base, size in bytes and build seconds."""
    base = spec.base_image
    if base and base.startswith("localhost/") and not engine.image_exists(base):
        raise MapImageError(f"base image {base} is not in {engine.name}'s storage (make map-base builds it)")
    started = time.monotonic()
    with open(log or os.devnull, "w") as sink:
        result = subprocess.run(engine.build_argv(spec), stdout=sink, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        where = f"; see {log}" if log else ""
        raise MapBuildFailed(f"{engine.name} could not build {spec.tag} (exit {result.returncode}){where}")
    size = int(engine.inspect(spec.tag).get("Size", 0))
    return {
        "tag": spec.tag,
        "engine": engine.name,
        "storage": engine.storage_driver,
        "base": base or "Dockerfile default",
        "size_bytes": size,
        "build_seconds": round(seconds, 1),
    }


def run_map(
    image: str, study: Path, output: Path, engine: Engine, arguments: Sequence[str] = (), timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Runs the MAP on ``study`` into ``output`` (created if missing); returns the finished process."""
    if not study.is_dir():
        raise MapImageError(f"input study folder {study} does not exist")
    output.mkdir(parents=True, exist_ok=True)
    argv = engine.run_argv(image, study, output, arguments)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def pip_setting(key: str) -> list[str]:
    """The values this host's pip uses for ``key`` (``find-links``, ``cert``): ``PIP_<KEY>``, else pip's config."""
    found = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if found:
        return found.split()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        if name in (f"global.{key}", f"install.{key}"):
            return value.strip().strip("'\"").split()
    return []


def shared_memory() -> str:
    """``resources.sharedMemory`` of app.yaml (as pkg.json has it) in the engines' notation: ``1Gi`` -> ``1g``."""
    value = str(yaml.safe_load(APP_CONFIG.read_text())["resources"]["sharedMemory"])
    match = re.fullmatch(r"(\d+)\s*([KMG])i?", value, flags=re.IGNORECASE)
    if not match:
        raise MapImageError(f"app.yaml resources.sharedMemory {value!r} is not a size like 1Gi")
    return f"{match[1]}{match[2].lower()}"


def apt_mirror(root: Path = Path("/"), default: str = "http://deb.debian.org/debian") -> str:
    """The Debian mirror the apt of ``root`` uses (deb822 ``.sources`` or ``sources.list``), else ``default``."""
    for sources in sorted((root / "etc/apt/sources.list.d").glob("*.sources")):
        for entry in sources.read_text().split("\n\n"):
            fields = dict(re.findall(r"(?m)^(\w[\w-]*):\s*(.+)$", entry))
            if "security" not in fields.get("Suites", "security") and fields.get("URIs"):
                return fields["URIs"].split()[0]
    listing = root / "etc/apt/sources.list"
    for line in listing.read_text().splitlines() if listing.is_file() else []:
        match = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if match and "security" not in match[2]:
            return match[1]
    return default


def make_debian_base(
    engine: Engine, tag: str = DEBIAN_BASE, suite: str = "bookworm", mirror: str | None = None
) -> bool:
    """A minimal Debian image made with debootstrap (root only); returns False when ``tag`` already exists."""
    if engine.image_exists(tag):
        return False
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        raise MapImageError("making the Debian base needs root and debootstrap (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="mome-debian-") as work:
        rootfs = Path(work) / "rootfs"
        argv = ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror or apt_mirror()]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise MapBuildFailed(f"debootstrap {suite} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        _import_rootfs(engine, rootfs, tag)
    return True


def _import_rootfs(engine: Engine, rootfs: Path, tag: str) -> None:
    if engine.name == "buildah":
        container = subprocess.run(["buildah", "from", "scratch"], capture_output=True, text=True, check=True)
        name = container.stdout.strip()
        subprocess.run(["buildah", "copy", name, f"{rootfs}/.", "/"], capture_output=True, check=True)
        subprocess.run(["buildah", "commit", "--rm", name, tag], capture_output=True, check=True)
        return
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run([engine.name, "import", "-", tag], stdin=tar.stdout, capture_output=True, text=True)
    tar.wait()
    if imported.returncode != 0 or tar.returncode != 0:
        raise MapBuildFailed(f"{engine.name} import of the Debian base failed: {imported.stderr.strip()}")
