#!/usr/bin/env bash
# Data-parallel training benchmark, in one run: samples/s of the reference
# CNN on Fashion-MNIST for world 1 and 2, Ringleader (a job on a local
# cluster: private etcd, 1 coordinator, W workers, the real gRPC ring)
# against PyTorch DDP with Gloo (scripts/bench/train_ddp.py) on the same
# model, batch size (64 per rank), optimiser and threads per process (1),
# interleaved round by round; medians, the ratio, scaling efficiency and
# the test accuracy after the timed epochs.
#
# Usage: scripts/bench/train.sh [--rounds 3] [--epochs 1] [--limit N] [--before DIR]
#            [--model cnn|mlp-wide] [--compression none|bf16|f16] [--worlds "1 2"]
#   --limit N trains on the first N examples only (0: all 60,000; the
#     default is 0 for cnn, 6400 for mlp-wide).
#   --before DIR also runs the binaries in DIR (another build, e.g. of an
#     earlier commit) in the same rounds, for a before/after comparison.
#   --model mlp-wide: the MLP 784→4096→4096→10 (hidden = [4096, 4096],
#     80 MB of gradients a step) instead of the reference CNN (0.9 MB).
#   --compression bf16|f16: the job's gradient_compression, against DDP
#     with its bf16_compress_hook / fp16_compress_hook (only at world > 1,
#     where something is sent).
#   --worlds: the world sizes to run (scaling efficiency needs 1 and 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"

ROUNDS=3
EPOCHS=1
LIMIT=""
BEFORE=""
MODEL=cnn
COMPRESSION=none
WORLDS="1 2"
while (($#)); do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --before) BEFORE="$(cd "$2" && pwd)"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --compression) COMPRESSION="$2"; shift 2 ;;
    --worlds) WORLDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$MODEL" in
  cnn) LIMIT="${LIMIT:-0}" ;;
  mlp-wide) LIMIT="${LIMIT:-6400}" ;;
  *) echo "--model: expected cnn or mlp-wide, got '$MODEL'" >&2; exit 2 ;;
esac
case "$COMPRESSION" in
  none|bf16|f16) ;;
  *) echo "--compression: expected none, bf16 or f16, got '$COMPRESSION'" >&2; exit 2 ;;
esac
[[ "$LIMIT" =~ ^[0-9]+$ ]] || { echo "--limit: expected a count, got '$LIMIT'" >&2; exit 2; }
[[ -n "${WORLDS// /}" ]] || { echo "--worlds: expected sizes such as \"1 2\"" >&2; exit 2; }
for world in $WORLDS; do
  [[ "$world" =~ ^[1-9][0-9]*$ ]] \
    || { echo "--worlds: expected sizes such as \"1 2\", got '$WORLDS'" >&2; exit 2; }
done

cargo build --release --workspace --locked --quiet
BIN="$ROOT/target/release"
TMP="$(mktemp -d -t ringleader-bench-train.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
RESULTS="$TMP/results.jsonl"

# The example job with this run's world, epochs, data limit, model,
# gradient compression (left out when none, so that a --before build that
# predates the key still reads the job) and 1 thread.
job_spec() {
  local world="$1" out="$TMP/job-$1.toml" model='kind = "cnn"' compression=""
  if [[ "$MODEL" == mlp-wide ]]; then
    model='kind = "mlp"\nhidden = [4096, 4096]'
  fi
  if [[ "$COMPRESSION" != none ]]; then
    compression="\ngradient_compression = \"$COMPRESSION\""
  fi
  sed -e "s/^workers = .*/workers = $world/" \
      -e "s/^epochs = .*/epochs = $EPOCHS/" \
      -e "s/^seed = \(.*\)/seed = \1\nthreads = 1$compression/" \
      -e "s/^classes = \(.*\)/classes = \1\nlimit_train = $LIMIT/" \
      -e "s/^kind = \"cnn\"$/$model/" \
      examples/fashion-mnist-cnn.toml > "$out"
  if [[ "$MODEL" == mlp-wide ]] && ! grep -q '^hidden = \[4096, 4096\]$' "$out"; then
    echo "could not make $out an mlp-wide job" >&2
    exit 1
  fi
  echo "$out"
}

