#!/usr/bin/env bash
# All-reduce benchmark: Ringleader ring vs torch.distributed Gloo (the .venv
# torch) vs the loopback TCP ceiling (iperf3). Usage:
#   scripts/bench/allreduce.sh [--worlds 2,4] [--iterations 10]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/setup.sh" >/dev/null
. "$ROOT/scripts/env.sh"
exec python "$ROOT/scripts/bench/allreduce.py" "$ROOT/target/release" "$@"
