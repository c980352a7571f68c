"""The MoME inference stage: every chosen series of a study -> its label map on the series' own grid, or a rejection.

Single-contrast series go to MoME one by one. MoME+ (``mode`` ``plus``, or ``auto`` with a MoME+ model and at least
two of its modalities in the study): the chosen T1, T1ce, T2 and FLAIR series are segmented together; the result lies
on the reference series (the finest grid, :data:`PLUS_REFERENCE_ORDER` breaking ties) and its SEG references every
contributing series. Other series (DWI) still go to single-contrast MoME.

A series that fails its checks (DICOM geometry, limits, the volume or registration checks of the bundle) is recorded
as rejected and the next series of its contrast is tried (``SeriesTask.alternatives``); a MoME+ reference whose
registration fails is replaced, or the group is segmented again without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from operators import bundle
from operators.dicom_series import SeriesRejected, SeriesVolume, series_to_volume
from operators.limits import InputLimits
from operators.study import MODES, Mode, PlusSegmenter, Progress, Segmenter, SeriesTask, StudyWork
from operators.study_loader import read_pixels
from operators.text import printable

__all__ = ["PLUS_REFERENCE_ORDER", "segment_study"]

# Reference series of a MoME+ group: the finest grid (smallest voxel), ties broken in this order.
PLUS_REFERENCE_ORDER = ("t1ce", "t1", "flair", "t2")
logger = logging.getLogger(__name__)


def segment_study(
    work: StudyWork,
    segmenter: Segmenter | None,
    say: Progress | None = None,
    plus_segmenter: PlusSegmenter | None = None,
    mode: Mode = "auto",
    limits: InputLimits | None = None,
) -> StudyWork:
    """Runs MoME on every chosen series (and MoME+ on a group of them, see the module docstring); a series that
    cannot become a volume, or is over one of the ``limits`` (default :meth:`InputLimits.from_env`), is recorded as
    rejected.

    ``segmenter`` may be ``None`` when the bundle holds only a MoME+ model: series MoME+ cannot take are then
    recorded as not segmented, with that reason.
    """
    say = say or (lambda _: None)
    limits = limits or InputLimits.from_env()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if segmenter is None and plus_segmenter is None:
        raise ValueError("segment_study needs a segmenter or a MoME+ segmenter, got neither.")
    work.model = (segmenter or plus_segmenter).describe()
    group = _plus_group(work.tasks, plus_segmenter, mode if segmenter is not None else "plus")
    for task in work.tasks:
        if task.in_plus_group:
            continue
        if segmenter is None:
            reason = f"{task.name}: the bundle has no single-modality MoME model for {task.modality}"
            work.entries[task.header.series_uid] = {"modality": task.modality, "rejected": reason}
            continue
        done = _segment_with_fallback(work, task, segmenter, say, limits)
        if done is not None and done is not task:
            work.tasks[work.tasks.index(task)] = done
    if group and plus_segmenter is not None:
        work.model["mome_plus"] = plus_segmenter.describe()
        _segment_plus(work, group, plus_segmenter, say, limits)
    return work


def _load(task: SeriesTask, limits: InputLimits) -> None:
    started = time.perf_counter()
    task.volume = series_to_volume(read_pixels(task.instances, task.name, limits))
    task.seconds["dicom_load"] = time.perf_counter() - started


def _segment_task(task: SeriesTask, segmenter: Segmenter, say: Progress, limits: InputLimits) -> None:
    _load(task, limits)
    assert task.volume is not None
    task.segmentation = segmenter.segment(
        task.volume.array, task.volume.affine, name=task.name, modality=task.modality, progress=say
    )
    task.seconds.update(task.segmentation.seconds)


def _rejections() -> tuple[type[Exception], ...]:
    """The errors that reject one series: its DICOM checks and the bundle's volume and registration checks."""
    return (SeriesRejected, *bundle.rejections())


def _reject(work: StudyWork, task: SeriesTask, error: Exception, say: Progress, fallback: SeriesTask | None) -> None:
    """Records why ``task``'s series was not segmented (and which series of its modality is tried instead)."""
    say(f"{task.name} rejected: {printable(error, None)}")
    logger.info("%s rejected: %s", task.name, printable(error, None))
    entry: dict = {"modality": task.modality, "rejected": printable(error, None)}
    if fallback is not None:
        entry["fallback_series"] = fallback.header.series_uid
        say(f"falling back to {fallback.name} for {task.modality}")
        for decision in work.decisions:
            if decision["series_uid"] == fallback.header.series_uid:
                decision.update(selected=True, fallback_for=task.header.series_uid)
                decision.pop("not_selected", None)
    work.entries[task.header.series_uid] = entry


def _segment_with_fallback(
    work: StudyWork, task: SeriesTask, segmenter: Segmenter, say: Progress, limits: InputLimits
) -> SeriesTask | None:
    """Segments ``task``'s series or, when it fails its checks, the next of its ``alternatives``; returns the task
    that was segmented (None: every candidate was rejected, each with its reason in ``work.entries``)."""
    candidates = [task, *task.alternatives]
    for index, candidate in enumerate(candidates):
        say(f"study {work.study_uid}: {candidate.modality} {candidate.name}")
        logger.info("study %s: segmenting %s %s", work.study_uid, candidate.modality, candidate.name)
        try:
            _segment_task(candidate, segmenter, say, limits)
            return candidate
        except _rejections() as error:
            fallback = candidates[index + 1] if index + 1 < len(candidates) else None
            _reject(work, candidate, error, say, fallback)
    return None


