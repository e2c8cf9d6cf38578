#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, torch 2.11 in its Python, no
# network, no cargo, and prebuilt binaries carried to it (docs/GPU-CHECK.md).
# Three steps (plus a host-memory ring check when ringleader-ring is there),
# all on ONE device shared by 2 processes, then one summary table:
#   1. allreduce: a 2-worker Ringleader job, device = "cuda", the MLP
#      784-4096-4096-10 (about 80 MB of CUDA gradients all-reduced a step,
#      through the worker's host staging copy), 6,400 examples;
#   2. cnn: one epoch of the reference CNN (examples/fashion-mnist-cnn.toml)
#      as a 2-worker job, device = "cuda": samples/s, epoch time, accuracy;
#   3. ddp: PyTorch DDP, 2 processes on the same GPU, same model, batch and
#      threads (scripts/gpu_check_ddp.py; Gloo with CUDA tensors, as NCCL
#      refuses two ranks on one GPU).
#
# Usage:
#   scripts/gpu-check.sh [--device cuda|cpu] [--bin-dir DIR] [--data DIR]
#                        [--timeout SECS] [--python PY] [--threads N]
#                        [--limit N] [--out DIR] [--keep]
#   scripts/gpu-check.sh --pack DIR [--with-data] [--bin-dir DIR] [--data DIR]
#
#   --device cpu   a dry run of the very same steps on the CPU, with small
#                  data limits, for machines without a GPU.
#   --bin-dir DIR  ringleader and ringleader-worker (and ringleader-ring,
#                  etcd when there), or a bin.tar.xz made by --pack
#                  (default: target/release).
#   --data DIR     Fashion-MNIST (the four IDX .gz files); default the first
#                  of /usr/share/datasets/fashion-mnist and BIN_DIR/fashion-mnist.
#   --timeout SECS the whole check, preflight included (default 300).
#   --python PY    a Python with torch (default: python3, else ./.venv).
#   --threads N    libtorch threads per process, both systems (default 1).
#   --limit N      training examples of the cnn and ddp steps (0: all; the
#                  default: 0 on cuda, 1024 on cpu).
#   --out DIR      also copy the summary (text and JSON lines) and every log there.
#   --keep         keep the private working directory (kept anyway on failure).
#   --pack DIR     make DIR/bin.tar.xz (stripped binaries, etcd from PATH,
#                  MANIFEST) to carry to the GPU machine; --with-data also
#                  copies the data to DIR/fashion-mnist.
#
# Exit status: 0 every step passed; 1 a step failed; 2 usage; 3 the machine
# lacks something (CUDA, torch, binaries, etcd, data) and nothing ran.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEVICE=cuda
BIN_DIR="$ROOT/target/release"
DATA=""
TIMEOUT=300
PYTHON=""
THREADS=1
LIMIT=""
OUT=""
KEEP=0
PACK=""
WITH_DATA=0
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "$1 needs a value (see --help)" >&2; exit 2; }; }
while (($#)); do
  case "$1" in
    --device) need_value "$@"; DEVICE="$2"; shift 2 ;;
    --bin-dir) need_value "$@"; BIN_DIR="$2"; shift 2 ;;
    --data) need_value "$@"; DATA="$2"; shift 2 ;;
    --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --threads) need_value "$@"; THREADS="$2"; shift 2 ;;
    --limit) need_value "$@"; LIMIT="$2"; shift 2 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --pack) need_value "$@"; PACK="$2"; shift 2 ;;
    --with-data) WITH_DATA=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda|cpu) ;;
  *) echo "--device: expected cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || { echo "--timeout: expected seconds, got '$TIMEOUT'" >&2; exit 2; }
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || { echo "--threads: expected a count, got '$THREADS'" >&2; exit 2; }
[[ -z "$LIMIT" || "$LIMIT" =~ ^[0-9]+$ ]] || { echo "--limit: expected a count, got '$LIMIT'" >&2; exit 2; }
[[ -d "$BIN_DIR" ]] || { echo "--bin-dir: no directory $BIN_DIR" >&2; exit 3; }
BIN_DIR="$(cd "$BIN_DIR" && pwd)"

