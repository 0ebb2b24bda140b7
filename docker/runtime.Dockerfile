# The runtime image: ONNX Runtime, numpy and tokenizers (wheels for the image's architecture), the
# native kernels of edge-compress's attention ops, and the inference server. No PyTorch. Mount a bundle
# (`edge-compress package RUN_DIR`) read-only at /model, or bake one in with `--image`.
ARG BASE_IMAGE=edge-compress/python:3.11-bookworm-amd64
FROM ${BASE_IMAGE}
COPY site/ /opt/edge-compress/site/
COPY *.py libedgecompress_ops.so sbom.json /opt/edge-compress/
ENV PYTHONPATH=/opt/edge-compress/site \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGE_COMPRESS_OPS_LIBRARY=/opt/edge-compress/libedgecompress_ops.so \
    EDGE_COMPRESS_MODEL=/model \
    HOME=/tmp \
    PORT=8080
USER 10001:10001
WORKDIR /tmp
# The server listens on 0.0.0.0:$PORT, all of the container's own network namespace, so a published port
# (`-p 127.0.0.1:8080:8080` keeps it on the host's loopback) reaches it. With `--network host` it would
# listen on every host interface: pass `--host 127.0.0.1` after the image name, as the tests do.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["/usr/bin/python3.11", "/opt/edge-compress/server.py", "--healthcheck"]
ENTRYPOINT ["/usr/bin/python3.11", "/opt/edge-compress/server.py"]
