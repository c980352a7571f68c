"""What travels through the DICOM graph: a study's routing decisions, its chosen series and their segmentations.

A :class:`StudyWork` is made by :func:`route_study` (the modality router's core) and passed from stage to stage
(``mome_inference`` -> ``seg_writer`` -> ``report_writer``); each stage adds what it knows. Expected problems (a
series that cannot become a volume, a study with nothing to segment) are recorded in it, never raised mid-graph;
:func:`operators.report_writer.commit` decides at the end whether anything is written.

The segmenters are typed by what the stages call (:class:`Segmenter`, :class:`PlusSegmenter`) and return
(:class:`Segmentation`, :class:`PlusSegmentation`), so the bundle's own classes (``scripts.pipeline``), a remote
model or a test's stand-in can be used alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, get_args

import numpy as np

from operators.dicom_series import SeriesVolume
from operators.modality_router import MODALITIES, SeriesHeader, choose, classify
from operators.text import printable

__all__ = [
    "DEVICES",
    "MODES",
    "Mode",
    "NothingToSegment",
    "PlusSegmentation",
    "PlusSegmenter",
    "Progress",
    "Segmentation",
    "Segmenter",
    "SeriesTask",
    "StudyWork",
    "route_study",
]

Progress = Callable[[str], None]
Mode = Literal["auto", "single", "plus"]
# auto: a study's T1/T1ce/T2/FLAIR series go to MoME+ together when the bundle has it and the study has at least two
# of them; plus: always MoME+ for those series; single: one MoME run per series.
MODES: tuple[str, ...] = get_args(Mode)
DEVICES = ("cpu", "cuda")  # where the models run (default: cuda when available)
logger = logging.getLogger(__name__)


class NothingToSegment(ValueError):
    """No series of the input could be segmented; the message lists why."""


class Recordable(Protocol):
    """A registration or co-registration record (``scripts.registration.Registration``, ``CoRegistration``)."""

    def to_dict(self) -> dict[str, Any]: ...


class Segmentation(Protocol):
    """A single-contrast result on the series' own grid (``scripts.pipeline.NativeSegmentation``)."""

    labels: np.ndarray
    registration: Recordable
    mome_image: np.ndarray  # the registered, brain-masked image on the MoME grid
    mome_labels: np.ndarray  # its labels on the MoME grid
    mome_affine: np.ndarray
    seconds: dict[str, float]
    inference: dict[str, Any]


class PlusSegmentation(Segmentation, Protocol):
    """A MoME+ result on the reference series' grid (``scripts.pipeline.PlusSegmentation``)."""

    reference: str
    availability: dict[str, bool]
    channel_def: dict[str, str]
    excluded: dict[str, str]
    coregistration: Mapping[str, Recordable]


class Segmenter(Protocol):
    """Single-contrast MoME: a native-space volume -> its label map (``scripts.pipeline.MoMESegmenter``).

    ``segment`` raises the bundle's ``VolumeRejected`` for a volume that fails its checks (that series is skipped and
    the next one of its modality tried) and ``ValueError`` for input it cannot handle at all (the run is rejected).
    """

    channel_def: dict[str, str]  # label value -> class name (the bundle's output channel_def)

    def segment(
        self, array: np.ndarray, affine: np.ndarray, name: str, modality: str | None, progress: Progress | None
    ) -> Segmentation: ...

    def describe(self) -> dict[str, Any]: ...


