#!/usr/bin/env bash
# What browsers on the dashboard cost the leader: a secure local cluster
# (1 coordinator, 2 workers) with a finished 200-trial ASHA sweep, then N
# simulated browsers on the sweep's page (GET the sweep and its curves every
# 2 s over kept-alive HTTPS), with one shared token and with N tokens; the
# leader's CPU share of one core per window, beside an idle window. Then
# the same load on optuna-dashboard serving an equivalent 200-trial study
# (scripts/bench/dashboard_optuna.py), in the same run.
# Usage: scripts/bench/dashboard.sh [BROWSERS] [SECONDS]   (default 20 60)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/setup.sh" >/dev/null
. "$ROOT/scripts/env.sh"
cd "$ROOT"
cargo build --release --locked -p ringleader-tests --bin bench-dashboard
python -c "import optuna_dashboard" 2>/dev/null || python -m pip install -q optuna-dashboard
echo "==> Ringleader's dashboard"
RINGLEADER_BIN_DIR="$ROOT/target/release" "$ROOT/target/release/bench-dashboard" "$@"
echo "==> optuna-dashboard"
python "$ROOT/scripts/bench/dashboard_optuna.py" "$@"
