#!/usr/bin/env bash
# The GPU runbook: everything a lent GPU machine must tell us, in one command that fits the lease
# (about 15 minutes of device time in all, at most 10 minutes a command, a fresh machine with torch,
# nvcc and pytest but no network). Budget: at most 8 minutes, every step under its own timeout.
#
#   bash benchmarks/gpu_runbook.sh OUTDIR            # on the GPU machine
#   bash benchmarks/gpu_runbook.sh --dry-run OUTDIR  # anywhere (CI runs it): every step that needs
#                                                    # no GPU, so that the script cannot rot
#
# Steps: record the commit and list the CUDA code changed since the last recorded GPU run
# (benchmarks/gpu_changes.py), build for the visible GPU's architecture only (MAX_JOBS = its
# cores), the CUDA tests (and the rest of the suite if time allows), compute-sanitizer memcheck /
# racecheck / synccheck / initcheck on a small focused set of CUDA tests, then the GPU benchmark
# subset (bert_like, many_small, resnet_like, masked_mlp; sparse 1% and 10% rows included) into
# OUTDIR/results, to be committed as benchmarks/results/<gpu-name>/ (the runner names the folder)
# with OUTDIR/summary.txt as runbook-summary.txt beside it.
# Wheels of fl4health 0.4.2, flwr 1.18 and scipy (and flwr's dependencies) in .whl/ (ignored by
# git; carry it) are installed into /tmp/site first: the benchmark's fl4health columns and the
# parity tests need them.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: gpu_runbook.sh [--dry-run] OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0
START=$(date +%s)
step() { echo "=== $* (t+$(( $(date +%s) - START ))s)" | tee -a "$OUT/summary.txt"; }
BUDGET=${RUNBOOK_BUDGET_S:-480}  # the whole runbook; a lent machine allows 600 s a command
# run SECONDS LOG CMD...: a step under its own time limit, shortened to what is left of the budget
# (a step with under 20 s left is skipped and reported); a failure marks the run, never stops it.
run() {
  local limit=$1 log=$2 left
  shift 2
  left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" = 0 ] && [ "$limit" -lt 20 ]; then
    echo "  SKIPPED: budget spent ($log)" | tee -a "$OUT/summary.txt"
    return 0
  fi
  if [ "$DRY" = 1 ]; then
    echo "  (dry run) timeout $limit $*" | tee -a "$OUT/summary.txt"
    return 0
  fi
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && { status=1; echo "  FAILED rc=$rc ($log)" | tee -a "$OUT/summary.txt"; }
  return $rc
}

# The commit this run builds, for benchmarks/gpu_changes.py to read back once OUTDIR/summary.txt is
# committed as benchmarks/results/<gpu-name>/runbook-summary.txt. A copied work tree has no git
# history: RUNBOOK_COMMIT names the commit then (the caller knows it), else it is recorded as unknown.
COMMIT=$(git rev-parse -q --verify HEAD 2>/dev/null || true)
COMMIT=${COMMIT:-${RUNBOOK_COMMIT:-}}
if [ -n "$COMMIT" ]; then
  dirty=""
  [ -n "$(git status --porcelain -- csrc 2>/dev/null)" ] && dirty=" (plus uncommitted changes under csrc/)"
  echo "commit: $COMMIT$dirty" | tee -a "$OUT/summary.txt"
else
  echo "commit unknown: no git history here and RUNBOOK_COMMIT unset" | tee -a "$OUT/summary.txt"
fi
step "CUDA code not yet run on a GPU (since the last recorded GPU run)"
"$PY" -m benchmarks.gpu_changes 2>&1 | tee -a "$OUT/summary.txt" || true

if compgen -G ".whl/*.whl" >/dev/null; then
  step "installing carried wheels into /tmp/site"
  run 120 wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --ignore-requires-python --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "device"
if [ "$DRY" = 1 ]; then
  ARCH="9.0"
  echo "  (dry run) would read the architecture with torch.cuda.get_device_capability()" | tee -a "$OUT/summary.txt"
else
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  ARCH=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}.{b}")') || {
    echo "no CUDA device visible to torch" | tee -a "$OUT/summary.txt"; exit 1; }
fi
export LAYERSEL_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "  arch $ARCH, MAX_JOBS $MAX_JOBS" | tee -a "$OUT/summary.txt"

step "build (sm_${ARCH/./} only)"
if ! run 200 build.log "$PY" setup.py build_ext --inplace; then
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/summary.txt"; tail -30 "$OUT/build.log"; exit 1
fi
# Each compile job's seconds, slowest first (ninja's log: start and end in ms), so that a slow build
# says which file made it slow.
if [ "$DRY" = 0 ]; then
  for f in build/temp*/.ninja_log; do
    [ -f "$f" ] && awk -F'\t' 'NR > 1 { printf "%7.1f s  %s\n", ($2 - $1) / 1000, $4 }' "$f" | sort -rn | head -12
  done > "$OUT/build-times.txt" 2>&1
  head -4 "$OUT/build-times.txt" | tee -a "$OUT/summary.txt"
