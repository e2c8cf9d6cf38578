# Sourced by the other scripts: where the toolchain and libtorch live.
# shellcheck shell=bash
RINGLEADER_CACHE="${RINGLEADER_CACHE:-$HOME/.cache/ringleader}"
export RINGLEADER_CACHE
# tch's build finds libtorch through the `python` on PATH (the venv's torch).
export LIBTORCH_USE_PYTORCH=1
export PATH="$RINGLEADER_CACHE/venv/bin:$HOME/.cargo/bin:$PATH"
