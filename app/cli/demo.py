"""``make demo`` (``python -m app.cli.demo``): the Deploy application on the embedded demo DICOM study.

Prints what it found and where it wrote.

Steps: (1) the model — the bundle's demo weights when ``bundle/models/model.pt`` exists, otherwise the authors'-format
checkpoint fixture (``tests/data/upstream_mome_tiny``: the authors' code with *random* weights) converted with
``mome-convert``, which shows the mechanics only; (2) the demo study (``app.demo_study``: one synthetic subject on
MNI152 anatomy, T1/T1ce/T2/FLAIR/DWI series on oblique grids plus a localizer and an ADC map); (3) the application
graph (``python -m app``), then a table of every series: the router's decision, the lesion volume, and the Dice of the
DICOM-SEG read back against the generator's truth. Outputs: ``.demo/output/<StudyInstanceUID>/``.

Synthetic-data demo only: clinical use needs the authors' weights (``mome-convert``) or your own training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom

from app.api import segment_study
from app.cli.exit_codes import ExitCode, fail
from operators.bundle import default_bundle_dir, use_bundle_scripts

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_FIXTURE = REPO / "tests" / "data" / "upstream_mome_tiny"


def demo_bundle(workdir: Path) -> tuple[Path, str]:
    """The bundle to run and a note on its weights."""
    bundle = default_bundle_dir()
    if (bundle / "models" / "model.pt").is_file():
        plus = " (MoME and MoME+)" if (bundle / "models" / "model_plus.pt").is_file() else ""
        return bundle, f"the bundle's synthetic-data demo weights{plus}"
    converted = workdir / "bundle"
    if not (converted / "models" / "model.pt").is_file():
        command = [sys.executable, "-m", "app.cli_convert", str(UPSTREAM_FIXTURE), "--out", str(converted), "--force"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return converted, "RANDOM weights (authors'-format fixture; no trained weights installed) - mechanics only"


def _seg_dice(seg_path: Path, series_folder: Path, truth_path: Path) -> float:
    """Dice of a SEG against the truth, frames matched to source instances by SOPInstanceUID (no geometry assumed)."""
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_folder.glob("*.dcm"))]
    seg = hd.seg.segread(seg_path)
    frames = [
        seg.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True)[0]
        for ds in sources
    ]
    labels = np.stack(frames).transpose(2, 1, 0) > 0  # files are slice k = IMG k+1; frames are (rows, cols)
    truth = np.asarray(nib.load(truth_path).dataobj) > 0
    denominator = labels.sum() + truth.sum()
    return float(2 * (labels & truth).sum() / denominator) if denominator else 1.0


def summary_table(report: dict[str, Any], study: dict[str, Any], workdir: Path, output: Path) -> str:
    truth = {info["series_uid"]: (modality, info["label"]) for modality, info in study["series"].items()}
    rows = [f"{'#':>3}  {'series':<22} {'routed':<8} {'rule / reason':<34} {'lesion mL':>9} {'n':>3} {'Dice':>5}"]
    for decision in sorted(report["series"], key=lambda d: d["series_number"] or 0):
        entry = report["segmented"].get(decision["series_uid"], {})
        routed = decision["modality"] or "-"
        why = decision["rule"] if decision["modality"] else decision["reason"]
        volume = count = dice = ""
        if "used_in_mome_plus" in entry or "excluded_from_mome_plus" in entry:
            reference = entry.get("used_in_mome_plus") or entry["excluded_from_mome_plus"]
            verb = "MoME+ input of" if "used_in_mome_plus" in entry else "left out of MoME+ on"
            why = f"{verb} #{_series_number(report, reference)}"
        if "seg" in entry:
            if entry.get("mode") == "mome_plus":
                why = "MoME+ " + "+".join(entry["modalities_available"])
            volume, count = f"{entry['lesion_volume_ml']:.1f}", str(entry["lesion_count"])
            modality, label = truth[decision["series_uid"]]
            folder = next((workdir / "study" / "dicom").glob(f"*_{modality}"))
            seg_path = output / report["study_instance_uid"] / entry["seg"]["file"]
            dice = f"{_seg_dice(seg_path, folder, workdir / 'study' / 'nifti' / label):.2f}"
        rows.append(
            f"{decision['series_number']:>3}  {decision['description'][:22]:<22} {routed:<8} {why[:34]:<34} "
            f"{volume:>9} {count:>3} {dice:>5}"
        )
    return "\n".join(rows)


def _series_number(report: dict[str, Any], series_uid: str) -> int | None:
    return next((d["series_number"] for d in report["series"] if d["series_uid"] == series_uid), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    bundle, weights = demo_bundle(workdir)
    print(f"[1/3] model: {bundle} ({weights})")
    use_bundle_scripts(bundle)
    from app.demo_study import make_demo_study

    study_file = workdir / "study" / "study.json"
    if not study_file.is_file():
        study_file.parent.mkdir(parents=True, exist_ok=True)
        study_file.write_text(json.dumps(make_demo_study(workdir / "study")))
    study = json.loads(study_file.read_text())
    print(f"[2/3] demo DICOM study: {workdir / 'study' / 'dicom'} (7 series, synthetic, MNI152 anatomy)")
    output = workdir / "output"
    started = time.perf_counter()
    try:
        result = segment_study(
            workdir / "study" / "dicom",
            output,
            model=bundle,
            progress=lambda message: print(f"      {message}", flush=True),
        )
    except Exception as error:  # noqa: BLE001 - every failure becomes its exit code
        return fail("make demo", error)
    print(f"[3/3] the application took {time.perf_counter() - started:.0f} s\n")
    (report,) = result.reports
    print(summary_table(report, study, workdir, output))
    if "mome_plus" in report["summary"]:
        plus = report["summary"]["mome_plus"]
        regions = ", ".join(f"{name} {ml:.1f} mL" for name, ml in plus["region_volume_ml"].items())
        print(f"\nMoME+ (one SEG on the {plus['reference_modality']} series; Dice above = whole tumour): {regions}")
    print(f"\nOutputs: {output / report['study_instance_uid']}  (DICOM-SEG and SR per series, qc_*.png, report.json)")
    print(f"Weights: {weights}. Synthetic-data demo; not for clinical use.")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
