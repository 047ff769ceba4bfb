# hpo's image: the workers of deploy/k8s-indexed-job.yaml, or `docker run` anywhere. hpo with its
# PostgreSQL and Ray extras on a CPU or a CUDA base; the example specs are in /opt/hpo. Data is
# mounted, never baked in: -v /srv/data:/data (it holds mnist/ and the like; HPO_DATA_DIR=/data).
#
#   docker build -t hpo:cpu .
#   docker build -t hpo:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm -v /srv/data:/data -e HPO_STORAGE hpo:cpu run search_spaces/mnist.yaml
#
# (podman build and buildah bud take the same arguments.)
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
# where torch comes from: PyTorch's CPU index by default (PyPI's torch is the CUDA build); a
# folder of wheels (its torch first, the rest from PyPI): --build-arg TORCH_PIP_ARGS="--find-links /wheels"
# with -v /path/to/wheels:/wheels (podman build and buildah take -v)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_PIP_ARGS="--index-url ${TORCH_INDEX}"
# behind a proxy that re-signs TLS, its CA bundle for pip (builds of dependencies included):
# --build-arg PIP_CERT=/certs/ca-certificates.crt with -v /etc/ssl/certs:/certs:ro
ARG PIP_CERT=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The CUDA bases come without Python: Debian's or Ubuntu's python3 and venv.
RUN if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index the base needs (CPU or CUDA): the rest does not pull another
RUN pip install ${TORCH_PIP_ARGS} "torch==${TORCH_VERSION}"

WORKDIR /opt/hpo
COPY pyproject.toml README.md ./
COPY hpo ./hpo
RUN pip install ".[postgres,ray]"
COPY search_spaces ./search_spaces

ENV HPO_DATA_DIR=/data
VOLUME /data
ENTRYPOINT ["hpo"]
CMD ["--help"]