fi
run 60 info.txt "$PY" -m layersel_ext info
[ "$DRY" = 1 ] || cat "$OUT/info.txt"

# The CUDA tests first (what only this machine can run), then the rest while the budget lasts.
# With pytest-xdist (the device image has it) a test that crashes the interpreter costs one worker,
# not the rest of the run: every failure shows up in one pass.
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
step "pytest: CUDA tests"
run 120 pytest-cuda.log "$PY" -m pytest -q -rfEs $XDIST -m cuda tests
[ "$DRY" = 1 ] || tail -3 "$OUT/pytest-cuda.log" | tee -a "$OUT/summary.txt"

# One float32 case of each kernel (drift incl. misaligned views and extremes, scores, masks seeded
# and unseeded, the mask bitmap, the radix select and extraction, the one-go sparse select, the
# argument errors): 13 tests, small inputs.
SANITIZER_TESTS="tests/test_ops.py tests/test_sparse_coo.py -m cuda -k '(misaligned and dtype0) or (unseeded and dtype0) or (integer_sparse and 2-dtype4) or empty_lists or (scores_match_cpu and dtype0-2) or (masks_bit_equal and dtype0) or (drift_matches_cpu and dtype0) or large_differences or sparse_select_small or (mask_bits_equal and dtype0)'"
if [ "$DRY" = 1 ] || command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck initcheck; do
    step "compute-sanitizer --tool $tool"
    run 60 "sanitizer-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      bash -c "$PY -m pytest -q -x $SANITIZER_TESTS"
    [ "$DRY" = 1 ] || grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -2 |
      tee -a "$OUT/summary.txt"
  done
else
  echo "compute-sanitizer not found" | tee -a "$OUT/summary.txt"
fi

step "benchmarks (cuda subset)"
run 180 bench.log "$PY" -m benchmarks.run --device cuda --no-big --reps 5 \
  --only "^(bert_like|many_small|resnet_like|masked_mlp)$" --out "$OUT/results"
[ "$DRY" = 1 ] || tail -40 "$OUT/bench.log"

# Where the time goes (medians, profiler tables, this machine's D2H and D2D rates): 1 minute.
step "profile (benchmarks/gpu_profile.py)"
run 90 profile.txt "$PY" benchmarks/gpu_profile.py
[ "$DRY" = 1 ] || grep "#####" "$OUT/profile.txt" | tee -a "$OUT/summary.txt"

# CI runs these on every submission; here they only use what is left of the budget, and running
# out of it is not a failure.
step "pytest: everything else (what the budget leaves)"
left=$(( BUDGET - ($(date +%s) - START) ))
if [ "$DRY" = 1 ] || [ "$left" -ge 30 ]; then
  if [ "$DRY" = 1 ]; then
    echo "  (dry run) timeout <budget left> $PY -m pytest -q -m 'not cuda and not integration' tests" | tee -a "$OUT/summary.txt"
  else
    timeout "$left" "$PY" -m pytest -q -m "not cuda and not integration" tests > "$OUT/pytest-rest.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ]; then echo "  stopped at the budget (not a failure)" | tee -a "$OUT/summary.txt"
    elif [ $rc -ne 0 ]; then status=1; fi
    tail -3 "$OUT/pytest-rest.log" | tee -a "$OUT/summary.txt"
  fi
else
  echo "  SKIPPED: budget spent" | tee -a "$OUT/summary.txt"
fi

if [ "$DRY" = 1 ]; then
  # What the dry run can check: the script's own syntax, the test selections and the benchmark's
  # arguments (none of these needs a GPU).
  step "dry run: checking the selections"
  bash -n "$0" || status=1
  "$PY" -m pytest -q --collect-only -m cuda tests > "$OUT/collect-cuda.log" 2>&1 || status=1
  tail -1 "$OUT/collect-cuda.log" | tee -a "$OUT/summary.txt"
  eval "$PY -m pytest -q --collect-only $SANITIZER_TESTS" > "$OUT/collect-sanitizer.log" 2>&1 || status=1
  tail -1 "$OUT/collect-sanitizer.log" | tee -a "$OUT/summary.txt"
  "$PY" -m benchmarks.run --help > "$OUT/bench-help.log" 2>&1 || status=1
  grep -q -- "--only" "$OUT/bench-help.log" || { echo "benchmark has no --only" | tee -a "$OUT/summary.txt"; status=1; }
fi
step "done (status $status)"
exit $status
