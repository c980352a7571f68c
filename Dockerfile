# CPU image for the MoME bundle and tools. Build: docker build -t mome:0.1.0 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOLOSCAN_LOG_LEVEL=ERROR

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mome
# CPU build of torch first, so nothing pulls the CUDA wheels.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY app/__init__.py app/runtime.py app/
COPY operators/__init__.py operators/
RUN pip install -e . && rm -rf /root/.cache
COPY bundle/ bundle/
COPY app/ app/
COPY operators/ operators/

ENV MOME_BUNDLE=/opt/mome/bundle
ENTRYPOINT ["mome-convert"]
CMD ["--help"]
