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
#            [--model cnn|mlp-wide] [--compression "none bf16 f16"] [--worlds "1 2"]
#   --limit N trains on the first N examples only (0: all 60,000; the
#     default is 0 for cnn, 6400 for mlp-wide).
#   --before DIR also runs the binaries in DIR (another build, e.g. of an
#     earlier commit) in the same rounds, for a before/after comparison
#     (uncompressed runs only).
#   --model mlp-wide: the MLP 784→4096→4096→10 (hidden = [4096, 4096],
#     80 MB of gradients a step) instead of the reference CNN (0.9 MB).
#   --compression: one or more of none (default), bf16, f16: the job's
#     gradient_compression, against DDP with its bf16_compress_hook /
#     fp16_compress_hook (at world > 1, where something is sent). Several
#     are run in the same rounds, their order reversed every other round.
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
COMPRESSIONS=none
WORLDS="1 2"
while (($#)); do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --before) BEFORE="$(cd "$2" && pwd)"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --compression) COMPRESSIONS="$2"; shift 2 ;;
    --worlds) WORLDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$MODEL" in
  cnn) LIMIT="${LIMIT:-0}" ;;
  mlp-wide) LIMIT="${LIMIT:-6400}" ;;
  *) echo "--model: expected cnn or mlp-wide, got '$MODEL'" >&2; exit 2 ;;
esac
[[ -n "${COMPRESSIONS// /}" ]] || { echo "--compression: expected none, bf16 or f16" >&2; exit 2; }
for compression in $COMPRESSIONS; do
  case "$compression" in
    none|bf16|f16) ;;
    *) echo "--compression: expected none, bf16 or f16, got '$compression'" >&2; exit 2 ;;
  esac
done
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
# gradient COMPRESSION (left out when none, so that a --before build that
# predates the key still reads the job) and 1 thread.
job_spec() {
  local world="$1" compression="$2" out="$TMP/job-$1-$2.toml" model='kind = "cnn"' key=""
  if [[ "$MODEL" == mlp-wide ]]; then
    model='kind = "mlp"\nhidden = [4096, 4096]'
  fi
  if [[ "$compression" != none ]]; then
    key="\ngradient_compression = \"$compression\""
  fi
  sed -e "s/^workers = .*/workers = $world/" \
      -e "s/^epochs = .*/epochs = $EPOCHS/" \
      -e "s/^seed = \(.*\)/seed = \1\nthreads = 1$key/" \
      -e "s/^classes = \(.*\)/classes = \1\nlimit_train = $LIMIT/" \
      -e "s/^kind = \"cnn\"$/$model/" \
      examples/fashion-mnist-cnn.toml > "$out"
  if [[ "$MODEL" == mlp-wide ]] && ! grep -q '^hidden = \[4096, 4096\]$' "$out"; then
    echo "could not make $out an mlp-wide job" >&2
    exit 1
  fi
  echo "$out"
}

# Runs the job (WORLD workers, COMPRESSION) on a fresh local cluster of the
# binaries in BIN_DIR (default this build), labelled SYSTEM; appends the
# last epoch's metrics.
ours() {
  local world="$1" compression="$2" bin="${3:-$BIN}" system="${4:-ringleader}" spec
  spec="$(job_spec "$world" "$compression")"
  cat > "$TMP/inside.sh" <<INSIDE
set -euo pipefail
id=\$(ringleader job submit "$spec" --watch | sed -n 's/^submitted //p')
ringleader job status "\$id" --json > "$TMP/status.json"
INSIDE
  rm -rf "$TMP/cluster-$world"
  "$bin/ringleader" local --workers "$world" --coordinators 1 --dir "$TMP/cluster-$world" \
    -- bash "$TMP/inside.sh" > "$TMP/local.out" 2>&1
  python3 - "$TMP/status.json" "$world" "$system" "$compression" >> "$RESULTS" <<'PY'
import json, sys
status = json.load(open(sys.argv[1]))
trial = status["trials"][0]
assert trial["state"] == "completed", trial.get("error")
m = trial["metrics"][-1]["metrics"]
print(json.dumps({"system": sys.argv[3], "world": int(sys.argv[2]), "compression": sys.argv[4],
                  "samples_per_sec": m["samples_per_sec"], "test_accuracy": m["test_accuracy"]}))
PY
}

