"""A real DICOM server: the source series, our SEG and volume SR go into Orthanc by C-STORE and come back over DICOMweb.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) runs on loopback ports for this module only; ``.ci/run`` installs
it. Skipped where Orthanc is not installed.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from servers import ORTHANC_MISSING, running_orthanc

pytestmark = pytest.mark.skipif(ORTHANC_MISSING, reason="Orthanc with its DICOMweb plugin is not installed")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _c_store(port: int, paths: list[Path]) -> list[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Comprehensive3DSRStorage, MRImageStorage, SegmentationStorage

    ae = AE(ae_title="MOMETEST")
    for sop_class in (MRImageStorage, SegmentationStorage, Comprehensive3DSRStorage):
        ae.add_requested_context(sop_class)
    association = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert association.is_established
    try:
        return [int(association.send_c_store(pydicom.dcmread(path)).Status) for path in paths]
    finally:
        association.release()


def test_seg_round_trips_through_orthanc(orthanc, study, tiny_bundle, tmp_path):
    from dicomweb_client.api import DICOMwebClient
    from test_dicom_pipeline import _BrightnessOracle

    from app.dicom_pipeline import run_dicom
    from scripts.pipeline import MoMESegmenter

    folder, _, study_uid = study
    segmenter = MoMESegmenter(tiny_bundle, device="cpu")
    segmenter.network = _BrightnessOracle()
    (report,) = run_dicom(folder, tmp_path / "out", segmenter, modalities=["flair"])
    (entry,) = report["segmented"].values()
    seg_path = tmp_path / "out" / study_uid / entry["seg"]["file"]
    sources = sorted((folder / "flair").rglob("*.dcm"))
    sr_path = seg_path.parent / entry["sr"]["file"]
    assert set(_c_store(orthanc["dicom_port"], [*sources, seg_path, sr_path])) == {0}  # 0x0000: success

    client = DICOMwebClient(url=f"{orthanc['url']}/dicom-web")
    segs = client.search_for_series(study_uid, search_filters={"Modality": "SEG"})
    assert [s["0020000E"]["Value"][0] for s in segs] == [entry["seg"]["series_instance_uid"]]
    (mr,) = client.search_for_series(study_uid, search_filters={"Modality": "MR"})
    assert mr["00201209"]["Value"][0] == len(sources)  # NumberOfSeriesRelatedInstances
    (retrieved,) = client.retrieve_series(study_uid, entry["seg"]["series_instance_uid"])
    seg = hd.seg.Segmentation.from_dataset(retrieved)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == mr["0020000E"]["Value"][0]
    np.testing.assert_array_equal(seg.pixel_array, hd.seg.segread(seg_path).pixel_array)
    (sr_series,) = client.search_for_series(study_uid, search_filters={"Modality": "SR"})
    (report_sr,) = client.retrieve_series(study_uid, sr_series["0020000E"]["Value"][0])
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(report_sr).content.get_volumetric_roi_measurement_groups()
    assert group.get_measurements()[0].value == pytest.approx(entry["lesion_volume_ml"])
