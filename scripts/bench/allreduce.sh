#!/usr/bin/env bash
# All-reduce benchmark: Ringleader ring (mutual TLS, as workers run it; with
# --ring tls,plain also with ring encryption off) vs torch.distributed Gloo
# (the .venv torch) vs the loopback TCP ceiling (iperf3). Usage:
#   scripts/bench/allreduce.sh [--worlds 2,4] [--iterations 10] [--sizes BYTES,...]
#                              [--ring tls,plain] [--rounds N] [--no-gloo] [--no-iperf]
# What ring encryption costs (docs/BENCHMARKS.md):
#   scripts/bench/allreduce.sh --worlds 2,4 --sizes 67108864 --ring tls,plain --iterations 5 --rounds 3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/setup.sh" >/dev/null
. "$ROOT/scripts/env.sh"
exec python "$ROOT/scripts/bench/allreduce.py" "$ROOT/target/release" "$@"
