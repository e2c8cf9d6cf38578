#!/usr/bin/env bash
# Chaos benchmark: a seeded random schedule of worker SIGKILLs/SIGTERMs,
# leader SIGKILLs, etcd freezes (> lease TTL) and etcd restarts against a
# 2-coordinator, 5-worker local cluster running synthetic sweeps of
# two-worker trials back to back. Reports faults injected, trials
# completed, trials lost (must be 0), duplicate live attempts (must be 0)
# and median/max recovery per fault kind; exits non-zero on a lost trial.
# Usage: scripts/bench/chaos.sh [SECONDS=600] [MAX_FAULTS]
# Replay a run with RINGLEADER_CHAOS_SEED=<seed printed at the start>.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/setup.sh" >/dev/null
. "$ROOT/scripts/env.sh"
cd "$ROOT"
cargo build --release --locked -p ringleader-tests --bin bench-chaos
RINGLEADER_BIN_DIR="$ROOT/target/release" "$ROOT/target/release/bench-chaos" "${1:-600}" ${2:+"$2"}