torch_ddp() {
  local world="$1" compression="$2"
  python3 scripts/bench/train_ddp.py --world "$world" --epochs "$EPOCHS" --limit "$LIMIT" \
      --model "$MODEL" --compression "$compression" \
    | tail -n 1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"system": "pytorch-ddp", "world": r["world"], "compression": r["compression"],
                  "samples_per_sec": r["samples_per_sec"], "test_accuracy": r["test_accuracy"]}))' \
    >> "$RESULTS"
}

for round in $(seq 1 "$ROUNDS"); do
  order="$COMPRESSIONS"
  if ((round % 2 == 0)); then
    order="$(echo "$COMPRESSIONS" | tr ' ' '\n' | grep . | tac | tr '\n' ' ')"
  fi
  for world in $WORLDS; do
    for compression in $order; do
      # One rank sends nothing: a compressed run at world 1 is the plain one.
      if ((world == 1)) && [[ "$compression" != none ]]; then continue; fi
      echo "round $round/$ROUNDS, world $world, $compression: ringleader" >&2
      ours "$world" "$compression"
      if [[ -n "$BEFORE" && "$compression" == none ]]; then
        echo "round $round/$ROUNDS, world $world: ringleader before ($BEFORE)" >&2
        ours "$world" none "$BEFORE" "ringleader-before"
      fi
      echo "round $round/$ROUNDS, world $world, $compression: pytorch ddp" >&2
      torch_ddp "$world" "$compression"
    done
  done
done

python3 - "$RESULTS" "$ROUNDS" "$EPOCHS" "$LIMIT" "$MODEL" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
systems = list(dict.fromkeys(r["system"] for r in rows))
worlds = sorted({r["world"] for r in rows})
compressions = list(dict.fromkeys(r["compression"] for r in rows))
model = {"cnn": "reference CNN", "mlp-wide": "MLP 784-4096-4096-10"}[sys.argv[5]]
hooks = {"none": "f32 gradients", "bf16": "bf16 gradients (DDP: bf16_compress_hook)",
         "f16": "f16 gradients (DDP: fp16_compress_hook)"}
def runs(system, world, compression):
    return [r for r in rows
            if (r["system"], r["world"], r["compression"]) == (system, world, compression)]
def med(system, world, key, compression="none"):
    return statistics.median(r[key] for r in runs(system, world, compression))
print("every run, samples/s in round order:")
for compression in compressions:
    for system in systems:
        for world in worlds:
            if runs(system, world, compression):
                sps = [round(r["samples_per_sec"]) for r in runs(system, world, compression)]
                print(f"  {system:>18} {compression:>4} world {world}: {sps}")
limit = sys.argv[4] if sys.argv[4] != "0" else "none"
print(f"{model}, Fashion-MNIST, batch 64/rank, 1 thread/process, "
      f"{sys.argv[3]} epoch(s), limit {limit}, median of {sys.argv[2]} rounds")
for compression in compressions:
    print(hooks[compression] + ":")
    print(f"{'world':>5}  {'ringleader sps':>15}  {'pytorch ddp sps':>16}  {'ratio':>6}  "
          f"{'acc ours':>8}  {'acc ddp':>8}")
    for world in worlds:
        if not runs("ringleader", world, compression):
            continue
        ours = med("ringleader", world, "samples_per_sec", compression)
        ddp = med("pytorch-ddp", world, "samples_per_sec", compression)
        print(f"{world:>5}  {ours:>15.0f}  {ddp:>16.0f}  {ours / ddp:>5.2f}x  "
              f"{med('ringleader', world, 'test_accuracy', compression):>8.4f}  "
              f"{med('pytorch-ddp', world, 'test_accuracy', compression):>8.4f}")
if "none" in compressions:
    for compression in compressions:
        for world in worlds:
            if compression == "none" or not runs("ringleader", world, compression):
                continue
            for system in ("ringleader", "pytorch-ddp"):
                plain = med(system, world, "samples_per_sec")
                squeezed = med(system, world, "samples_per_sec", compression)
                print(f"world {world}, {system}: {compression} {squeezed:.0f} vs none "
                      f"{plain:.0f} samples/s: {squeezed / plain:.2f}x")
if "ringleader-before" in systems:
    for world in worlds:
        now, before = med("ringleader", world, "samples_per_sec"), med("ringleader-before", world, "samples_per_sec")
        print(f"world {world}: this build {now:.0f} vs before {before:.0f} samples/s: {now / before:.2f}x")
for system in systems if {1, 2} <= set(worlds) and "none" in compressions else []:
    eff = med(system, 2, "samples_per_sec") / (2 * med(system, 1, "samples_per_sec"))
    print(f"scaling efficiency world 1 -> 2, {system}: {eff:.2f}")
PY