STARTED=$SECONDS
say() { printf '[gpu-check %3ds] %s\n' "$((SECONDS - STARTED))" "$*" >&2; }
# Something this machine lacks: nothing (more) is run.
missing() { printf '\ngpu-check: %s\n' "$*" >&2; exit 3; }

# Where the data may be: --data, else the Debian package's place, else
# beside the carried binaries (--pack --with-data).
DATA_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
            t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
find_data() {
  local candidates=() dir f absent
  if [[ -n "$DATA" ]]; then candidates=("$DATA"); else
    candidates=(/usr/share/datasets/fashion-mnist "$BIN_DIR/fashion-mnist"); fi
  for dir in "${candidates[@]}"; do
    absent=0
    for f in "${DATA_FILES[@]}"; do [[ -r "$dir/$f" ]] || absent=1; done
    if ((absent == 0)); then DATA="$(cd "$dir" && pwd)"; return 0; fi
  done
  missing "Fashion-MNIST not found: looked for ${DATA_FILES[*]} in ${candidates[*]}.
  Debian's dataset-fashion-mnist package puts them in /usr/share/datasets/fashion-mnist
  (scripts/setup.sh installs it); on a machine without network, carry them
  (scripts/gpu-check.sh --pack DIR --with-data) or pass --data DIR."
}

