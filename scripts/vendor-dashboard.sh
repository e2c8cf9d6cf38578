#!/usr/bin/env bash
# Re-fetch the vendored uPlot files for the web dashboard (coordinator/dashboard/vendor/)
# from the npm registry, pinned to one version and checked against a known sha256.
#
#   scripts/vendor-dashboard.sh
#
# Needs npm (only `npm pack`, which downloads the tarball without installing anything).
set -euo pipefail

UPLOT_VERSION="1.6.32"
UPLOT_SHA256="4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/coordinator/dashboard/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

command -v npm >/dev/null || { echo "npm not found: install Node.js/npm first" >&2; exit 1; }

cd "$WORK"
npm pack --silent "uplot@$UPLOT_VERSION" >/dev/null
TARBALL="uplot-$UPLOT_VERSION.tgz"
ACTUAL="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
if [[ "$ACTUAL" != "$UPLOT_SHA256" ]]; then
  echo "sha256 mismatch for $TARBALL: expected $UPLOT_SHA256, got $ACTUAL" >&2
  exit 1
fi
tar xzf "$TARBALL"

mkdir -p "$DEST"
cp package/dist/uPlot.iife.min.js "$DEST/uPlot.iife.min.js"
cp package/dist/uPlot.min.css "$DEST/uPlot.min.css"
cp package/LICENSE "$DEST/LICENSE"
echo "vendored uPlot $UPLOT_VERSION into $DEST"
