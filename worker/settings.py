"""The worker's settings: defaults, then a JSON configuration file, then the environment (credentials never on argv).

=================================  ==========================  =========================================================
environment                        configuration file key      meaning (default)
=================================  ==========================  =========================================================
``MOME_ORTHANC_URL``               ``orthanc_url``             the Orthanc REST API (``http://127.0.0.1:8042``)
``MOME_ORTHANC_USER``              ``orthanc_user``            HTTP basic auth user (none)
``MOME_ORTHANC_PASSWORD``          ``orthanc_password``        HTTP basic auth password (none)
``MOME_ORTHANC_CA_BUNDLE``         ``orthanc_ca_bundle``       CA certificates for an ``https`` URL (the system's)
``MOME_ORTHANC_TLS_VERIFY``        ``orthanc_tls_verify``      check the server's certificate (true)
``MOME_WORKER_FORWARD_TO``         ``forward_to``              an Orthanc modality (``DicomModalities``) results go to
``MOME_WORKER_JOBS``               ``jobs``                    studies segmented at the same time (1)
``MOME_WORKER_POLL_SECONDS``       ``poll_seconds``            wait between looks at the change feed (2)
``MOME_WORKER_MAX_ATTEMPTS``       ``max_attempts``            tries of a failing study before it is marked failed (3)
``MOME_WORKER_RETRY_SECONDS``      ``retry_seconds``           first wait before a retry, doubled each time (30)
``MOME_WORKER_PREVIOUS_RESULTS``   ``previous_results``        ``replace`` (delete) or ``keep`` a study's older results
``MOME_WORKER_APP_ARGS``           ``app_args``                more ``python -m app`` options, e.g. ``--mode plus``
=================================  ==========================  =========================================================

The configuration file is ``mome-worker --config FILE`` or ``$MOME_WORKER_CONFIG``; it may hold the credentials (keep
it readable by the service account only).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["PREVIOUS_RESULTS", "SettingsError", "WorkerSettings", "load_settings"]

PREVIOUS_RESULTS = ("replace", "keep")
ENV = {
    "orthanc_url": "MOME_ORTHANC_URL",
    "orthanc_user": "MOME_ORTHANC_USER",
    "orthanc_password": "MOME_ORTHANC_PASSWORD",
    "orthanc_ca_bundle": "MOME_ORTHANC_CA_BUNDLE",
    "orthanc_tls_verify": "MOME_ORTHANC_TLS_VERIFY",
    "forward_to": "MOME_WORKER_FORWARD_TO",
    "jobs": "MOME_WORKER_JOBS",
    "poll_seconds": "MOME_WORKER_POLL_SECONDS",
    "max_attempts": "MOME_WORKER_MAX_ATTEMPTS",
    "retry_seconds": "MOME_WORKER_RETRY_SECONDS",
    "previous_results": "MOME_WORKER_PREVIOUS_RESULTS",
    "app_args": "MOME_WORKER_APP_ARGS",
}
CONFIG_ENV = "MOME_WORKER_CONFIG"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting has a value the worker cannot use (the message names the setting and its source)."""


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker connects to and how it works (module docstring)."""

    orthanc_url: str = "http://127.0.0.1:8042"
    orthanc_user: str | None = None
    orthanc_password: str | None = field(default=None, repr=False)
    orthanc_ca_bundle: str | None = None
    orthanc_tls_verify: bool = True
    forward_to: str | None = None
    jobs: int = 1
    poll_seconds: float = 2.0
    max_attempts: int = 3
    retry_seconds: float = 30.0
    previous_results: str = "replace"
    app_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.orthanc_url.startswith(("http://", "https://")):
            raise SettingsError(f"orthanc_url {self.orthanc_url!r}: expected an http:// or https:// URL.")
        if self.previous_results not in PREVIOUS_RESULTS:
            raise SettingsError(f"previous_results {self.previous_results!r}: expected one of {PREVIOUS_RESULTS}.")
        for name in ("jobs", "max_attempts", "poll_seconds", "retry_seconds"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} = {getattr(self, name)!r}: expected a positive number.")
        if (self.orthanc_user is None) != (self.orthanc_password is None):
            raise SettingsError("orthanc_user and orthanc_password go together: set both or neither.")

    @property
    def verify(self) -> bool | str:
        """``requests``' ``verify``: the CA bundle, or whether to check certificates."""
        return self.orthanc_ca_bundle or self.orthanc_tls_verify

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.orthanc_user, self.orthanc_password) if self.orthanc_user and self.orthanc_password else None


def load_settings(config: Path | None = None, environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """Defaults, then ``config`` (or ``$MOME_WORKER_CONFIG``), then the environment.

    Raises:
        SettingsError: an unreadable configuration file, an unknown key or a bad value (named).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    if path is not None:
        values.update(_read_config(path))
    for name, variable in ENV.items():
        if environ.get(variable):
            values[name] = environ[variable]
    return replace(WorkerSettings(), **{name: _typed(name, value) for name, value in values.items()})


def _read_config(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SettingsError(f"{path}: not a readable JSON configuration ({error}).") from None
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: expected a JSON object of settings.")
    unknown = set(values) - {f.name for f in fields(WorkerSettings)}
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {sorted(unknown)}.")
    return values


def _typed(name: str, value: Any) -> Any:
    """``value`` (from JSON or a variable) as the field's type."""
    kind = {f.name: f.type for f in fields(WorkerSettings)}[name]
    try:
        if kind == "bool":
            return _boolean(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "tuple[str, ...]":
            return tuple(shlex.split(value) if isinstance(value, str) else map(str, value))
    except (TypeError, ValueError):
        raise SettingsError(f"{name} = {value!r}: expected {kind}.") from None
    return None if value is None else str(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in TRUE + FALSE:
        raise ValueError(text)
    return text in TRUE