def _plus_group(tasks: Sequence[SeriesTask], plus_segmenter: PlusSegmenter | None, mode: Mode) -> dict[str, SeriesTask]:
    """The first chosen series of each MoME+ modality, when MoME+ runs for this study (marks them)."""
    if plus_segmenter is None or mode == "single":
        return {}
    group: dict[str, SeriesTask] = {}
    for task in tasks:
        if task.modality in plus_segmenter.modalities and task.modality not in group:
            group[task.modality] = task
    if len(group) < (1 if mode == "plus" else 2):
        return {}
    for task in group.values():
        task.in_plus_group = True
    return group


def _load_plus_channel(
    work: StudyWork, candidates: list[SeriesTask], say: Progress, limits: InputLimits
) -> SeriesTask | None:
    """Loads and checks the first of ``candidates`` (one modality, preferred first) that passes; rejected ones are
    recorded and removed from the list, the loaded one too. None: no candidate is left."""
    while candidates:
        task = candidates.pop(0)
        try:
            _load(task, limits)
            assert task.volume is not None
            bundle.validate_volume(task.volume.array, task.volume.affine, task.name)
        except _rejections() as error:
            _reject(work, task, error, say, candidates[0] if candidates else None)
            continue
        task.in_plus_group = True
        return task
    return None


def _segment_plus(
    work: StudyWork, group: dict[str, SeriesTask], plus_segmenter: PlusSegmenter, say: Progress, limits: InputLimits
) -> None:
    """MoME+ on the group; a series that fails its checks falls back to the next of its modality, and a reference
    series whose registration fails is rejected and the group is segmented again without it."""
    remaining = {modality: [task, *task.alternatives] for modality, task in group.items()}
    loaded: dict[str, SeriesTask] = {}
    for modality, candidates in remaining.items():
        _add_plus_channel(work, loaded, modality, _load_plus_channel(work, candidates, say, limits), group)
    while loaded:
        reference = min(loaded, key=lambda m: (_voxel_volume(loaded[m]), PLUS_REFERENCE_ORDER.index(m)))
        say(f"study {work.study_uid}: MoME+ on {', '.join(loaded)} (reference {reference})")
        logger.info("study %s: MoME+ on %s (reference %s)", work.study_uid, ", ".join(loaded), reference)
        try:
            _run_plus(work, loaded, reference, plus_segmenter, say)
            return
        except _rejections() as error:
            failed = loaded.pop(reference)
            replacement = remaining[reference][0] if remaining[reference] else None
            _reject(work, failed, error, say, replacement)
            _add_plus_channel(
                work, loaded, reference, _load_plus_channel(work, remaining[reference], say, limits), group
            )


def _add_plus_channel(
    work: StudyWork,
    loaded: dict[str, SeriesTask],
    modality: str,
    task: SeriesTask | None,
    group: dict[str, SeriesTask],
) -> None:
    """Puts a loaded MoME+ channel in place of its modality's original task (``work.tasks`` lists what was run)."""
    if task is None:
        return
    original = group[modality]
    if task is not original and original in work.tasks:
        work.tasks[work.tasks.index(original)] = task
    elif task is not original:
        work.tasks.append(task)
    loaded[modality] = task


def _run_plus(
    work: StudyWork, loaded: dict[str, SeriesTask], reference: str, plus_segmenter: PlusSegmenter, say: Progress
) -> None:
    """One MoME+ run on the loaded channels; records every contributing series (raises the segmenter's rejection)."""
    channels = {}
    for modality, task in loaded.items():
        assert task.volume is not None
        volume = task.volume
        channels[modality] = bundle.plus_channel(volume.array, volume.affine, _frame_of_reference(volume), task.name)
    ref_task = loaded[reference]
    result = plus_segmenter.segment_channels(channels, reference, say)
    ref_task.segmentation, ref_task.mome_plus = result, True
    ref_task.seconds.update(result.seconds)
    ref_task.plus_sources = [task for modality, task in loaded.items() if modality != reference]
    for task in ref_task.plus_sources:
        task.plus_reference = ref_task.header.series_uid
        key = "excluded_from_mome_plus" if task.modality in result.excluded else "used_in_mome_plus"
        work.entries[task.header.series_uid] = {
            "modality": task.modality,
            key: ref_task.header.series_uid,
            "coregistration": result.coregistration[task.modality].to_dict(),
        }


def _voxel_volume(task: SeriesTask) -> float:
    assert task.volume is not None
    return bundle.voxel_ml(task.volume.affine)


def _frame_of_reference(volume: SeriesVolume) -> str | None:
    value = getattr(volume.instances[0], "FrameOfReferenceUID", None)  # an optional DICOM attribute
    return str(value) if value else None
