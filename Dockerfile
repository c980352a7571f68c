# CPU MONAI Application Package (MAP) of the MoME Deploy application: the layout, manifests and entry point of
# `monai-deploy package` (holoscan-cli 4.2.0) on a CPU-only Python base instead of the CUDA runtime image.
#
# Build context = the packager's own context, generated without Docker:
#     python -m app.map_package --out build/map_app --context build/map_ctx
#     docker build -f Dockerfile -t mome-app-cpu:$V build/map_ctx   # V: app.__version__, the product's one version
# Run (MAP conventions; /var/holoscan/tools show|env|extract work as in any MAP):
#     docker run --rm -v "$PWD/study:/var/holoscan/input:ro" -v "$PWD/out:/var/holoscan/output" mome-app-cpu:$V
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ARG UNAME=holoscan
ARG UID=1000
ARG GID=1000

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 jq \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOLOSCAN_LOG_LEVEL=ERROR \
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
    && mkdir -p /etc/holoscan /opt/holoscan/app /var/holoscan/input /var/holoscan/output /var/holoscan/logs \
    && chown -R ${UNAME} /var/holoscan

# CPU torch first (pip/requirements.txt names the PyTorch CPU index), then everything else.
COPY ./pip/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY ./tools /var/holoscan/tools
COPY ./models /opt/holoscan/models
COPY ./map/app.json /etc/holoscan/app.json
COPY ./map/pkg.json /etc/holoscan/pkg.json
COPY ./app.config /var/holoscan/app.yaml
COPY ./app /opt/holoscan/app
RUN chmod +x /var/holoscan/tools

USER ${UNAME}
WORKDIR /var/holoscan
# Holoscan wants a 32 MB stack; the tools script runs the app.json command when given no subcommand.
ENTRYPOINT ["/bin/bash", "-c", "ulimit -s 32768 2>/dev/null; exec /var/holoscan/tools \"$@\"", "--"]