# ---------------------------------------------------------------- --pack
if [[ -n "$PACK" ]]; then
  mkdir -p "$PACK"
  PACK="$(cd "$PACK" && pwd)"
  STAGE="$(mktemp -d -t ringleader-gpu-pack.XXXXXX)"
  trap 'rm -rf "$STAGE"' EXIT
  for b in ringleader ringleader-worker ringleader-ring; do
    [[ -x "$BIN_DIR/$b" ]] || missing "no $BIN_DIR/$b: build first (cargo build --release --workspace --locked)"
    cp "$BIN_DIR/$b" "$STAGE/$b"
    if command -v strip >/dev/null; then strip "$STAGE/$b"; fi
  done
  etcd_bin="${RINGLEADER_ETCD_BIN:-$(command -v etcd || true)}"
  if [[ -n "$etcd_bin" && -x "$etcd_bin" ]]; then
    cp "$etcd_bin" "$STAGE/etcd"
  else
    echo "warning: no etcd on PATH: the pack has none, so the GPU machine must have etcd" >&2
  fi
  {
    echo "packed $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    echo "commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "linked against $(ldd "$BIN_DIR/ringleader-worker" 2>/dev/null | awk '/libtorch_cpu/ {print $3}')"
    (cd "$STAGE" && sha256sum ringleader ringleader-worker ringleader-ring \
      && if [[ -f etcd ]]; then sha256sum etcd; fi)
  } > "$STAGE/MANIFEST"
  say "compressing the binaries (xz, one core, about 40 s)"
  tar -C "$STAGE" -cf - . | xz -6 -T1 > "$PACK/bin.tar.xz.part"
  mv "$PACK/bin.tar.xz.part" "$PACK/bin.tar.xz"
  if ((WITH_DATA)); then
    find_data
    mkdir -p "$PACK/fashion-mnist"
    for f in "${DATA_FILES[@]}"; do cp "$DATA/$f" "$PACK/fashion-mnist/$f"; done
  fi
  cat "$STAGE/MANIFEST"
  du -sh "$PACK"/* | sed 's/^/  /'
  echo "total $(du -sh "$PACK" | cut -f1) in $PACK; on the GPU machine: scripts/gpu-check.sh --bin-dir ${PACK#"$ROOT"/}"
  exit 0
fi

# ------------------------------------------------------------- the check
DEADLINE=$((SECONDS + TIMEOUT))
WORK="$(mktemp -d -t ringleader-gpu-check.XXXXXX)"
chmod 700 "$WORK"
mkdir -p "$WORK/tmp" "$WORK/logs"
# Everything the children make in "the temporary directory" (ring sockets
# among them) lands in ours and goes with it.
export TMPDIR="$WORK/tmp"
RUNNING=""     # the process group of the step in progress (timeout's pid)
FAILED=1       # cleared once the summary says every step passed
# shellcheck disable=SC2329  # invoked by the trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$RUNNING" ]]; then
    kill -TERM -- "-$RUNNING" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 -- "-$RUNNING" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$RUNNING" 2>/dev/null || true
  fi
  if ((KEEP)) || { ((FAILED)) && ((rc != 3)) && ((rc != 2)); }; then
    echo "gpu-check: logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs "$@" in its own process group (GNU timeout makes one and signals all
# of it), for at most SECS, stdout to OUT and stderr to ERR (here, not on
# the call, so that the traps keep this script's own stderr); the trap
# above ends it if we are stopped.
bounded() {
  local secs="$1" out="$2" err="$3" rc=0
  shift 3
  if [[ "$out" == "$err" ]]; then
    timeout --kill-after=10 "$secs" "$@" > "$out" 2>&1 &
  else
    timeout --kill-after=10 "$secs" "$@" > "$out" 2> "$err" &
  fi
  RUNNING=$!
  wait "$RUNNING" || rc=$?
  RUNNING=""
  return "$rc"
}
# Seconds left for the check, less a reserve for timeout's --kill-after,
# the clean-up and the summary, so that the whole stays inside --timeout.
left() { echo $((DEADLINE - SECONDS - 15)); }

# ---- preflight: Python and torch (CUDA first, so that a machine without it
# is told so at once).
# The first Python (--python, else python3, else ./.venv) that imports torch
# tells what it has.
probe() {
  "$1" - > "$WORK/torch.json" 2> "$WORK/logs/torch-probe.err" <<'PY'
import json, os, sys
import torch
import torch.distributed as dist
info = {
    "python": sys.executable,
    "torch": torch.__version__,
    "torch_lib": os.path.join(os.path.dirname(torch.__file__), "lib"),
    "torch_cuda": torch.version.cuda,
    "gloo": dist.is_available() and dist.is_gloo_available(),
    "cuda_available": torch.cuda.is_available(),
    "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
}
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info["gpu"] = props.name
    info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    info["capability"] = f"{props.major}.{props.minor}"
print(json.dumps(info))
PY
}
candidates=("$PYTHON")
[[ -n "$PYTHON" ]] || candidates=(python3 "$ROOT/.venv/bin/python3")
PYTHON=""
for candidate in "${candidates[@]}"; do
  if command -v "$candidate" >/dev/null; then
    say "probing torch with $candidate"
    if probe "$candidate"; then PYTHON="$(command -v "$candidate")"; break; fi
  fi
done
[[ -n "$PYTHON" ]] || missing "no Python with torch among ${candidates[*]}: $(tail -n 1 "$WORK/logs/torch-probe.err" 2>/dev/null)
  The GPU machine's python3 should have torch 2.11; elsewhere pass --python PY or run scripts/setup.sh"
jget() { "$PYTHON" -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' "$@"; }
TORCH_VERSION="$(jget "$WORK/torch.json" torch)"
TORCH_LIB="$(jget "$WORK/torch.json" torch_lib)"
if [[ "$DEVICE" == cuda && "$(jget "$WORK/torch.json" cuda_available)" != True ]]; then
  smi="nvidia-smi: not installed"
  if command -v nvidia-smi >/dev/null; then
    smi="nvidia-smi -L: $(nvidia-smi -L 2>&1 | head -n 3 | tr '\n' ' ')"
  fi
  missing "no CUDA: torch $TORCH_VERSION (CUDA build: $(jget "$WORK/torch.json" torch_cuda | sed 's/^$/none/')) in $PYTHON
  reports torch.cuda.is_available() = False, so there is no GPU to check. $smi
  This check needs an NVIDIA GPU and a CUDA build of torch 2.11; to check the
  plumbing on a machine without one, run: scripts/gpu-check.sh --device cpu"
fi
[[ "$(jget "$WORK/torch.json" gloo)" == True ]] || missing "torch.distributed with Gloo is not available in $PYTHON"
case "$TORCH_VERSION" in
  2.11.*) ;;
  *) missing "torch $TORCH_VERSION in $PYTHON: the binaries link libtorch 2.11 (tch 0.24) and need torch 2.11's libraries" ;;
esac
GPU_LINE="cpu"
if [[ "$DEVICE" == cuda ]]; then
  GPU_LINE="$(jget "$WORK/torch.json" gpu), $(jget "$WORK/torch.json" gpu_memory_gib) GiB, capability $(jget "$WORK/torch.json" capability), $(jget "$WORK/torch.json" cuda_devices) device(s), CUDA $(jget "$WORK/torch.json" torch_cuda)"
  if command -v nvidia-smi >/dev/null; then
    mode="$(nvidia-smi --query-gpu=compute_mode,driver_version --format=csv,noheader -i 0 2>/dev/null || true)"
    GPU_LINE="$GPU_LINE, compute mode/driver: ${mode:-unknown}"
    case "$mode" in
      Exclusive_Process*|Prohibited*)
        missing "GPU 0's compute mode is '${mode%%,*}': two processes cannot share it, and this check runs two ranks on it (it does not change the mode)" ;;
    esac
  fi
fi
say "torch $TORCH_VERSION; device: $GPU_LINE"

# ---- binaries: as they are in BIN_DIR, or unpacked from its bin.tar.xz.
BINS="$BIN_DIR"
if [[ ! -x "$BIN_DIR/ringleader" || ! -x "$BIN_DIR/ringleader-worker" ]]; then
  if [[ -f "$BIN_DIR/bin.tar.xz" ]]; then
    say "unpacking $BIN_DIR/bin.tar.xz"
    BINS="$WORK/bin"
    mkdir -p "$BINS"
    if ! tar -C "$BINS" -xJf "$BIN_DIR/bin.tar.xz" 2>/dev/null; then
      "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$BIN_DIR/bin.tar.xz" "$BINS" || missing "could not unpack $BIN_DIR/bin.tar.xz"
    fi
  else
    missing "no ringleader and ringleader-worker in $BIN_DIR, and no bin.tar.xz there:
  build them (cargo build --release --workspace --locked) or carry a pack
  (scripts/gpu-check.sh --pack DIR on the build machine; docs/GPU-CHECK.md)"
  fi
fi
BINS_SHOWN="$BINS"
MANIFEST="the working copy is at $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "an unknown commit")"
if [[ -f "$BINS/MANIFEST" ]]; then
  BINS_SHOWN="$BIN_DIR/bin.tar.xz"
  MANIFEST="commit $(sed -n 's/^commit //p' "$BINS/MANIFEST"), $(head -n 1 "$BINS/MANIFEST")"
fi
# libtorch: the lib folder beside the torch package of this Python (the
# binaries' rpath points at the build machine's).
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unresolved="$(ldd "$BINS/ringleader-worker" 2>&1 | grep 'not found' || true)"
[[ -z "$unresolved" ]] || missing "ringleader-worker cannot load its libraries with LD_LIBRARY_PATH=$TORCH_LIB:
$unresolved"
if [[ "$DEVICE" == cuda ]] && ! ldd "$BINS/ringleader-worker" | grep -q 'libtorch_cuda\.so'; then
  missing "$BINS/ringleader-worker does not link libtorch_cuda.so (built against a CPU-only libtorch?), so it cannot see the GPU; rebuild against torch 2.11 with CUDA"
fi
"$BINS/ringleader-worker" --version > /dev/null 2> "$WORK/logs/worker-version.err" \
  || missing "$BINS/ringleader-worker does not start: $(head -n 5 "$WORK/logs/worker-version.err")"

# ---- etcd: RINGLEADER_ETCD_BIN, else carried with the binaries, else PATH.
if [[ -z "${RINGLEADER_ETCD_BIN:-}" ]]; then
  if [[ -x "$BINS/etcd" ]]; then
    export RINGLEADER_ETCD_BIN="$BINS/etcd"
  elif command -v etcd >/dev/null; then
    RINGLEADER_ETCD_BIN="$(command -v etcd)"
    export RINGLEADER_ETCD_BIN
  else
    missing "etcd not found (not in $BINS, not on PATH, RINGLEADER_ETCD_BIN unset): the local
  cluster's coordinator keeps its state in a private etcd that \`ringleader local\` starts.
  Install Debian's etcd-server, or carry one: scripts/gpu-check.sh --pack DIR puts /usr/bin/etcd in the pack"
  fi
fi
"$RINGLEADER_ETCD_BIN" --version > "$WORK/logs/etcd-version.txt" 2>&1 \
  || missing "$RINGLEADER_ETCD_BIN --version fails: $(head -n 3 "$WORK/logs/etcd-version.txt")"

find_data

# ---- what each step runs.
if [[ "$DEVICE" == cuda ]]; then
  LIMIT="${LIMIT:-0}"; LIMIT_TEST=0; AR_LIMIT=6400; AR_LIMIT_TEST=1000
else
  LIMIT="${LIMIT:-1024}"; LIMIT_TEST=500; AR_LIMIT=256; AR_LIMIT_TEST=128
fi
# The example job, on this data, device, thread count and limits.
job_spec() {
  local name="$1" model="$2" limit="$3" limit_test="$4" lr="$5" out="$WORK/job-$1.toml"
  sed -e "s/^name = .*/name = \"gpu-check-$name\"/" \
      -e "s/^workers = .*/workers = 2/" \
      -e "s/^epochs = .*/epochs = 1/" \
      -e "s/^seed = \(.*\)/seed = \1\ndevice = \"$DEVICE\"\nthreads = $THREADS/" \
      -e "s/^classes = \(.*\)/classes = \1\nlimit_train = $limit\nlimit_test = $limit_test/" \
      -e "s|/usr/share/datasets/fashion-mnist/|$DATA/|" \
      -e "s/^kind = \"cnn\"$/$model/" \
      -e "s/^lr = .*/lr = $lr/" \
      examples/fashion-mnist-cnn.toml > "$out"
  if ! grep -q "^device = \"$DEVICE\"$" "$out" || ! grep -q "^limit_test = $limit_test$" "$out" \
      || ! grep -q "^images = \"$DATA/t10k" "$out" || ! grep -q "^lr = $lr$" "$out"; then
    echo "could not make $out from examples/fashion-mnist-cnn.toml (has it changed?)" >&2
    exit 1
  fi
}
# The wide MLP with the example's lr of 0.05 (and momentum 0.9) overshoots
# in its first steps; 0.01 keeps its loss finite, which the summary checks.
job_spec allreduce 'kind = "mlp"\nhidden = [4096, 4096]' "$AR_LIMIT" "$AR_LIMIT_TEST" 0.01
job_spec cnn 'kind = "cnn"' "$LIMIT" "$LIMIT_TEST" 0.05
grep -q '^hidden = \[4096, 4096\]$' "$WORK/job-allreduce.toml" \
  || { echo "could not make the allreduce job an MLP" >&2; exit 1; }

