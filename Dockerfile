# syntax=docker/dockerfile:1
# preloader image: the agent for the sidecar and node warm-up DaemonSet (entrypoint
# `preloader`, default command `serve`), plus /opt/preloader/preloader.pyz, the
# self-contained zipapp that initContainers copy into server pods (deploy/poststart,
# deploy/sidecar-wait). The venv has the k8s extra (lightkube) for the DaemonSet's node
# labels; the zipapp has only the base dependencies.
#
#   docker build -t preloader:0.1.0 --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Runs as uid/gid 65532 by default and writes nothing, so readOnlyRootFilesystem works.
# The Kubernetes manifests choose uid 0 with every capability dropped but FOWNER where a
# true residency figure is needed (see docs/residency.md).
#
# BASE_IMAGE is any Debian-like image with python3 (3.10 or newer) and its venv module;
# both stages use it, so the venv's interpreter is the final stage's own. WHEELHOUSE, when
# set, is a folder of wheels mounted into the build (`podman build -v DIR:/wheels:ro
# --build-arg WHEELHOUSE=/wheels`): pip then installs from it alone, with no network (how
# tests/test_image.py builds the image on a Debian base made with debootstrap).

ARG BASE_IMAGE=python:3.12-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG WHEELHOUSE=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY preloader ./preloader
COPY scripts/build_zipapp.py ./scripts/
# Wheels only (psutil ships manylinux wheels): no compiler in either stage. pip
# byte-compiles the venv here, so nothing needs writing at run time.
RUN if [ -n "$WHEELHOUSE" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELHOUSE"; fi \
 && python3 -m venv /opt/preloader/venv \
 && /opt/preloader/venv/bin/pip install --only-binary=:all: '.[k8s]' \
 && python3 scripts/build_zipapp.py --output /opt/preloader/preloader.pyz \
 && /opt/preloader/venv/bin/preloader --version \
 && python3 /opt/preloader/preloader.pyz --version

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# Where the source lives; set it in CI (the project has no public address yet).
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="preloader" \
      org.opencontainers.image.description="Makes an LLM's weight files resident in the Linux page cache, proves it, and tells Kubernetes and Prometheus." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# The venv's python is a symlink to the base image's python3, the same in both stages.
COPY --from=build /opt/preloader /opt/preloader
ENV PATH=/opt/preloader/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /
EXPOSE 9400
ENTRYPOINT ["preloader"]
CMD ["serve"]
