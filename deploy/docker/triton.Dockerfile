# NVIDIA Triton with what the platform's Python-backend model needs.
#
#   docker build -f deploy/docker/triton.Dockerfile -t mlops-triton deploy/docker
#
# The registry publishes each model version as TorchScript plus a Python-backend model.py
# (services/registry/triton_backend/model.py) that imports torch; NVIDIA's image has the
# Python backend but not torch, so it is installed here (the CUDA build, for the GPU).
# TORCH_VERSION must be able to load the TorchScript the training service saves: keep it at
# the services' torch (requirements.lock) or newer. The image's Python is 3.10; if a torch
# release has no cp310 wheel, use the newest one that has and a matching newer NGC image.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && python3 -c "import torch; print('torch', torch.__version__)" \
    && (command -v curl >/dev/null || (apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*))
