#!/usr/bin/env bash
# Read-back benchmark: a sweep of N instant trials (default 100,000) on a
# local cluster (2 coordinators, 4 workers), then the time to read it all
# back through paged GetSweep, before and after a leader failover.
# Usage: scripts/bench/readback.sh [TRIALS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/setup.sh" >/dev/null
. "$ROOT/scripts/env.sh"
cd "$ROOT"
cargo build --release --locked -p ringleader-tests --bin bench-readback
RINGLEADER_BIN_DIR="$ROOT/target/release" "$ROOT/target/release/bench-readback" "${1:-100000}"
