#!/usr/bin/env bash
# The leader at scale and under faults, by simulation (no etcd, no
# processes: the real scheduler stepped by coordinator/src/sweep/sim.rs):
#   1. bench-leader: --workers simulated workers run --trials random-search
#      trials of an instant objective; prints the leader's cost per event
#      in the windows ending at 1%, 10% and 100% of the trials, and the etcd
#      bytes written per trial;
#   2. the simulation's invariant tests over --seeds seeded fault schedules
#      (cargo test runs 64 of them).
#
# Usage: scripts/bench/leader.sh [--workers 10000] [--trials 1000000] [--seeds 3000]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"

WORKERS=10000
TRIALS=1000000
SEEDS=3000
while (($#)); do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --trials) TRIALS="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cargo build --release --locked -p ringleader-tests --bin bench-leader
echo "==> bench-leader --workers $WORKERS --trials $TRIALS"
"$ROOT/target/release/bench-leader" --workers "$WORKERS" --trials "$TRIALS"
echo "==> simulation invariants over $SEEDS seeds"
RINGLEADER_SIM_SEEDS="$SEEDS" cargo test --release --locked -p ringleader-coordinator --lib sweep::sim
