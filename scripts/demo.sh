#!/usr/bin/env bash
# The main job: set up, start a local cluster (private etcd, 2 coordinators,
# 3 workers), show its status, shut it down cleanly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
. "$ROOT/scripts/env.sh"
echo
echo "==> local cluster"
exec "$ROOT/target/release/ringleader" local --workers 3 --coordinators 2 -- ringleader status
