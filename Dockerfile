# One image, two roles: `chargpt train` (one-shot job) and `chargpt serve` (the default).
#   CPU (default):  docker build -t chargpt .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t chargpt:cuda .
#   Without a C++ compiler (smaller; the server then serves its decode step eager):
#                   docker build --build-arg COMPILER=false -t chargpt:slim .
#   Behind a mirror or air-gapped: --build-arg TORCH_INDEX_URL=<a mirror of PyTorch's index>,
#   --build-arg PIP_INDEX_URL=<a PyPI mirror>, --build-arg PIP_FIND_LINKS=<a folder of wheels
#   served over http>; none of them is left in the image.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# true: the runtime carries g++ and torch's C++ headers, which AOTInductor needs to compile
# the server's decode step at load (server/compiled.py); false: neither, and it serves eager.
ARG COMPILER=true

FROM ${PYTHON_IMAGE} AS builder
ARG COMPILER
# The PyTorch wheel index to take torch from: cpu, or a CUDA build such as cu126.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# Read by pip itself from the environment of each RUN below: where the other packages come
# from (PyPI or a mirror of it), and extra wheels to prefer. Build arguments of this stage,
# so they are gone from the image.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from PyTorch's own index, so the project's torch range is already met and
# pip never pulls the multi-GB default CUDA build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chargpt ./chargpt
COPY trainer ./trainer
COPY server ./server
COPY client ./client
RUN pip install .
# Nothing at run time tests or installs: drop the wheel's test suite, its test binaries
# (torch_shm_manager stays: shared-memory tensors need it) and pip; and its C++ headers
# unless the runtime compiles.
RUN site="$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && if [ "$COMPILER" != true ]; then rm -rf "$site/torch/include"; fi \
    && rm -rf "$site/torch/test" \
    && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \
    && pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime
ARG COMPILER
# Debian bookworm's g++ (GCC 12), the release the base image is built on.
ARG GXX_VERSION=4:12.2.0-3
RUN if [ "$COMPILER" = true ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "g++=$GXX_VERSION" \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=builder /opt/venv /opt/venv
# CHARGPT_* are the commands' own settings; compose overrides them per service. Inside the
# container the server listens on every interface (outside one it defaults to loopback).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHARGPT_OUT_DIR=/models \
    CHARGPT_DATA_DIR=/data \
    CHARGPT_CHECKPOINT=/models/model.safetensors \
    CHARGPT_HOST=0.0.0.0
RUN groupadd --gid 10001 chargpt \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin chargpt \
    && mkdir /models /data \
    && chown 10001:10001 /models /data
USER 10001:10001
WORKDIR /data
# gRPC, server metrics, trainer metrics.
EXPOSE 50051 9100 9101
# Asks grpc.health.v1 (SERVING only once a checkpoint is loaded and its decode step
# compiled: about two minutes for a lecture model on two cores); no extra binary.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["chargpt", "health", "--server", "127.0.0.1:50051", "--timeout", "4"]
# Exec form: chargpt is PID 1 and receives SIGTERM itself (drain, or save and stop).
ENTRYPOINT ["chargpt"]
CMD ["serve"]
