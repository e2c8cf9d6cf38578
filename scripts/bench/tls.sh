#!/usr/bin/env bash
# What TLS and tokens cost the leader: a secure and an --insecure local
# cluster (1 coordinator, 2 workers each) measured in the same run, in
# rounds that alternate the order: fresh connection + WhoIsLeader,
# ClusterStatus, GetSweep, Submit latencies (median, p90) and instant-trial
# throughput, each with the secure ÷ insecure ratio.
# Usage: scripts/bench/tls.sh [ROUNDS] [TRIALS_PER_ROUND]   (default 6 150)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# setup.sh builds the workspace in release (coordinator and worker binaries).
"$ROOT/scripts/setup.sh" >/dev/null
. "$ROOT/scripts/env.sh"
cd "$ROOT"
cargo build --release --locked -p ringleader-tests --bin bench-tls
RINGLEADER_BIN_DIR="$ROOT/target/release" "$ROOT/target/release/bench-tls" "$@"
