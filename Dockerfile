# CPU MONAI Application Package (MAP) of the MoME Deploy application: the layout, manifests and entry point of
# `monai-deploy package` (holoscan-cli 4.2.0) on a CPU-only base instead of the CUDA runtime image.
#
# The build context is the packager's own, generated without Docker; `make map` stages it and builds this file with
# docker, podman or buildah (python -m app.map_package build --help):
#     make map                                     # mome-app-cpu:VERSION, VERSION = app.__version__
#     make map-run IN=study_folder OUT=out_folder  # runs it as a MAP runs: mounted input/output, HOLOSCAN_*, no network
# Build arguments:
#     BASE_IMAGE   any OCI image of a glibc Linux with apt (default: the slim Python image); one without Python gets
#                  Debian's python3 (CI builds on a Debian base made locally with debootstrap).
#     MOME_VERSION the product's one version (app.__version__): tags and labels; checked against pkg.json.
#     TORCH_INDEX_URL where the +cpu torch comes from (default: the PyTorch CPU index; PyPI when WHEELS holds it).
#     WHEELS       a folder of wheels mounted into the build (podman/buildah -v), searched beside the indexes.
#     PIP_CERT     a CA bundle mounted into the build, for pip behind a TLS-inspecting proxy.
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG MOME_VERSION
ARG UNAME=holoscan
ARG UID=1000
ARG GID=1000
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS=
ARG PIP_CERT=

LABEL org.opencontainers.image.title="MoME brain lesion segmentation, CPU MAP (DICOM MR -> DICOM-SEG, SR, report)" \
      org.opencontainers.image.version="${MOME_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.monai.deploy.app-sdk="4.0.0" \
      org.nvidia.holoscan="4.2.0" \
      tag="mome-app-cpu:${MOME_VERSION}"

# libgomp for torch and ITK, jq for the MAP tools script; Debian's python3 only when the base has no usable one.
RUN test -n "${MOME_VERSION}" || { echo "build argument MOME_VERSION is required (app.__version__)" >&2; exit 2; }; \
    packages="libgomp1 jq ca-certificates"; \
    python3 -c "import ensurepip, venv" 2>/dev/null || packages="$packages python3 python3-venv"; \
    apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/holoscan/venv/bin:${PATH} \
    HOLOSCAN_LOG_LEVEL=ERROR \
    HOLOSCAN_TIMEOUT=0 \
    HOLOSCAN_INPUT_PATH=/var/holoscan/input \
    HOLOSCAN_OUTPUT_PATH=/var/holoscan/output \
    HOLOSCAN_WORKDIR=/var/holoscan \
    HOLOSCAN_APPLICATION=/opt/holoscan/app \
    HOLOSCAN_MODEL_PATH=/opt/holoscan/models \
    HOLOSCAN_DOCS_PATH=/opt/holoscan/docs \
    HOLOSCAN_CONFIG_PATH=/var/holoscan/app.yaml \
    HOLOSCAN_APP_MANIFEST_PATH=/etc/holoscan/app.json \
    HOLOSCAN_PKG_MANIFEST_PATH=/etc/holoscan/pkg.json \
    HOLOSCAN_LOGS_PATH=/var/holoscan/logs

RUN groupadd -f -g ${GID} ${UNAME} \
    && useradd -rm -d /home/${UNAME} -s /bin/bash -g ${GID} -u ${UID} ${UNAME} \
    && mkdir -p /etc/holoscan /opt/holoscan/app /opt/holoscan/docs /var/holoscan/input /var/holoscan/output \
        /var/holoscan/logs \
    && chown -R ${UNAME} /var/holoscan

# The pinned stack in its own environment: first the CPU build of the pinned torch (never PyPI's CUDA build), then the
# rest of pip/requirements.txt, which that torch satisfies.
COPY ./pip/requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/holoscan/venv \
    && torch="$(grep -E '^torch==' /tmp/requirements.txt)+cpu" \
    && pip install ${PIP_CERT:+--cert "$PIP_CERT"} ${WHEELS:+--find-links "$WHEELS"} \
        --index-url "${TORCH_INDEX_URL}" "$torch" \
    && pip install ${PIP_CERT:+--cert "$PIP_CERT"} ${WHEELS:+--find-links "$WHEELS"} -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY ./tools /var/holoscan/tools
COPY ./models /opt/holoscan/models
COPY ./map/app.json /etc/holoscan/app.json
COPY ./map/pkg.json /etc/holoscan/pkg.json
COPY ./app.config /var/holoscan/app.yaml
COPY ./app /opt/holoscan/app
COPY ./entrypoint.sh /opt/holoscan/entrypoint.sh
RUN chmod +x /var/holoscan/tools /opt/holoscan/entrypoint.sh \
    && test "$(jq -r .version /etc/holoscan/pkg.json)" = "${MOME_VERSION}" \
    || { echo "MOME_VERSION ${MOME_VERSION} differs from pkg.json's version" >&2; exit 2; }

USER ${UNAME}
WORKDIR /var/holoscan
# show/env/extract/help: the MAP tools script; anything else: the app.json command with its exit status and signals.
ENTRYPOINT ["/opt/holoscan/entrypoint.sh"]
