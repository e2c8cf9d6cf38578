#!/usr/bin/env bash
# Set up, then run every check and test: formatting, clippy, unit tests and
# the integration tests (real etcd, coordinators and workers as processes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
. "$ROOT/scripts/env.sh"
cd "$ROOT"

echo
echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo
echo "==> cargo clippy"
cargo clippy --release --workspace --all-targets --locked -- -D warnings

echo
echo "==> scripts/check-k8s.sh"
"$ROOT/scripts/check-k8s.sh"

echo
echo "==> cargo test"
# The integration tests start the release binaries built by setup.sh.
RINGLEADER_BIN_DIR="$ROOT/target/release" cargo test --release --workspace --locked