# Runs the job on a fresh local cluster of the binaries in BIN_DIR (default
# this build), labelled SYSTEM; appends the last epoch's metrics.
ours() {
  local world="$1" bin="${2:-$BIN}" system="${3:-ringleader}" spec
  spec="$(job_spec "$world")"
  cat > "$TMP/inside.sh" <<INSIDE
set -euo pipefail
id=\$(ringleader job submit "$spec" --watch | sed -n 's/^submitted //p')
ringleader job status "\$id" --json > "$TMP/status.json"
INSIDE
  rm -rf "$TMP/cluster-$world"
  "$bin/ringleader" local --workers "$world" --coordinators 1 --dir "$TMP/cluster-$world" \
    -- bash "$TMP/inside.sh" > "$TMP/local.out" 2>&1
  python3 - "$TMP/status.json" "$world" "$system" >> "$RESULTS" <<'PY'
import json, sys
status = json.load(open(sys.argv[1]))
trial = status["trials"][0]
assert trial["state"] == "completed", trial.get("error")
m = trial["metrics"][-1]["metrics"]
print(json.dumps({"system": sys.argv[3], "world": int(sys.argv[2]),
                  "samples_per_sec": m["samples_per_sec"], "test_accuracy": m["test_accuracy"]}))
PY
}

torch_ddp() {
  local world="$1"
  python3 scripts/bench/train_ddp.py --world "$world" --epochs "$EPOCHS" --limit "$LIMIT" \
      --model "$MODEL" --compression "$COMPRESSION" \
    | tail -n 1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"system": "pytorch-ddp", "world": r["world"],
                  "samples_per_sec": r["samples_per_sec"], "test_accuracy": r["test_accuracy"]}))' \
    >> "$RESULTS"
}

for round in $(seq 1 "$ROUNDS"); do
  for world in $WORLDS; do
    echo "round $round/$ROUNDS, world $world: ringleader" >&2
    ours "$world"
    if [[ -n "$BEFORE" ]]; then
      echo "round $round/$ROUNDS, world $world: ringleader before ($BEFORE)" >&2
      ours "$world" "$BEFORE" "ringleader-before"
    fi
    echo "round $round/$ROUNDS, world $world: pytorch ddp" >&2
    torch_ddp "$world"
  done
done

python3 - "$RESULTS" "$ROUNDS" "$EPOCHS" "$LIMIT" "$MODEL" "$COMPRESSION" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
systems = list(dict.fromkeys(r["system"] for r in rows))
worlds = sorted({r["world"] for r in rows})
model = {"cnn": "reference CNN", "mlp-wide": "MLP 784-4096-4096-10"}[sys.argv[5]]
gradients = {"none": "f32 gradients",
             "bf16": "bf16 gradients at world > 1 (DDP: bf16_compress_hook)",
             "f16": "f16 gradients at world > 1 (DDP: fp16_compress_hook)"}[sys.argv[6]]
print("every run, samples/s in round order:")
for system in systems:
    for world in worlds:
        runs = [round(r["samples_per_sec"]) for r in rows if r["system"] == system and r["world"] == world]
        print(f"  {system:>18} world {world}: {runs}")
def med(system, world, key):
    return statistics.median(r[key] for r in rows if r["system"] == system and r["world"] == world)
limit = sys.argv[4] if sys.argv[4] != "0" else "none"
print(f"{model}, Fashion-MNIST, batch 64/rank, 1 thread/process, {gradients}, "
      f"{sys.argv[3]} epoch(s), limit {limit}, median of {sys.argv[2]} rounds")
print(f"{'world':>5}  {'ringleader sps':>15}  {'pytorch ddp sps':>16}  {'ratio':>6}  {'acc ours':>8}  {'acc ddp':>8}")
for world in worlds:
    ours, ddp = med("ringleader", world, "samples_per_sec"), med("pytorch-ddp", world, "samples_per_sec")
    print(f"{world:>5}  {ours:>15.0f}  {ddp:>16.0f}  {ours / ddp:>5.2f}x  "
          f"{med('ringleader', world, 'test_accuracy'):>8.4f}  {med('pytorch-ddp', world, 'test_accuracy'):>8.4f}")
if "ringleader-before" in systems:
    for world in worlds:
        now, before = med("ringleader", world, "samples_per_sec"), med("ringleader-before", world, "samples_per_sec")
        print(f"world {world}: this build {now:.0f} vs before {before:.0f} samples/s: {now / before:.2f}x")
for system in systems if {1, 2} <= set(worlds) else []:
    eff = med(system, 2, "samples_per_sec") / (2 * med(system, 1, "samples_per_sec"))
    print(f"scaling efficiency world 1 -> 2, {system}: {eff:.2f}")
PY
