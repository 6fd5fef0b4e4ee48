#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh bench [--quick] [...]   the main job: benchmark against fl4health, table + JSON + plot
#   ./dev.sh test [pytest args]      the tests
#   ./dev.sh build | ctest | shell
# It makes (or reuses) a virtualenv with torch 2.14.1 and the test-only fl4health 0.4.2 oracle,
# then builds the extension in place (CUDA kernels too when nvcc is found; LAYERSEL_CUDA=0/1).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LAYERSEL_VENV:-$HOME/.cache/layersel_ext/venv}"
STAMP="$VENV/.layersel-requirements"

ensure_venv() {
  if [ -x "$VENV/bin/python" ] && cat requirements-dev.txt requirements-integration.txt | cmp -s - "$STAMP"; then
    return
  fi
  echo "[dev.sh] creating $VENV (torch 2.14.1, test-only fl4health oracle)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
  # fl4health 0.4.2 declares Python < 3.11 and heavy dependencies; its criteria module needs only
  # torch, flwr and scipy. Test/benchmark oracle only: the library never imports it.
  "$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python fl4health==0.4.2 2>&1 \
    | grep -v "^WARNING: Location" || true
  # fl4health's clients, servers and strategies (the federated-round tests): their imports only.
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-integration.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, fl4health, flwr, scipy, fl4health.servers.base_server" # fail here, not later
  cat requirements-dev.txt requirements-integration.txt > "$STAMP"
}

build() {
  # Incremental (ninja keeps build/); prints what it decided about CUDA and every compile command.
  MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext --inplace 2>&1 | grep -v "^WARNING: Location"
  test "${PIPESTATUS[0]}" -eq 0
}

run_ctest() {
  # The same csrc/ through CMake against Torch's CMake package, and the C++ unit tests.
  local prefix nvidia cuda_home
  prefix=$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  nvidia=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)
  cuda_home=$("$VENV/bin/python" - <<'PY'
import os, shutil, subprocess, tempfile
nvcc = shutil.which("nvcc")
if nvcc:
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "p.cu"), "w").close()
        out = subprocess.run([nvcc, "--dryrun", "-c", os.path.join(d, "p.cu")], capture_output=True, text=True)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                print(os.path.realpath(line.split("=", 1)[1].strip()))
PY
)
  local args=(-DCMAKE_PREFIX_PATH="$prefix")
  [ -n "$cuda_home" ] && args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home")
  [ -n "$nvidia" ] && [ -e "$nvidia/lib/libnvrtc.so.13" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvidia/lib/libnvrtc.so.13")
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" cmake -S . -B cmake-build "${args[@]}" >/dev/null
  cmake --build cmake-build -j2
  ctest --test-dir cmake-build --output-on-failure
}

cmd="${1:-test}"
shift || true
ensure_venv
case "$cmd" in
  build) build ;;
  test)
    build
    "$VENV/bin/python" -m pytest -q "$@"
    ;;
  bench)
    build
    "$VENV/bin/python" -m benchmarks.run "$@"
    ;;
  ctest) run_ctest ;;
  shell) exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: ./dev.sh bench|test|build|ctest|shell" >&2; exit 2 ;;
esac
