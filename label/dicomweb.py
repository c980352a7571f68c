"""MONAI Label's DICOMweb datastore (a PACS such as Orthanc) with the operators' DICOM handling.

``monailabel start_server --app label --studies http://pacs/dicom-web`` serves the PACS's MR series: each image id is
a SeriesInstanceUID. MONAI Label's own DICOMweb datastore is kept for listing, caching and the labelled/unlabelled
bookkeeping; what touches pixels or geometry is the application's:

* a series is downloaded (WADO-RS) into the cache under names of our own (never the server's UIDs), all or nothing,
  and read with :mod:`operators.dicom_series` — geometry checked, not assumed; a series that fails the checks is
  answered with the reason. The image that clients download and that the tasks segment is that volume as NIfTI.
* its contrast comes from its headers through the operators' modality rules (:mod:`operators.modality_router`);
* MoME+ takes the study's other series, chosen per contrast as the application chooses them
  (:func:`operators.study.route_study`);
* a final label (a client's "submit label") is written as DICOM-SEG on the series' exact grid by the application's
  writer (:func:`operators.seg_writer.build_seg`, highdicom) and stored in the PACS (STOW-RS). The label must lie on
  the series grid (any axis order or flip of it): one that does not is refused, not resampled.

MONAI Label's listing filter defaults to CT; this app lists MR series unless ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``
names something else. Credentials: ``MONAI_LABEL_DICOMWEB_USERNAME`` / ``MONAI_LABEL_DICOMWEB_PASSWORD``.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from cachetools import TTLCache, cached
from dicomweb_client import DICOMwebClient
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.interfaces.datastore import DefaultLabelTag
from nibabel import orientations
from pydicom.dataset import Dataset

from app.nifti_io import save_nifti
from operators.dicom_series import MIN_SLICES, SeriesRejected, SeriesVolume, series_to_volume
from operators.limits import InputLimits, SeriesLimitExceeded
from operators.modality_router import SeriesHeader, classify, load_rules
from operators.seg_writer import build_seg, segments_for
from operators.study import route_study
from operators.study_loader import read_pixels, scan_studies
from operators.text import printable

__all__ = ["DicomSeries", "ImageNotFound", "MoMEDICOMwebDatastore", "label_on_grid", "series_channel_def"]

logger = logging.getLogger(__name__)
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64
MONAI_LABEL_DEFAULT_FILTER = {"Modality": "CT"}
MR_FILTER = {"Modality": "MR"}
GRID_TOLERANCE = 0.1  # largest distance between label and series voxel centres, as a fraction of the smallest voxel
UNPROCESSABLE = 422


class ImageNotFound(LookupError):
    """The image id is not a series of the PACS."""


@dataclass(frozen=True)
class DicomSeries:
    """A PACS series as the tasks see it: its NIfTI on the series grid, and what its headers say."""

    series_uid: str
    study_uid: str
    image: Path
    modality: str | None
    routing: dict[str, Any]
    frame_of_reference: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for a request (``image`` as a string)."""
        return {**self.__dict__, "image": str(self.image)}


class MoMEDICOMwebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore, reading and writing DICOM with the application's operators.

    Args:
        client: the DICOMweb client of the PACS.
        search_filter: QIDO-RS filter of the series listed (MONAI Label's CT default becomes MR).
        cache_path: the cache folder (default MONAI Label's, under the home folder).
        label_names: label value -> class name for each model, to name the segments of a label uploaded without
            names (the first whose values cover the label's).
    """

    def __init__(
        self,
        client: DICOMwebClient,
        search_filter: Mapping[str, Any],
        cache_path: str | None,
        label_names: Sequence[Mapping[int, str]] = (),
    ) -> None:
        search_filter = dict(search_filter)
        if search_filter == MONAI_LABEL_DEFAULT_FILTER:
            search_filter = dict(MR_FILTER)
        super().__init__(client, search_filter, cache_path, fetch_by_frame=False, convert_to_nifti=True)
        self.rules = load_rules()
        self.limits = InputLimits.from_env()
        self.label_names = [dict(names) for names in label_names]
        self._loading = threading.Lock()
        self._rejected: set[str] = set()

    # -- images ------------------------------------------------------------------------------------------------------

    def list_images(self) -> list[str]:
        """The listed series that can be a volume: not a UID we refuse, not a localizer-sized series (2 to 7
        instances), and not one whose checks failed already (so clients are never offered it)."""
        return [uid for uid in self._listed() if uid not in self._rejected]

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def _listed(self) -> list[str]:
        listed = []
        for item in self._client.search_for_series(search_filters=self._search_filter):
            ds = Dataset.from_json(item)
            uid, count = str(ds.get("SeriesInstanceUID", "")), ds.get("NumberOfSeriesRelatedInstances")
            if _is_uid(uid) and not (count and 1 < int(count) < MIN_SLICES):
                listed.append(uid)
        return listed

    def get_image_uri(self, image_id: str) -> str:
        """The series as NIfTI on its own grid (downloaded and converted on first use)."""
        return str(self.series(image_id).image)

    def series(self, image_id: str) -> DicomSeries:
        """The series ``image_id`` downloaded, checked and converted (cached), with its routing.

        Raises:
            ImageNotFound: ``image_id`` is not a UID or not a series of the PACS.
            SeriesRejected: the series is not one usable MR volume (the reason names the check).
        """
        series_uid = _checked_uid(image_id)
        with self._loading:
            try:
                folder = self._series_folder(series_uid)
                headers = _headers(folder, series_uid)
                image = Path(self._datastore.image_path()) / f"{series_uid}.nii.gz"
                if not image.is_file():
                    self._convert(folder, headers, series_uid)
            except SeriesRejected:
                self._rejected.add(series_uid)
                raise
        first = headers[0]
        header = SeriesHeader.from_dataset(first, n_instances=len(headers) if len(headers) > 1 else None)
        decision = classify(header, self.rules)
        routing = {**decision.to_dict(), "description": printable(decision.description)}
        reference = getattr(first, "FrameOfReferenceUID", None)
        study_uid = str(first.StudyInstanceUID)
        return DicomSeries(series_uid, study_uid, image, decision.modality, routing, str(reference or "") or None)

    def study_series(self, image_id: str, modalities: Sequence[str]) -> tuple[dict[str, DicomSeries], dict[str, str]]:
        """The series of ``image_id``'s study to segment together, one per contrast in ``modalities``.

        ``image_id`` stands for its own contrast; the others are chosen as the application chooses them. A series
        that fails its checks is left out (the next of its contrast is tried).

        Returns:
            The chosen series by contrast, and the series left out with the reason.
        """
        requested = self.series(image_id)
        listed = self._client.search_for_series(requested.study_uid, search_filters=dict(MR_FILTER))
        uids = [str(Dataset.from_json(item).get("SeriesInstanceUID", "")) for item in listed]
        uids = [uid for uid in uids if _is_uid(uid)]  # they name cache folders
        with self._loading:
            headers = {uid: _headers(self._series_folder(uid), uid) for uid in uids if uid != requested.series_uid}
        work = route_study(requested.study_uid, headers, self.rules, modalities)
        chosen = {requested.modality: requested} if requested.modality in modalities else {}
        left_out: dict[str, str] = {}
        for task in work.tasks:
            if task.modality in chosen:
                continue
            for candidate in [task, *task.alternatives]:
                try:
                    chosen[task.modality] = self.series(candidate.header.series_uid)
                    break
                except SeriesRejected as error:
                    left_out[candidate.header.series_uid] = str(error)
        return chosen, left_out

    def _series_folder(self, series_uid: str, parent: str | None = None) -> Path:
        """The series' cache folder (in ``parent``, default the image folder), downloaded first when absent (all
        instances or nothing)."""
        folder = Path(parent or self._datastore.image_path()) / series_uid
        if folder.is_dir():
            return folder
        matches = [
            Dataset.from_json(item)
            for item in self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        ]
        matches = [ds for ds in matches if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not matches:
            raise ImageNotFound(f"image {series_uid!r}: not a series of {self._client.base_url}.")
        study_uid = str(matches[0].StudyInstanceUID)
        declared = matches[0].get("NumberOfSeriesRelatedInstances")
        if declared is not None:  # a series over the limit is not downloaded
            self.limits.check("max_slices", int(declared), f"series {series_uid}", SeriesLimitExceeded)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
        try:
            for index, instance in enumerate(self._client.retrieve_series(study_uid, series_uid)):
                instance.save_as(staging / f"{index:05d}.dcm", write_like_original=False)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("series %s: downloaded", series_uid)
        return folder

    def _volume_of(self, series_uid: str) -> SeriesVolume:
        """The series' checked volume, from its cache folder (downloaded first when absent)."""
        with self._loading:
            headers = _headers(self._series_folder(series_uid), series_uid)
        return _volume(headers, series_uid)

    def _convert(self, folder: Path, headers: list[Any], series_uid: str) -> None:
        """Checks the series' geometry and adds it to the local datastore as NIfTI (MONAI Label's bookkeeping)."""
        volume = _volume(headers, series_uid)
        with tempfile.TemporaryDirectory(dir=folder.parent) as staging:
            converted = Path(staging) / f"{series_uid}.nii.gz"
            save_nifti(volume.array, volume.affine, converted)
            LocalDatastore.add_image(self, series_uid, str(converted), _series_info(headers[0]))

    # -- labels ------------------------------------------------------------------------------------------------------

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label file on the image grid. A final label not saved here (a DICOM-SEG another tool stored in the PACS,
        ``label_id`` its SeriesInstanceUID) is read with highdicom onto the series grid; the one saved here wins."""
        local = LocalDatastore.get_label_uri(self, image_id or label_id, label_tag)
        if label_tag != DefaultLabelTag.FINAL or not image_id or (local and Path(local).is_file()):
            return local
        series = self.series(image_id)
        volume = self._volume_of(series.series_uid)
        with self._loading:
            seg_folder = self._series_folder(_checked_uid(label_id), self._datastore.label_path(label_tag))
        labels = _seg_on_grid(_headers(seg_folder, label_id), volume, label_id)
        with tempfile.TemporaryDirectory(dir=seg_folder.parent) as staging:
            converted = Path(staging) / f"{series.series_uid}.nii.gz"
            save_nifti(labels, volume.affine, converted)
            info = {"SeriesInstanceUID": label_id, "ReferencedSeriesInstanceUID": series.series_uid, "from": "PACS"}
            LocalDatastore.save_label(self, series.series_uid, str(converted), label_tag, info)
        logger.info("series %s: final label read from DICOM-SEG %s", series.series_uid, label_id)
        return LocalDatastore.get_label_uri(self, series.series_uid, label_tag)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """The labelled series (final labels, from the PACS too), each with its contrast from its headers."""
        items = super().datalist(full_path)
        for item in items:
            try:
                item["modality"] = self.series(_image_id(item["image"])).modality
            except (ImageNotFound, SeriesRejected) as error:
                item["modality_error"] = str(error)
        return items

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """Keeps the label in the cache, and stores a final label in the PACS as DICOM-SEG on the series grid."""
        series = self.series(image_id)
        converted = ""
        if label_filename.endswith(".bin"):  # OHIF sends a raw label on the image grid
            converted = label_filename = binary_to_image(str(series.image), label_filename)
        try:
            info = dict(label_info)
            if label_tag == DefaultLabelTag.FINAL:
                info.update(self._store_seg(series, Path(label_filename), info))
            return LocalDatastore.save_label(self, series.series_uid, label_filename, label_tag, info)
        finally:
            if converted:
                Path(converted).unlink(missing_ok=True)

    def _store_seg(self, series: DicomSeries, label_file: Path, label_info: Mapping[str, Any]) -> dict[str, Any]:
        """Writes the label as DICOM-SEG on the series' source instances and stores it in the PACS (STOW-RS)."""
        volume = self._volume_of(series.series_uid)
        labels = label_on_grid(label_file, volume)
        channel_def = series_channel_def(labels, label_info, self.label_names)
        try:
            seg = build_seg(
                volume, labels, "MoME", _version(label_info), segments_for(channel_def), reviewed_in="MONAI Label"
            )
        except ValueError as error:
            raise HTTPException(UNPROCESSABLE, f"label of series {series.series_uid}: {error}") from None
        self._client.store_instances([seg])
        logger.info("series %s: label stored as DICOM-SEG %s", series.series_uid, seg.SeriesInstanceUID)
        return {
            "SeriesInstanceUID": str(seg.SeriesInstanceUID),
            "SOPInstanceUID": str(seg.SOPInstanceUID),
            "StudyInstanceUID": series.study_uid,
            "ReferencedSeriesInstanceUID": series.series_uid,
            "segments": {name: int(value) for value, name in channel_def.items() if name != "background"},
        }


def _is_uid(value: object) -> bool:
    """Whether ``value`` is a DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(value, str) and len(value) <= UID_MAX_LENGTH and UID.match(value) is not None


def _checked_uid(image_id: str) -> str:
    """``image_id`` when it is a DICOM UID (it names cache folders: nothing else may)."""
    if not _is_uid(image_id):
        raise ImageNotFound(f"image {str(image_id)[:80]!r}: not a SeriesInstanceUID.")
    return image_id


def _image_id(path: str) -> str:
    """The image id (SeriesInstanceUID) of a datastore image file ``<uid>.nii.gz``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(path).stem


def _seg_on_grid(headers: list[Any], volume: SeriesVolume, seg_uid: str) -> np.ndarray:
    """A DICOM-SEG's segments as a label map (segment numbers) on the series grid; 422 when it is not on it."""
    import highdicom as hd

    if len(headers) != 1:
        raise HTTPException(UNPROCESSABLE, f"DICOM-SEG series {seg_uid}: expected one instance, got {len(headers)}.")
    try:
        seg = hd.seg.Segmentation.from_dataset(_segment_per_frame(pydicom.dcmread(headers[0].filename)))
        if volume.frames is None:
            uids = [str(ds.SOPInstanceUID) for ds in volume.instances]
            frames = seg.get_pixels_by_source_instance(uids, combine_segments=True)
        else:
            numbers = [int(frame) + 1 for frame in volume.frames]
            frames = seg.get_pixels_by_source_frame(
                str(volume.instances[0].SOPInstanceUID), numbers, combine_segments=True
            )
    except (ValueError, KeyError, AttributeError) as error:
        raise HTTPException(
            UNPROCESSABLE, f"DICOM-SEG series {seg_uid}: not a label map of series {volume.series_uid} ({error})."
        ) from None
    return np.ascontiguousarray(np.asarray(frames).transpose(2, 1, 0)).astype(np.uint8)


def _segment_per_frame(ds: Dataset) -> Dataset:
    """The SEG with its Segment Identification in every frame's functional groups.

    A SEG with one segment may keep it in the shared groups (highdicom 0.23 and later write it so); the highdicom
    that runs with pydicom 2 (0.22) reads it per frame only. The meaning is the same.
    """
    shared = (getattr(ds, "SharedFunctionalGroupsSequence", None) or [None])[0]
    if shared is None or "SegmentIdentificationSequence" not in shared:
        return ds
    for frame in ds.PerFrameFunctionalGroupsSequence:
        if "SegmentIdentificationSequence" not in frame:
            frame.SegmentIdentificationSequence = copy.deepcopy(shared.SegmentIdentificationSequence)
    del shared.SegmentIdentificationSequence
    return ds


def _headers(folder: Path, series_uid: str) -> list[Any]:
    """The headers of the series' instances in ``folder`` (pixels not read)."""
    found = scan_studies(folder).studies
    instances = [ds for study in found.values() for uid, series in study.items() if uid == series_uid for ds in series]
    if not instances:
        raise SeriesRejected(f"series {series_uid}: the PACS sent no image instance of it.")
    return instances


def _volume(headers: list[Any], series_uid: str) -> SeriesVolume:
    """The checked volume of the series (:func:`operators.dicom_series.series_to_volume`)."""
    return series_to_volume(read_pixels(headers, f"series {series_uid}"))


def _series_info(ds: Any) -> dict[str, Any]:
    """What MONAI Label shows about a series: UIDs, modality, number and description (no patient identifiers)."""
    return {
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "Modality": str(getattr(ds, "Modality", "") or "UNK"),
        "SeriesNumber": str(getattr(ds, "SeriesNumber", "") or ""),
        "SeriesDescription": printable(str(getattr(ds, "SeriesDescription", "") or "")),
    }


def _version(label_info: Mapping[str, Any]) -> str:
    """The bundle version that made the label, when the label came from an inference; else ``unknown``."""
    bundle = (label_info.get("params") or {}).get("bundle") or {}
    return str(bundle.get("version") or "unknown")


def label_on_grid(label_file: Path, volume: SeriesVolume) -> np.ndarray:
    """The label map of ``label_file`` on the series grid, as uint8 (X, Y, Z) like ``volume.array``.

    The label may store the grid in another axis order or direction (3D Slicer writes RAS); it is reordered, never
    resampled. A label on another grid, with non-integer or negative values is refused (422).
    """
    from monai.transforms import LoadImage  # NIfTI and NRRD (ITK), affine in RAS

    try:
        image = LoadImage(image_only=True)(str(label_file))
    except Exception as error:  # the readers raise several types for corrupt files
        raise HTTPException(UNPROCESSABLE, f"label: cannot be read ({type(error).__name__}).") from None
    data = np.asarray(image).squeeze()
    affine = np.asarray(image.affine, dtype=np.float64)
    if data.ndim != 3:
        raise HTTPException(UNPROCESSABLE, f"label: expected one 3-D label map, got shape {data.shape}.")
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.io_orientation(volume.affine)
    )
    reordered = orientations.apply_orientation(data, transform)
    reordered_affine = affine @ orientations.inv_ornt_aff(transform, data.shape)
    if reordered.shape != volume.array.shape or _grid_distance(reordered_affine, volume) > GRID_TOLERANCE:
        raise HTTPException(
            UNPROCESSABLE,
            f"label: not on the grid of series {volume.series_uid} ({reordered.shape} vs {volume.array.shape}); "
            "export it on the image's geometry (it is never resampled).",
        )
    if not np.all(np.isfinite(reordered)) or (reordered < 0).any() or not np.all(reordered == np.round(reordered)):
        raise HTTPException(UNPROCESSABLE, "label: values must be non-negative integers.")
    return reordered.astype(np.uint8)


def _grid_distance(affine: np.ndarray, volume: SeriesVolume) -> float:
    """Largest distance between the two grids' corner voxel centres, in units of the smallest voxel size."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in volume.array.shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    distance = np.linalg.norm((affine - volume.affine)[:3] @ corners, axis=0).max()
    return float(distance / np.linalg.norm(volume.affine[:3, :3], axis=0).min())


def series_channel_def(
    labels: np.ndarray, label_info: Mapping[str, Any], known: Sequence[Mapping[int, str]]
) -> dict[str, str]:
    """The classes of a label map (value -> name) for its DICOM-SEG segments.

    Names come from the label's info: an inference's ``params.label_names`` (name -> value), or a client's
    ``label_info`` list (3D Slicer: segment names in label-value order); else from the first of the models'
    classes (``known``) that covers the label's values.
    """
    names = (label_info.get("params") or {}).get("label_names")
    if names:
        by_value = {int(value): str(name) for name, value in names.items()}
    elif label_info.get("label_info"):
        by_value = {
            index + 1: str(item.get("name") or f"segment {index + 1}")
            for index, item in enumerate(label_info["label_info"])
        }
    else:
        present = {int(v) for v in np.unique(labels)} - {0}
        by_value = next(
            (dict(k) for k in known if present <= set(k)),
            {v: f"segment {v}" for v in range(1, max(present, default=1) + 1)},
        )
    return {"0": "background", **{str(value): name for value, name in sorted(by_value.items())}}
