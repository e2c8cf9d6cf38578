#!/usr/bin/env bash
# Sweep benchmark, in one run:
#   1. throughput: N synthetic Hartmann-6 trials (random search, epoch_ms 0)
#      on a local cluster of 1 coordinator + 4 workers with a private etcd,
#      every trial state change durable in etcd; trials/s from the sweep
#      record (finished_unix_ms - submitted_unix_ms), beside the wall time
#      of `sweep submit --watch`;
#   2. the same objective with Optuna (journal file, then SQLite; 4 threads)
#      and Ray Tune (4 concurrent trials), scripts/bench/sweep_baselines.py.
# (TPE's quality against Optuna's is scripts/bench/tpe.sh.)
#
# Usage: scripts/bench/sweep.sh [--trials 2000] [--ray-trials 200] [--skip-ray]
# Optuna and Ray are installed into .venv (the RINGLEADER_CACHE venv) on
# first use. Scratch files live in a temp dir, removed at exit
# (KEEP_TMP=1 keeps it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"

TRIALS=2000
RAY_TRIALS=200
SKIP_RAY=0
while (($#)); do
  case "$1" in
    --trials) TRIALS="$2"; shift 2 ;;
    --ray-trials) RAY_TRIALS="$2"; shift 2 ;;
    --skip-ray) SKIP_RAY=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Our own target dir, not a shared CARGO_TARGET_DIR: the binaries measured
# must be this checkout's.
unset CARGO_TARGET_DIR
BIN="$ROOT/target/release"
echo "==> release build (cargo build --release --workspace --locked)"
cargo build --release --workspace --locked
command -v etcd >/dev/null || { echo "etcd not found: run scripts/setup.sh" >&2; exit 1; }

echo "==> optuna and ray[tune] in $(command -v python)"
if ! python -c "import optuna, ray.tune" 2>/dev/null; then
  python -m pip install -q optuna "ray[tune]"
fi
python -c "import optuna, ray; print('optuna', optuna.__version__, '/ ray', ray.__version__)"

TMP="$(mktemp -d -t ringleader-bench-sweep.XXXXXX)"
if [ "${KEEP_TMP:-0}" = 1 ]; then
  echo "scratch: $TMP (kept)"
else
  trap 'rm -rf "$TMP"' EXIT
fi

# ---- 1. Ringleader ---------------------------------------------------------
cat >"$TMP/sweep.toml" <<EOF
[sweep]
name = "bench-hartmann6"
searcher = "random"
seed = 1
max_trials = $TRIALS
workers_per_trial = 1
max_epochs = 1
objective = { metric = "objective", mode = "min" }

[sweep.params]
"model.x1" = { kind = "uniform", low = 0.0, high = 1.0 }
"model.x2" = { kind = "uniform", low = 0.0, high = 1.0 }
"model.x3" = { kind = "uniform", low = 0.0, high = 1.0 }
"model.x4" = { kind = "uniform", low = 0.0, high = 1.0 }
"model.x5" = { kind = "uniform", low = 0.0, high = 1.0 }
"model.x6" = { kind = "uniform", low = 0.0, high = 1.0 }

[job]
name = "hartmann6"

[job.model]
kind = "synthetic"
function = "hartmann6"
epoch_ms = 0
EOF

# Runs inside the cluster (RINGLEADER_COORDINATOR set): submit and watch,
# timed, then the sweep's record and trials as JSON.
cat >"$TMP/inside.sh" <<'EOF'
set -euo pipefail
cd "$1"
start=$(date +%s%N)
rc=0
timeout "${SWEEP_TIMEOUT:-1200}" ringleader sweep submit sweep.toml --watch >submit.out 2>&1 || rc=$?
end=$(date +%s%N)
echo $(((end - start) / 1000000)) >wall_ms
id=$(grep -oE 'sweep-[0-9]+' submit.out | head -n1)
[ -n "$id" ] || { echo "no sweep id in the submit output:" >&2; tail -n 20 submit.out >&2; exit 1; }
ringleader sweep status "$id" --json >status.json
if [ "$rc" != 0 ]; then
  echo "sweep submit --watch exited $rc" >&2
  tail -n 20 submit.out >&2
  exit "$rc"
fi
EOF

echo "==> Ringleader: $TRIALS trials, 1 coordinator, 4 workers, etcd"
PATH="$BIN:$PATH" "$BIN/ringleader" local --workers 4 --coordinators 1 --dir "$TMP/cluster" \
  -- bash "$TMP/inside.sh" "$TMP" >"$TMP/local.out" 2>&1 || {
  echo "the Ringleader run failed; its output:" >&2
  tail -n 30 "$TMP/local.out" >&2
  exit 1
}
grep -E "^(sweep-|best)" "$TMP/submit.out" | tail -n 2
python - "$TMP" >"$TMP/results.jsonl" <<'EOF'
import json, sys
tmp = sys.argv[1]
status = json.load(open(f"{tmp}/status.json"))
sweep, trials = status["sweep"], status["trials"]
done = [t for t in trials if t.get("objective") is not None]
seconds = (sweep["finished_unix_ms"] - sweep["submitted_unix_ms"]) / 1000
wall = int(open(f"{tmp}/wall_ms").read()) / 1000
best = min(t["objective"] for t in done) if done else float("nan")
states = {}
for t in trials:
    states[t["state"]] = states.get(t["state"], 0) + 1
print(json.dumps({"system": "ringleader", "trials": len(done), "seconds": seconds,
                  "rate": len(done) / seconds, "best": best,
                  "note": f"submit --watch wall {wall:.2f} s ({len(done) / wall:.1f}/s); "
                          f"states {states}"}))
EOF

# ---- 2. Optuna and Ray Tune ------------------------------------------------
SYSTEMS="optuna-journal,optuna-sqlite"
[ "$SKIP_RAY" = 1 ] || SYSTEMS="$SYSTEMS,ray-tune"
echo "==> baselines: $SYSTEMS"
python "$ROOT/scripts/bench/sweep_baselines.py" --dir "$TMP/baselines" --trials "$TRIALS" \
  --ray-trials "$RAY_TRIALS" --systems "$SYSTEMS" 2>"$TMP/baselines.err" >>"$TMP/results.jsonl" || {
  echo "baselines failed:" >&2
  tail -n 30 "$TMP/baselines.err" >&2
  exit 1
}

# ---- summary ---------------------------------------------------------------
python - "$TMP/results.jsonl" <<'EOF'
import json, sys
# Only the JSON lines: Ray Tune prints its banner on stdout too.
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ref = next((r["rate"] for r in rows if r["system"] == "optuna-journal"), None)
print("\nSweep throughput (Hartmann-6, random search, 4 at a time, durable state)\n")
print("| system | trials | seconds | trials/s | vs Optuna journal |")
print("|---|---|---|---|---|")
for r in rows:
    ratio = f"{r['rate'] / ref:.2f}x" if ref else "-"
    print(f"| {r['system']} | {r['trials']} | {r['seconds']:.2f} | {r['rate']:.1f} | {ratio} |")
for r in rows:
    if r.get("note"):
        print(f"  {r['system']}: {r['note']}")
ours = next(r for r in rows if r["system"] == "ringleader")
print(f"\ntarget >= 500 trials/s: {'met' if ours['rate'] >= 500 else 'NOT met'} ({ours['rate']:.1f}/s)")
EOF
