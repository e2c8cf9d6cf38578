#!/usr/bin/env bash
# TPE quality against Optuna's, in one run: the best value after 100
# sequential trials, per seed, and the median, for
#   ours, multivariate (the default) and independent (bench-tpe), and
#   Optuna's TPESampler, default (multivariate) and independent
#   (scripts/bench/tpe_quality.py),
# on Hartmann-6 and on Branin, for the tuning seeds (1..5: the seeds our
# options were chosen on) and, separately, the held-out seeds (6..25: never
# used for tuning; quote these).
#
# Usage: scripts/bench/tpe.sh [--trials 100] [--tuning 1..5] [--held-out 6..25]
# Optuna is installed into the RINGLEADER_CACHE venv on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"

TRIALS=100
TUNING=1..5
HELD_OUT=6..25
while (($#)); do
  case "$1" in
    --trials) TRIALS="$2"; shift 2 ;;
    --tuning) TUNING="$2"; shift 2 ;;
    --held-out) HELD_OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

unset CARGO_TARGET_DIR
echo "==> release build of bench-tpe"
cargo build --release --locked -p ringleader-tests --bin bench-tpe
python -c "import optuna" 2>/dev/null || python -m pip install -q optuna
BIN="$ROOT/target/release"

RESULTS="$(mktemp -t ringleader-bench-tpe.XXXXXX)"
trap 'rm -f "$RESULTS"' EXIT
for function in hartmann6 branin; do
  for seeds in "$TUNING" "$HELD_OUT"; do
    echo "==> $function, seeds $seeds"
    common=(--trials "$TRIALS" --seeds "$seeds" --function "$function" --json)
    "$BIN/bench-tpe" "${common[@]}" >>"$RESULTS"
    "$BIN/bench-tpe" "${common[@]}" --independent >>"$RESULTS"
    python "$ROOT/scripts/bench/tpe_quality.py" "${common[@]}" >>"$RESULTS"
  done
done

python - "$RESULTS" "$TUNING" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
tuning = sys.argv[2]
def label(r):
    seeds = f"{r['seeds'][0]}..{r['seeds'][-1]}"
    return f"{seeds} ({'tuning' if seeds == tuning else 'held out'})"
groups = {}
for r in rows:
    groups.setdefault((r["function"], label(r)), []).append(r)
for (function, seeds), group in groups.items():
    print(f"\n{function}, {group[0]['trials']} trials, seeds {seeds}, "
          f"optimum {group[0]['optimum']} (lower is better)\n")
    print("| searcher | median best | seeds won against Optuna default |")
    print("|---|---|---|")
    reference = next(g for g in group if g["system"] == "optuna-tpe-default")
    for g in group:
        wins = sum(a < b for a, b in zip(g["best"], reference["best"]))
        print(f"| {g['system']} | {g['median']:.4f} | {wins}/{len(g['best'])} |")
    for g in group:
        print(f"  {g['system']}: " + ", ".join(f"{b:.4f}" for b in g["best"]))
PY