"$PYTHON" - "$WORK/settings.json" <<'PY' \
  "$DEVICE" "$GPU_LINE" "$TORCH_VERSION" "$PYTHON" "$BINS_SHOWN" "$MANIFEST" "$RINGLEADER_ETCD_BIN" \
  "$DATA" "$THREADS" "$LIMIT" "$LIMIT_TEST" "$AR_LIMIT" "$AR_LIMIT_TEST" "$TIMEOUT"
import json, sys
keys = ["device", "gpu", "torch", "python", "binaries", "build", "etcd", "data",
        "threads", "limit", "limit_test", "ar_limit", "ar_limit_test", "timeout"]
values = sys.argv[2:]
settings = {k: (int(v) if i >= 8 else v) for i, (k, v) in enumerate(zip(keys, values))}
json.dump(settings, open(sys.argv[1], "w"))
PY
say "binaries $BINS_SHOWN ($MANIFEST); etcd $RINGLEADER_ETCD_BIN; data $DATA"

# ---- 0. the ring itself on host buffers (every dtype x op x length against
# a reference, hashes per case), when ringleader-ring was carried.
if [[ -x "$BINS/ringleader-ring" ]] && (($(left) > 10)); then
  say "ring check: 2 ringleader-ring ranks, host buffers"
  "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/ring.secret"
  chmod 600 "$WORK/ring.secret"
  peers="$("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(",".join("127.0.0.1:%d" % s.getsockname()[1] for s in socks))')"
  cat > "$WORK/ring.sh" <<RING
