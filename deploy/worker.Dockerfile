# syntax=docker/dockerfile:1
# Worker image: `ringleader-worker` linked against CUDA libtorch 2.11.0, with
# the Fashion-MNIST data set at /usr/share/datasets/fashion-mnist.
#
#   docker build -f deploy/worker.Dockerfile -t ghcr.io/ringleader/ringleader-worker:0.1.0 .
#
# tch 0.24 links the libtorch of PyPI's torch==2.11.0 (LIBTORCH_USE_PYTORCH=1).
# The binary carries an rpath to the venv's torch/lib, and libtorch_cuda.so
# finds the CUDA libraries (cuDNN, cuBLAS, NCCL, ...) of the nvidia-* wheels
# through its own rpath ($ORIGIN/../../nvidia/...). The runtime stage therefore
# copies torch/lib and nvidia/ to the very same absolute paths; no
# LD_LIBRARY_PATH and no Python are needed at run time.
#
# The builder must be at least Rust 1.88 (tonic 0.14.9 in Cargo.lock); it is
# pinned to the toolchain the workspace is tested with. Debian bookworm's
# Python 3.11 fixes the site-packages path below.

FROM rust:1.95.0-bookworm AS builder
# DL3008: the builder's apt packages follow Debian bookworm's security updates;
# pinning exact Debian revisions would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
ENV VENV=/opt/ringleader/venv
RUN python3 -m venv "$VENV" \
    && "$VENV/bin/pip" install --no-cache-dir torch==2.11.0
ENV PATH="/opt/ringleader/venv/bin:${PATH}" \
    LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ringleader-worker \
    && install -m 0755 target/release/ringleader-worker /usr/local/bin/ringleader-worker

# Fashion-MNIST for the example specs (k8s/base/specs): Debian's
# dataset-fashion-mnist installs the four IDX files under
# /usr/share/datasets/fashion-mnist, where the specs read them. The package
# is a frozen snapshot (one version in bookworm), so it is pinned exactly.
FROM debian:12.11-slim AS dataset
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*

# CUDA 13.0 user-space libraries come from torch's nvidia-* wheels (cu13), so
# the small `base` flavour is enough: it brings the NVIDIA container toolkit
# settings (NVIDIA_VISIBLE_DEVICES, driver capabilities, CUDA requirement).
FROM nvidia/cuda:13.0.1-base-ubuntu24.04
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ringleader-worker" \
      org.opencontainers.image.description="Ringleader training worker: libtorch 2.11.0 on CUDA 13 GPUs or CPUs, ring all-reduce peer service" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ringleader/ringleader"
# Not root: uid/gid 10001 (the pods' runAsUser, k8s/base). A job's paths are
# confined anyway (--data-root, --checkpoint-root; docs/TRAINING.md), and a
# non-root worker cannot read what the image's user may not.
RUN groupadd --gid 10001 ringleader \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ringleader
COPY --from=builder /opt/ringleader/venv/lib/python3.11/site-packages/torch/lib /opt/ringleader/venv/lib/python3.11/site-packages/torch/lib
COPY --from=builder /opt/ringleader/venv/lib/python3.11/site-packages/nvidia /opt/ringleader/venv/lib/python3.11/site-packages/nvidia
COPY --from=builder /usr/local/bin/ringleader-worker /usr/local/bin/ringleader-worker
# The dataset (~30 MiB) and its licence (MIT, Zalando Research).
COPY --from=dataset /usr/share/datasets/fashion-mnist /usr/share/datasets/fashion-mnist
COPY --from=dataset /usr/share/doc/dataset-fashion-mnist/copyright /usr/share/doc/dataset-fashion-mnist/copyright
# Fails the build if libtorch does not resolve through the rpath.
RUN ["/usr/local/bin/ringleader-worker", "--version"]
USER 10001:10001
EXPOSE 7500
# The worker's peer port accepts connections. Kubernetes ignores this and uses
# the gRPC health probe on the same port instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7500"]
# Configure with flags or RINGLEADER_* variables (RINGLEADER_COORDINATOR is required).
ENTRYPOINT ["/usr/local/bin/ringleader-worker"]
