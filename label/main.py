"""The MoME MONAI Label app: ``monailabel start_server --app label --studies DIR`` (``make label-serve``).

Configuration (``--conf KEY VALUE``):

* ``bundle``: the MoME bundle folder (default: ``$MOME_BUNDLE``, else the repository's ``bundle/``);
* ``device``: ``cpu`` or ``cuda`` (default: CUDA when available);
* ``profile``: the bundle's inference profile (default: the bundle's);
* ``model_dir``: where fine-tuned weights are kept (default: the app's ``model/`` folder).

Studies: a folder of NIfTI images (MONAI Label's local datastore), or a DICOMweb URL (``--studies
http://pacs/dicom-web``): the PACS's MR series, read, routed and written back as DICOM-SEG by the application's
operators (:mod:`label.dicomweb`).

Infer tasks (:mod:`label.infer`): ``mome``, and ``mome_plus`` when the bundle holds a MoME+ model. Train task
(:mod:`label.train`): ``mome``, fine-tuning on the saved labels; its weights are served from then on
(:mod:`label.weights`). Active learning (:mod:`label.strategy`): ``expert_disagreement``. Images come from the
studies folder (NIfTI) and labels saved from the clients are kept in its ``labels/`` folder, as MONAI Label's local
datastore does.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # MONAI Label loads this file by path: make the repository's packages importable
    sys.path.insert(0, str(REPO))

from dicomweb_client.session_utils import create_session_from_user_pass  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.dicom import DICOMwebClientX  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402

from app import __version__  # noqa: E402
from label.dicomweb import ImageNotFound, MoMEDICOMwebDatastore  # noqa: E402
from label.infer import MoMEInfer, MoMEPlusInfer, labels_of  # noqa: E402
from label.strategy import ExpertDisagreement  # noqa: E402
from label.train import MoMETrain  # noqa: E402
from label.weights import ServedWeights  # noqa: E402
from operators.bundle import default_bundle_dir, load_segmenters, resolve_bundle  # noqa: E402
from operators.dicom_series import SeriesRejected  # noqa: E402
from operators.study import Segmenter  # noqa: E402

logger = logging.getLogger(__name__)
NOT_FOUND, UNPROCESSABLE = 404, 422


class MoMELabelApp(MONAILabelApp):
    """MoME for MONAI Label clients (3D Slicer, OHIF)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle = resolve_bundle(Path(conf["bundle"]) if conf.get("bundle") else default_bundle_dir())
        self.device = conf.get("device") or None
        self.profile = conf.get("profile") or None
        model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model")
        self.weights = ServedWeights(self.bundle / "models" / "model.pt", model_dir / "mome_finetuned.pt")
        self.models = load_segmenters(self.bundle, "auto", self.device, False, self.profile)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MoME",
            description="MoME (Mixture of Modality Experts) brain-lesion segmentation of multi-modal brain MRI",
            version=__version__,
        )

    def init_remote_datastore(self) -> Datastore:
        """A DICOMweb PACS through :class:`label.dicomweb.MoMEDICOMwebDatastore` (XNAT and DSA: MONAI Label's)."""
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        logger.info("DICOMweb datastore: %s", self.studies)
        username = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
        password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
        session = create_session_from_user_pass(username, password) if username and password else None
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
        models = [m for m in (self.models.single, self.models.plus) if m is not None]
        known = [{value: name for name, value in labels_of(m.channel_def).items()} for m in models]
        return MoMEDICOMwebDatastore(client, settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache or None, known)

    def init_infers(self) -> dict[str, InferTask]:
        logger.info("MoME bundle: %s", self.bundle)
        infers: dict[str, InferTask] = {}
        if self.models.single is not None:
            infers["mome"] = MoMEInfer(self.models.single, self._mome_with_tta, self.weights)
        if self.models.plus is not None:
            infers["mome_plus"] = MoMEPlusInfer(self.models.plus)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"mome": MoMETrain(self.models.single, self.weights)} if self.models.single is not None else {}

    def init_strategies(self) -> dict[str, Strategy]:
        strategies = super().init_strategies()  # MONAI Label's random
        if self.models.single is not None:
            strategies["expert_disagreement"] = ExpertDisagreement(self.models.single, self.weights)
        return strategies

    def _mome_with_tta(self) -> Segmenter:
        segmenter = load_segmenters(self.bundle, "single", self.device, True, self.profile).single
        if segmenter is None:  # load_segmenters raises first: "single" mode always loads MoME
            raise FileNotFoundError(f"{self.bundle}: no MoME model.")
        return segmenter

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """As MONAI Label's, but an image id the datastore does not hold is answered 404 (MONAI Label: 500).

        In a DICOMweb datastore the request also carries the series' header facts (``series``) and, for MoME+, the
        study's series to segment with it (``study_series``, ``series_left_out``).
        """
        image = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image):
            if isinstance(store, MoMEDICOMwebDatastore):
                request = {**request, **self._dicom_context(store, image, str(request.get("model")))}
            elif not store.get_image_uri(image):
                raise HTTPException(NOT_FOUND, f"image {image!r}: not in the datastore.")
        return super().infer(request, datastore)

    def _dicom_context(self, store: MoMEDICOMwebDatastore, image: str, model: str) -> dict[str, Any]:
        """What the tasks need to know about a PACS series; 404 / 422 when it is missing or unusable."""
        try:
            context: dict[str, Any] = {"series": store.series(image).to_dict()}
            if model == "mome_plus" and self.models.plus is not None:
                chosen, left_out = store.study_series(image, self.models.plus.modalities)
                context["study_series"] = {modality: series.to_dict() for modality, series in chosen.items()}
                context["series_left_out"] = left_out
        except ImageNotFound as error:
            raise HTTPException(NOT_FOUND, str(error)) from None
        except SeriesRejected as error:
            raise HTTPException(UNPROCESSABLE, str(error)) from None
        return context