for rank in 0 1; do
  "$BINS/ringleader-ring" --mode check --rank \$rank --peers $peers --big 1000000 \
    --insecure --ring-secret-file "$WORK/ring.secret" \
    > "$WORK/logs/ring-\$rank.out" 2> "$WORK/logs/ring-\$rank.err" &
done
rc=0
for job in \$(jobs -p); do wait \$job || rc=1; done
exit \$rc
RING
  rc=0
  bounded "$(( $(left) < 30 ? $(left) : 30 ))" "$WORK/logs/ring.out" "$WORK/logs/ring.err" \
    bash "$WORK/ring.sh" || rc=$?
  echo "$rc" > "$WORK/ring.rc"
fi

# ---- 1 and 2: a local cluster (private etcd, 1 coordinator, 2 workers on
# the device), both jobs one after the other.
budget=$(( $(left) * 6 / 10 ))
if ((budget > 10)); then
  say "ringleader: local cluster with 2 workers on $DEVICE, jobs allreduce and cnn (at most ${budget}s)"
  cat > "$WORK/inside.sh" <<INSIDE
set -uo pipefail
"$BINS/ringleader" status --json > "$WORK/cluster-status.json"
for job in allreduce cnn; do
  start=\$(date +%s.%N)
  "$BINS/ringleader" job submit "$WORK/job-\$job.toml" --watch \
    > "$WORK/logs/submit-\$job.out" 2> "$WORK/logs/submit-\$job.err"
  echo "\$? \$start \$(date +%s.%N)" > "$WORK/wall-\$job.txt"
  id=\$(sed -n 's/^submitted //p' "$WORK/logs/submit-\$job.out")
  if [[ -n "\$id" ]]; then
    "$BINS/ringleader" job status "\$id" --json > "$WORK/job-\$job.json"
  fi
