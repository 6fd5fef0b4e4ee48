#!/usr/bin/env bash
# One-command GPU runbook: on a fresh GPU machine with torch and nvcc but no network, build,
# run the CUDA tests, run compute-sanitizer (memcheck, racecheck) over the kernel tests, and run
# the GPU benchmarks — all in well under 10 minutes — writing logs and results into $1.
#
#   bash benchmarks/gpu_runbook.sh OUTDIR
#
# fl4health/flwr/scipy wheels placed in .whl/ (see README) are installed into /tmp/site first, so
# that the GPU benchmark has the reference columns and the parity tests run.
set -uo pipefail
OUT="${1:?usage: gpu_runbook.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 LAYERSEL_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
status=0
step() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  step "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/summary.txt"; tail -30 "$OUT/build.log"; exit 1
fi
"$PY" -m layersel_ext info > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

step "pytest (CUDA tests and everything else)"
timeout 240 "$PY" -m pytest -q -rs tests > "$OUT/pytest.log" 2>&1 || status=1
tail -5 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool"
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest -q -x tests/test_ops.py -k cuda > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -3 | tee -a "$OUT/summary.txt"
  done
else
  echo "compute-sanitizer not found" | tee -a "$OUT/summary.txt"
fi

step "benchmarks (cuda)"
timeout 240 "$PY" -m benchmarks.run --device cuda --out "$OUT/results" > "$OUT/bench.log" 2>&1 || status=1
tail -40 "$OUT/bench.log"
step "done (status $status)"
exit $status