class PlusSegmenter(Protocol):
    """MoME+: co-registered T1/T1ce/T2/FLAIR of a study -> tumour sub-regions (``scripts.pipeline.MoMEPlusSegmenter``).

    ``channels`` maps modality -> ``scripts.pipeline.PlusChannel`` (made by :func:`operators.bundle.plus_channel`).
    """

    modalities: Sequence[str]
    channel_def: dict[str, str]  # label value -> class name (the bundle's MoME+ output channel_def)

    def segment_channels(
        self, channels: Mapping[str, Any], reference: str, progress: Progress | None
    ) -> PlusSegmentation: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class SeriesTask:
    """One series the router chose, its instances (headers or full datasets) and, once segmented, the results."""

    modality: str
    header: SeriesHeader
    instances: list[Any]
    volume: SeriesVolume | None = None
    segmentation: Segmentation | None = None  # a PlusSegmentation when ``mome_plus``
    mome_plus: bool = False  # segmented by MoME+ (this is the group's reference series)
    seconds: dict[str, float] = field(default_factory=dict)
    plus_sources: list[SeriesTask] = field(default_factory=list)  # MoME+ reference: the other contributing series
    plus_reference: str | None = None  # MoME+ contributor: SeriesInstanceUID of the reference series
    in_plus_group: bool = False
    alternatives: list[SeriesTask] = field(default_factory=list)  # next candidates of this modality, preferred first

    @property
    def name(self) -> str:
        """How messages name the series (by UID: never by patient data)."""
        return f"series {self.header.series_uid}"

    @property
    def plus_segmentation(self) -> PlusSegmentation:
        """The MoME+ result of a group's reference series.

        Raises:
            ValueError: the series was not segmented by MoME+.
        """
        if not self.mome_plus or self.segmentation is None:
            raise ValueError(f"{self.name}: not segmented by MoME+.")
        return cast(PlusSegmentation, self.segmentation)


@dataclass
class StudyWork:
    """Everything the stages know about one study; ``entries`` become the report's per-series ``segmented``."""

    study_uid: str
    decisions: list[dict[str, Any]]
    tasks: list[SeriesTask]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped_files: int = 0
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def segmented_series(self) -> int:
        return sum("seg" in entry for entry in self.entries.values())


def route_study(
    study_uid: str,
    series: Mapping[str, Sequence[Any]],
    rules: Sequence[dict[str, Any]],
    modalities: Sequence[str] = MODALITIES,
    all_series: bool = False,
) -> StudyWork:
    """Classifies every series of a study (``series``: SeriesInstanceUID -> instances) and picks what to segment.

    Each decision records ``selected`` and, for a supported series that is not segmented, ``not_selected`` (its
    modality was not requested, or another series of that modality is preferred). Without ``all_series`` each task
    keeps the other series of its modality, preferred first, as ``alternatives``: when the chosen series fails its
    checks, :func:`operators.mome_inference.segment_study` falls back to the next one.
    """
    routed, by_uid = [], {}
    for series_uid, instances in sorted(series.items()):
        # one Enhanced (multi-frame) instance counts its frames
        header = SeriesHeader.from_dataset(instances[0], n_instances=len(instances) if len(instances) > 1 else None)
        routed.append((header, classify(header, rules)))
        by_uid[series_uid] = instances
    ranked = choose(routed, modalities, all_series=True)
    chosen = {modality: headers if all_series else headers[:1] for modality, headers in ranked.items()}
    selected = {header.series_uid for headers in chosen.values() for header in headers}
    decisions = []
    for header, decision in routed:
        record = {**decision.to_dict(), "instances": len(by_uid[header.series_uid])}
        record["description"] = printable(record["description"])
        record["selected"] = header.series_uid in selected
        if decision.modality and not record["selected"]:
            requested = decision.modality in modalities
            record["not_selected"] = "another series preferred" if requested else "modality not requested"
        decisions.append(record)
    tasks = []
    for modality, headers in sorted(chosen.items()):
        for header in headers:
            task = SeriesTask(modality, header, list(by_uid[header.series_uid]))
            if not all_series:
                task.alternatives = [SeriesTask(modality, h, list(by_uid[h.series_uid])) for h in ranked[modality][1:]]
            tasks.append(task)
    logger.info("study %s: %d series, %d chosen", study_uid, len(decisions), len(tasks))
    return StudyWork(study_uid, decisions, tasks)
