# syntax=docker/dockerfile:1
# Coordinator image: `ringleader` (serve, status, local). No libtorch.
#
#   docker build -f deploy/coordinator.Dockerfile -t ghcr.io/ringleader/ringleader-coordinator:0.1.0 .
#
# The builder must be at least Rust 1.88 (tonic 0.14.9 in Cargo.lock); it is
# pinned to the toolchain the workspace is tested with.

FROM rust:1.95.0-bookworm AS builder
# DL3008: the builder's apt packages follow Debian bookworm's security updates;
# pinning exact Debian revisions would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ringleader-coordinator \
    && install -m 0755 target/release/ringleader /usr/local/bin/ringleader

FROM debian:12.11-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ringleader-coordinator" \
      org.opencontainers.image.description="Ringleader coordinator: leader election through etcd, worker registry, gRPC API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ringleader/ringleader"
# Not root: uid/gid 10001 (the pods' runAsUser, k8s/base).
RUN groupadd --gid 10001 ringleader \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ringleader
COPY --from=builder /usr/local/bin/ringleader /usr/local/bin/ringleader
# Fails the build if the binary cannot start on this base.
RUN ["/usr/local/bin/ringleader", "--version"]
USER 10001:10001
EXPOSE 7400
# Asks the local coordinator for the cluster status (it follows a standby to
# the leader). Kubernetes ignores this and uses the gRPC health probe instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/ringleader", "status", "--coordinator", "127.0.0.1:7400", "--timeout", "2s"]
ENTRYPOINT ["/usr/local/bin/ringleader"]
# Configure with flags or RINGLEADER_* variables (RINGLEADER_ETCD is required).
CMD ["serve"]
