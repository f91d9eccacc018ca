# One image, two roles: `chargpt train` (one-shot job) and `chargpt serve` (the default).
#   CPU (default):  docker build -t chargpt .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t chargpt:cuda .
#   Behind a mirror or air-gapped: --build-arg TORCH_INDEX_URL=<a mirror of PyTorch's index>,
#   --build-arg PIP_INDEX_URL=<a PyPI mirror>, --build-arg PIP_FIND_LINKS=<a folder of wheels
#   served over http>; none of them is left in the image.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
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
# Nothing at run time builds, tests or installs: drop the wheel's C++ headers and test suite,
# its test binaries (torch_shm_manager stays: shared-memory tensors need it), and pip.
RUN site="$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && rm -rf "$site/torch/include" "$site/torch/test" \
    && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \
    && pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime
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
# Asks grpc.health.v1 (SERVING only once a checkpoint is loaded); no extra binary.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["chargpt", "health", "--server", "127.0.0.1:50051", "--timeout", "4"]
# Exec form: chargpt is PID 1 and receives SIGTERM itself (drain, or save and stop).
ENTRYPOINT ["chargpt"]
CMD ["serve"]
