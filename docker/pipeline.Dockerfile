# The pipeline image (amd64): edge-compress with PyTorch CPU, to run recipes in a container.
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD:/work" edge-compress/pipeline run recipes/minilm-int8.yaml
# The context holds the wheels the host resolved (torch 2.13.0 CPU first and pinned; nothing is
# downloaded during the build), the native kernels built on the host, and the reference-data cache,
# so recipes on the demo model and the shipped data run with no network.
ARG BASE_IMAGE=edge-compress/debian:bookworm-amd64
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/edge-compress \
    && /opt/edge-compress/bin/pip install --no-index --find-links /wheels --no-cache-dir \
        --disable-pip-version-check "torch==2.13.0" "edge-compress[demo]==${VERSION}" \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin edge
COPY lib/ /opt/edge-compress/lib/python3.11/site-packages/exporters/native/lib/
COPY --chown=10001:10001 cache/ /home/edge/.cache/edge-compress/
ENV PATH=/opt/edge-compress/bin:$PATH \
    EDGE_COMPRESS_CACHE=/home/edge/.cache/edge-compress \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["edge-compress"]
CMD ["--help"]
