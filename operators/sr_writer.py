"""DICOM Structured Report (TID 1500 Measurement Report) with the lesion volume of a segmented series.

One Comprehensive 3D SR per SEG: a volumetric ROI (TID 1411) that references segment 1 ("Lesion") of the SEG, finding
"Lesion" at finding site "Brain", and the total lesion volume in mL, with the algorithm (model name and version)
and the device observer. PACS and viewers that read TID 1500 show the number next to the segmentation. Built with
highdicom; nothing about the patient is added beyond what highdicom copies from the referenced instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = ["MILLILITRE", "MR_BRAIN", "build_volume_sr"]

MILLILITRE = Code("mL", "UCUM", "milliliter")
MR_BRAIN = Code("24590-2", "LN", "MR Brain")


def build_volume_sr(
    seg: hd.seg.Segmentation,
    sources: Sequence[Any],
    volume_ml: float,
    model_name: str,
    model_version: str,
    segment_volumes: Sequence[tuple[int, str, float]] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of ``volume_ml`` for segment 1 of ``seg`` (whose source instances are ``sources``), or of
    each ``(segment number, name, volume in mL)`` of ``segment_volumes`` (one volumetric ROI group per segment)."""
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=model_version)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name=model_name[:64], manufacturer_name="MoME open-source project", model_name=model_version
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    groups = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=name[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=int(number),
                source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
            ),
            finding_type=codes.SCT.Lesion,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=float(ml), unit=MILLILITRE, algorithm_id=algorithm)
            ],
            algorithm_id=algorithm,
        )
        for number, name, ml in (segment_volumes or [(1, "Lesions", volume_ml)])
    ]
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=MR_BRAIN, imaging_measurements=groups
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=int(seg.SeriesNumber) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MoME open-source project",
        series_description=f"MoME lesion volume {model_version} - research use"[:64],
    )
    return sr
