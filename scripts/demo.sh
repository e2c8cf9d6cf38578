#!/usr/bin/env bash
# The main job: set up, start a local cluster (private etcd, 2 coordinators,
# 2 workers), run the ASHA sweep of examples/fashion-mnist-asha.toml over
# the reference CNN on Fashion-MNIST (2 min 43 s measured on 2 cores after
# set-up, see the spec's header), print the leaderboard (chosen on val_accuracy)
# and the best trial's test metrics as the final estimate, and stop the
# cluster.
#
#   scripts/demo.sh                      # the sweep above
#   scripts/demo.sh examples/other.toml  # any sweep spec
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPEC="${1:-$ROOT/examples/fashion-mnist-asha.toml}"
"$ROOT/scripts/setup.sh"
. "$ROOT/scripts/env.sh"
echo
echo "==> local cluster, then: ringleader sweep submit $SPEC --watch"
exec "$ROOT/target/release/ringleader" local --workers 2 --coordinators 2 -- \
  ringleader sweep submit "$SPEC" --watch
