# A runtime image with one model bundle baked in at /model (read-only to the server's user).
# Built by `edge-compress package RUN_DIR --image NAME`; the context is the bundle folder.
ARG RUNTIME_IMAGE=edge-compress/runtime:amd64
FROM ${RUNTIME_IMAGE}
COPY --chown=0:0 . /model/
USER 10001:10001
