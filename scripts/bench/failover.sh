#!/usr/bin/env bash
# Failover benchmark: 10 SIGKILLs of the leader of a 3-coordinator, 4-worker
# local cluster; median and max time until a new leader serves and every
# worker is re-registered. Usage: scripts/bench/failover.sh [KILLS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/setup.sh" >/dev/null
. "$ROOT/scripts/env.sh"
cd "$ROOT"
cargo build --release --locked -p ringleader-tests --bin bench-failover
RINGLEADER_BIN_DIR="$ROOT/target/release" "$ROOT/target/release/bench-failover" "${1:-10}"
