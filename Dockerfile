# The serving image (default target `serve`) and the one-shot artifact job (target `artifact-job`), CPU by default.
#
#   docker build -t rac:latest .                            # the service on :8000 (gRPC :8001), artifacts from /artifacts/demo
#   docker build --target artifact-job -t rac-artifact-job:latest .    # `rac build` ([build] extra, Fashion-MNIST)
#   docker build --build-arg VARIANT=gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04 -t rac:gpu .
#       # serve only: onnxruntime-gpu (ONNXRUNTIME_GPU; CUDA 13 + cuDNN 9 from the base image); run it with
#       # --gpus all (RAC_DEVICE=auto picks CUDA). Artifacts are device-independent: build them with the CPU job.
# torch stays the CPU build in every variant: it runs only the small TorchScript head, and PyPI's plain `torch`
# is a multi-GB CUDA build. It comes from a wheel in deploy/wheels/ when one is there
# (`pip download torch==2.13.0 --no-deps -d deploy/wheels`), else from PyTorch's CPU index (TORCH_INDEX).
# Where pip needs a CA bundle (a TLS-intercepting proxy), pass it as a secret; it never lands in a layer:
#   DOCKER_BUILDKIT=1 docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt -t rac .
# Nothing is fetched at run time: artifacts come from a volume, written by the artifact job (docker-compose.yml).

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- python: the base every stage shares
FROM ${BASE_IMAGE} AS python
# python:3.11-slim has Python 3.11; a CUDA base image (Ubuntu 22.04) gets it from apt.
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin rac \
 && mkdir /artifacts && chown rac:rac /artifacts
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- deps: a virtual environment with the online path
FROM python AS deps
ARG VARIANT=cpu
# The GPU variant's onnxruntime: its PyPI releases lag the CPU package's (1.31.1 when 1.32.0 is pinned for CPU).
ARG ONNXRUNTIME_GPU=onnxruntime-gpu==1.31.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python3.11 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
# The pinned lists from pyproject.toml, so the dependencies get their own layer (a code change does not reinstall
# torch); the GPU variant swaps onnxruntime for $ONNXRUNTIME_GPU.
RUN python3.11 requirements.py "$VARIANT" "$ONNXRUNTIME_GPU"
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=bind,source=deploy/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install --no-deps --no-index --find-links /wheels -r torch.txt 2>/dev/null \
      || pip install --no-deps --index-url "$TORCH_INDEX" -r torch.txt; \
    pip install -r online.txt; \
    python -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build') if torch.version.cuda else None"; \
    # C++ headers, static libraries, CMake files and test binaries (about 200 MB): for building extensions and
    # testing torch, never for serving. torch_shm_manager stays: `import torch` looks for it.
    t=/opt/venv/lib/python3.11/site-packages/torch; rm -rf "$t/include" "$t/share" "$t/test"; \
    find "$t/bin" -type f ! -name torch_shm_manager -delete; find "$t/lib" -name '*.a' -delete

# ---------------------------------------------------------------- wheel: the project itself, a small wheel
FROM deps AS wheel
COPY rac ./rac
COPY service ./service
COPY models ./models
COPY README.md* ./
RUN pip wheel --no-deps --no-build-isolation --no-cache-dir -w /dist . && rm -rf build

# ---------------------------------------------------------------- app: the environment and the non-root user
# The venv layer changes only with the pins; the project goes in last, so a code change rebuilds seconds.
FROM python AS app
COPY --from=deps /opt/venv /opt/venv
COPY --from=deps /src/build.txt /opt/build.txt
WORKDIR /home/rac
# The artifact directory inside the /artifacts volume (`rac build` writes DIR.partial beside it, then renames).
ENV RAC_ARTIFACTS=/artifacts/demo

# ---------------------------------------------------------------- artifact-job: `rac build` into /artifacts
FROM app AS artifact-job
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install -r /opt/build.txt; \
    python -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build') if torch.version.cuda else None"
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-deps --no-cache-dir /dist/*.whl && pip check && python -c "import models.build.artifact"
# The encoders and the text model ship inside pip packages: never reach for a model hub.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
USER 10001
# Builds only where $RAC_ARTIFACTS holds no finished build (manifest.json is written last); RAC_BUILD_ARGS adds
# options, e.g. --quick for a small build in seconds.
CMD if [ -f "$RAC_ARTIFACTS/manifest.json" ]; then echo "artifacts present: $RAC_ARTIFACTS"; \
    else exec rac build --out "$RAC_ARTIFACTS" --cache /home/rac/.cache/rac $RAC_BUILD_ARGS; fi

# ---------------------------------------------------------------- serve (default): the online path only
FROM app AS serve
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-deps --no-cache-dir /dist/*.whl && pip check \
 && python -c "import torch, onnxruntime, faiss, service.app, rac.cli"
# The page's files travel as package data: a wheel without them would serve a broken page.
RUN python -c "from service.api.pages import STATIC; assert (STATIC / 'index.html').is_file() and (STATIC / 'page.js').is_file()"
USER 10001
# HTTP (the service's routes and the Open Inference Protocol's /v2) and the protocol's gRPC service.
ENV RAC_HOST=0.0.0.0 RAC_PORT=8000 RAC_GRPC_PORT=8001
EXPOSE 8000 8001
# /healthz: the process answers. /readyz (artifacts loaded and warmed up) is what a load balancer should use.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RAC_PORT', '8000'), timeout=2)"]
# One server process per core (RAC_WORKERS to change), metrics summed over them.
CMD ["python", "-m", "service"]