done
INSIDE
  rc=0
  bounded "$budget" "$WORK/logs/local.out" "$WORK/logs/local.out" \
    "$BINS/ringleader" local --workers 2 --coordinators 1 --device "$DEVICE" \
    --dir "$WORK/cluster" --data-root "$DATA" -- bash "$WORK/inside.sh" || rc=$?
  echo "$rc" > "$WORK/cluster.rc"
fi

# ---- 3. PyTorch DDP, 2 processes on the same device.
budget=$(left)
if ((budget > 10)); then
  say "pytorch ddp: 2 processes on $DEVICE, gloo (at most ${budget}s)"
  rc=0
  bounded "$budget" "$WORK/logs/ddp.out" "$WORK/logs/ddp.err" \
    "$PYTHON" scripts/gpu_check_ddp.py --device "$DEVICE" --backend gloo \
    --data "$DATA" --limit "$LIMIT" --limit-test "$LIMIT_TEST" --threads "$THREADS" || rc=$?
  echo "$rc" > "$WORK/ddp.rc"
fi

# ---- the summary.
cp "$WORK"/job-*.toml "$WORK/logs/" 2>/dev/null || true
[[ -d "$WORK/cluster" ]] && cp "$WORK"/cluster/*.log "$WORK/logs/" 2>/dev/null || true
rc=0
"$PYTHON" - "$WORK" "$((SECONDS - STARTED))" > "$WORK/summary.txt" <<'PY' || rc=$?
import json, math, os, re, sys

work, elapsed = sys.argv[1], int(sys.argv[2])
settings = json.load(open(os.path.join(work, "settings.json")))
device, full = settings["device"], settings["limit"] == 0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
rows = []


def read(name, default=None):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return default
    with open(path, errors="replace") as f:
        return f.read()


def tail(name, n=3):
    text = ANSI.sub("", read(name, "") or "")
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return " | ".join(lines[-n:])


def add(step, ok, detail, **values):
    rows.append({"step": step, "status": "PASS" if ok else "FAIL", "detail": detail, **values})


# 0. ring check
ring_rc = read("ring.rc")
if ring_rc is None:
    rows.append({"step": "ring-check (host)", "status": "SKIP",
                 "detail": "no ringleader-ring in the binaries (or no time left)"})
else:
    ranks = []
    for r in (0, 1):
        lines = (read(f"logs/ring-{r}.out", "") or "").splitlines()
        ranks.append([json.loads(l) for l in lines if l.startswith("{")])
    ok_cases = [all(c.get("ok") is True for c in cases) for cases in ranks]
    hashes = [{c["case"]: c["hash"] for c in cases if "hash" in c} for cases in ranks]
    same = hashes[0] == hashes[1] and len(hashes[0]) > 0
    ok = ring_rc.strip() == "0" and all(ok_cases) and len(ranks[0]) == len(ranks[1]) > 0 and same
    detail = (f"{len(ranks[0])} cases per rank, all equal to the reference: {all(ok_cases)}; "
              f"result hashes identical across ranks: {same} ({len(hashes[0])} all-reduce cases); "
              "host memory, not CUDA")
    if not ok:
        detail += f"; rc {ring_rc.strip()}: {tail('logs/ring-0.err')} {tail('logs/ring-1.err')}"
    add("ring-check (host)", ok, detail, cases=len(ranks[0]), hashes_identical=same)

# 1, 2. ringleader jobs
cluster_rc = read("cluster.rc")
status = json.loads(read("cluster-status.json") or "null")
workers = (status or {}).get("workers", [])
devices = sorted({w.get("device", "?") for w in workers})
gpus = sorted({g.get("name", "?") for w in workers for g in w.get("gpus", [])})
logs = "".join(ANSI.sub("", read(f"cluster/worker-{i}.log", "") or "") for i in (0, 1))
unix_links = logs.count("ring link to the successor over its Unix socket")
transport = (f"Unix socket ({unix_links} links logged)" if unix_links else "TCP loopback")
cluster_note = ""
if cluster_rc is None:
    cluster_note = "not run (no time left)"
elif cluster_rc.strip() == "124":
    cluster_note = "timed out"
elif not workers:
    cluster_note = f"the cluster did not form (rc {cluster_rc.strip()}): {tail('logs/local.out', 4)}"


def job_row(name, label, extra):
    wall = (read(f"wall-{name}.txt") or "").split()
    view = json.loads(read(f"job-{name}.json") or "null")
    if view is None:
        add(label, False, cluster_note or f"no job status: {tail(f'logs/submit-{name}.err')} "
                                          f"{tail('logs/local.out')}")
        return None
    trial = view["trials"][0] if view.get("trials") else {}
    state = trial.get("state", view.get("sweep", {}).get("state", "?"))
    metrics = trial["metrics"][-1]["metrics"] if trial.get("metrics") else {}
    values = {"state": state, "workers_device": devices, **metrics}
    if len(wall) == 3:
        values["job_wall_seconds"] = round(float(wall[2]) - float(wall[1]), 2)
    ok = state == "completed" and bool(metrics)
    if device == "cuda" and not all(d.startswith("cuda") for d in devices):
        ok, extra = False, f"workers registered on {devices}, not CUDA; " + extra
    if metrics and not math.isfinite(metrics.get("train_loss", float("nan"))):
        ok, extra = False, "non-finite training loss (diverged, or corrupted gradients); " + extra
    detail = f"{state}"
    if not ok and trial.get("error"):
        detail += f": {trial['error']}"
    if metrics:
        detail += (f"; {metrics['samples_per_sec']:.0f} samples/s, epoch {metrics['epoch_seconds']:.2f} s, "
                   f"train loss {metrics['train_loss']:.4f}")
        if "test_accuracy" in metrics:
            detail += f", test accuracy {metrics['test_accuracy']:.4f}"
    if "job_wall_seconds" in values:
        detail += f"; submit to done {values['job_wall_seconds']:.1f} s"
    add(label, ok, f"{detail}; {extra}", **values)
    return rows[-1]


job_row("allreduce", "ringleader allreduce",
        f"MLP 784-4096-4096-10 (20.0M f32 gradients, ~80 MB a step in 25 MB buckets), "
        f"{settings['ar_limit']} examples, lr 0.01, workers on {', '.join(devices) or '?'}"
        f"{' (' + ', '.join(gpus) + ')' if gpus else ''}, ring over {transport}; "
        "cross-rank equality: not compared (the worker compares nothing; only rank 0 checkpoints)")
data = "all 60,000 examples" if full else f"first {settings['limit']} examples"
cnn = job_row("cnn", "ringleader cnn epoch",
              f"reference CNN, 1 epoch of {data}, batch 64/rank, {settings['threads']} thread(s)/rank")
if cnn and cnn["status"] == "PASS" and full and cnn.get("test_accuracy", 0) < 0.85:
    cnn["status"] = "FAIL"
    cnn["detail"] += "; test accuracy below the 0.85 bar one epoch reaches (worker/tests/train.rs)"

# 3. ddp
ddp_rc = read("ddp.rc")
out = [l for l in (read("logs/ddp.out", "") or "").splitlines() if l.startswith("{")]
if ddp_rc is None:
    rows.append({"step": "pytorch ddp epoch", "status": "FAIL", "detail": "not run (no time left)"})
elif ddp_rc.strip() != "0" or not out:
    note = "timed out" if ddp_rc.strip() == "124" else f"rc {ddp_rc.strip()}"
    add("pytorch ddp epoch", False, f"{note}: {tail('logs/ddp.err', 4)}")
else:
    r = json.loads(out[-1])
    backend = f"{r['backend']} with {'CUDA' if r['device'].startswith('cuda') else 'CPU'} tensors"
    add("pytorch ddp epoch", True,
        f"{r['samples_per_sec']:.0f} samples/s, epoch {r['epoch_seconds']:.2f} s, train loss "
        f"{r['train_loss']:.4f}, test accuracy {r['test_accuracy']:.4f}; backend {backend}, "
        f"2 processes on {r['device']}, same model, batch, data and threads", **r)

ours = next((r for r in rows if r["step"] == "ringleader cnn epoch" and "samples_per_sec" in r), None)
theirs = next((r for r in rows if r["step"] == "pytorch ddp epoch" and "samples_per_sec" in r), None)
ratio = ours["samples_per_sec"] / theirs["samples_per_sec"] if ours and theirs else None
passed = all(r["status"] != "FAIL" for r in rows)

print(f"Ringleader GPU check: {'PASS' if passed else 'FAIL'}"
      + ("" if device == "cuda" else "  (CPU DRY RUN: --device cpu, small data; says nothing about CUDA)"))
print(f"  device     {settings['gpu']}")
print(f"  torch      {settings['torch']} ({settings['python']})")
print(f"  binaries   {settings['binaries']} ({settings['build']})")
print(f"  data       {settings['data']}; etcd {settings['etcd']}")
print(f"  elapsed    {elapsed} s of {settings['timeout']} s")
width = max(len(r["step"]) for r in rows)
for r in rows:
    print(f"  {r['step']:<{width}}  {r['status']:<4}  {r['detail']}")
if ratio is not None:
    print(f"  {'ratio':<{width}}        ringleader / pytorch ddp samples/s: {ratio:.2f}x")
with open(os.path.join(work, "summary.jsonl"), "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
    f.write(json.dumps({"summary": "PASS" if passed else "FAIL", "ratio_samples_per_sec": ratio,
                        "elapsed_seconds": elapsed, **settings}) + "\n")
sys.exit(0 if passed else 1)
PY
if [[ -n "$OUT" ]]; then
  mkdir -p "$OUT"
  cp "$WORK/summary.txt" "$WORK/summary.jsonl" "$OUT/" 2>/dev/null || true
  mkdir -p "$OUT/logs" && cp "$WORK"/logs/* "$OUT/logs/" 2>/dev/null || true
fi
if ((rc == 0)); then FAILED=0; fi
echo >&2
cat "$WORK/summary.txt"
exit "$rc"
