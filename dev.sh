#!/usr/bin/env bash
# One entry point for a fresh machine; ./dev.sh help for the verbs.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

usage() {
  cat <<'EOF'
usage: ./dev.sh VERB [args]

  bench [--quick] [...]          the main job: benchmark against fl4health -> table + JSON + plot
  test [--all] [pytest args]     the fast tier of the tests (a couple of minutes: every public function
                                 against fl4health 0.4.2 on every backend, opcheck on every op, hostile
                                 inputs, wire round trips); --all: every test (federations, spawned
                                 ranks, subprocess races, builds), as CI runs. Tiers: tests/conftest.py
  build                          (re)build the extension in place, always
  ctest                          the C++ unit tests through CMake
  shell [python args]            the dev venv's python (./dev.sh shell -m layersel_ext info)
  test-fl4health-stack [--all] [pytest args]
                                 the tests (as `test`) in fl4health 0.4.2's own environment:
                                 Python 3.10 + `pip install fl4health==0.4.2` (torch 2.6, numpy 1.26),
                                 CPU kernels unless CUDA can work (venv: ~/.cache/layersel_ext/venv-fl4health)
  fl4health-venv                 only create that environment's packages (CI, while the main stack builds)
  fl4health-build                that environment, and the extension built for it when out of date (CI)
  help                           this text

The dev venv (~/.cache/layersel_ext/venv, LAYERSEL_VENV to move it; ~6 GB) has torch 2.14.1 and the
test-only fl4health oracle; it is created on first use, and the checkout is installed into it
editable, so its python imports layersel_ext from anywhere. test, bench and shell build the
extension in place first when csrc/, setup.py, torch or the build switches changed since the
last build (first CPU build: a few minutes on 2 cores). LAYERSEL_CUDA=0: CPU kernels only; =1: the
CUDA kernels too, GPU or not, or an error; unset: CUDA when a GPU is visible and the toolkit matches
torch's. MAX_JOBS (default 2) compile jobs.
EOF
}

cmd="${1:-test}"
shift || true
case "$cmd" in
  -h | --help | help) usage; exit 0 ;;
  bench | test | build | ctest | shell | test-fl4health-stack | fl4health-venv | fl4health-build) ;;
  *) usage >&2; exit 2 ;;
esac

quiet_pip() { # pip, without the warnings about this machine's local package folders
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep --line-buffered -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

install_checkout() {
  # Editable install of this checkout, without compiling (LAYERSEL_NO_EXT=1: package metadata and
  # the import path only; the in-place build provides _C). Redone when another checkout last did it.
  if [ "$(cat "$VENV/.layersel-checkout" 2>/dev/null)" = "$ROOT" ]; then return; fi
  echo "[dev.sh] installing $ROOT into $VENV (editable, nothing compiled)" >&2
  LAYERSEL_NO_EXT=1 quiet_pip install -q --no-build-isolation --no-deps -e . >/dev/null
  echo "$ROOT" > "$VENV/.layersel-checkout"
}

ensure_venv() { # the dev venv: Python 3.11+, torch 2.14.1, fl4health's criteria module as oracle
  VENV="${LAYERSEL_VENV:-$HOME/.cache/layersel_ext/venv}"
  local stamp="$VENV/.layersel-requirements"
  if ! { [ -x "$VENV/bin/python" ] && cat requirements-dev.txt requirements-integration.txt | cmp -s - "$stamp"; }; then
    echo "[dev.sh] creating $VENV (torch 2.14.1, test-only fl4health oracle)" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    quiet_pip install -q --upgrade pip
    quiet_pip install -q -r requirements-dev.txt
    # fl4health 0.4.2 declares Python < 3.11 and heavy dependencies; its criteria module needs only
    # torch, flwr and scipy. Test/benchmark oracle only: the library never imports it.
    quiet_pip install -q --no-deps --ignore-requires-python fl4health==0.4.2
    # fl4health's clients, servers and strategies (the federated-round tests): their imports only.
    quiet_pip install -q --no-deps -r requirements-integration.txt
    "$VENV/bin/python" -c "import torch, fl4health, flwr, scipy, fl4health.servers.base_server" # fail here, not later
    cat requirements-dev.txt requirements-integration.txt > "$stamp"
  fi
  install_checkout
}

find_python310() {
  # fl4health 0.4.2 requires Python 3.10 (>=3.10, <3.11). LAYERSEL_PYTHON310 overrides the search.
  local p
  if [ -n "${LAYERSEL_PYTHON310:-}" ]; then echo "$LAYERSEL_PYTHON310"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    p=$(pyenv prefix 3.10 2>/dev/null | head -1 || true)
    if [ -n "$p" ] && [ -x "$p/bin/python3.10" ]; then echo "$p/bin/python3.10"; return; fi
    p=$(ls -d "$(pyenv root)"/versions/3.10.* 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$p" ] && [ -x "$p/bin/python3.10" ]; then echo "$p/bin/python3.10"; return; fi
  fi
  for p in python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      command -v "$p"; return
    fi
  done
  echo "[dev.sh] error: test-fl4health-stack needs Python 3.10 (fl4health 0.4.2 requires >=3.10,<3.11) and" \
    "found none (pyenv prefix 3.10, python3.10 on PATH): pyenv install 3.10, or set LAYERSEL_PYTHON310" >&2
  return 1
}

# fl4health 0.4.2 with all its dependencies, as its users get it (torch 2.6.0, numpy 1.26, flwr 1.18),
# plus the test runner and the build tools; nothing pinned beyond what fl4health pins.
FL4HEALTH_STACK="fl4health==0.4.2 pytest psutil ninja setuptools>=64 wheel"

make_fl4health_venv() { # its packages only: the checkout is installed into it by ensure_fl4health_venv
  VENV="${LAYERSEL_FL4HEALTH_VENV:-$HOME/.cache/layersel_ext/venv-fl4health}"
  local stamp="$VENV/.layersel-requirements" py
  if ! { [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$FL4HEALTH_STACK" ]; }; then
    py=$(find_python310)
    echo "[dev.sh] creating $VENV with $py: $FL4HEALTH_STACK" >&2
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
    quiet_pip install -q --upgrade pip
    # shellcheck disable=SC2086
    quiet_pip install -q $FL4HEALTH_STACK
    "$VENV/bin/python" -c "import torch, numpy, fl4health, flwr, scipy, fl4health.servers.base_server" # fail here, not later
    echo "$FL4HEALTH_STACK" > "$stamp"
  fi
  "$VENV/bin/python" - >&2 <<'PY'
import sys
from importlib.metadata import version

import numpy
import torch

print(
    f"[dev.sh] fl4health stack: Python {sys.version.split()[0]}, torch {torch.__version__}, "
    f"numpy {numpy.__version__}, flwr {version('flwr')}, fl4health {version('fl4health')}"
)
PY
}

ensure_fl4health_venv() {
  make_fl4health_venv
  install_checkout
}

# The in-place build: layersel_ext/_C.<python ABI>.so and _build_record.<python ABI>.json, objects in
# build/temp.<platform>-<python ABI>/. Two venvs of different Pythons (the dev venv, the fl4health
# stack) keep separate files in one checkout; two venvs of the same Python share them (the stamp
# below notices when the other one rebuilt).
build_inputs() { # everything the build depends on, hashed
  local v
  {
    echo "venv=$VENV"
    ls -d "$VENV"/lib/python*/site-packages/torch-*.dist-info 2>/dev/null || echo "no torch"
    for v in LAYERSEL_CUDA LAYERSEL_NO_EXT TORCH_CUDA_ARCH_LIST CUDA_HOME CUDA_PATH CC CXX CFLAGS CXXFLAGS; do
      echo "$v=${!v-<unset>}"
    done
    command -v nvcc || echo "no nvcc"
    find csrc build_tools setup.py -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

build_outputs() { # the files the build made for this venv's Python
  local suffix
  suffix=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  stat -c '%n %s %i %.9Y' "layersel_ext/_C$suffix" "layersel_ext/_build_record${suffix%.so}.json" 2>/dev/null \
    || echo "missing"
}

build_stamp_file() { echo "build/dev-sh-stamp.$(echo "$VENV" | sha256sum | cut -c1-16)"; }

build() { # always builds (ninja keeps build/temp.*: only what changed is recompiled)
  local inputs stamp rc
  inputs=$(build_inputs)
  stamp=$(build_stamp_file)
  rm -f "$stamp"
  # Prints what it decided about CUDA and why, and every compile command.
  MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext --inplace 2>&1 \
    | { grep --line-buffered -v "^WARNING: Location" || true; }
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || return "$rc"
  mkdir -p build
  printf '%s\n%s\n' "$inputs" "$(build_outputs)" > "$stamp"
}

ensure_built() { # builds only when an input or the built files changed since the last build here
  if [ "$(printf '%s\n%s\n' "$(build_inputs)" "$(build_outputs)")" = "$(cat "$(build_stamp_file)" 2>/dev/null)" ]; then
    echo "[dev.sh] extension up to date for $VENV (no build; ./dev.sh build forces one)" >&2
    return
  fi
  build
}

run_ctest() {
  # The same csrc/ through CMake against Torch's CMake package, and the C++ unit tests. The CMake
  # arguments (torch's prefix, the CUDA toolkit, the nvidia pip wheels' nvrtc) come from the same
  # probes as setup.py's (build_tools/cuda_decision.py).
  local args=()
  mapfile -t args < <("$VENV/bin/python" build_tools/cuda_decision.py cmake-args)
  [ "${#args[@]}" -gt 0 ] || { echo "[dev.sh] error: no CMake arguments from build_tools/cuda_decision.py" >&2; return 1; }
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" cmake -S . -B cmake-build "${args[@]}" -DLAYERSEL_OPS_UNOPTIMISED=ON >/dev/null
  cmake --build cmake-build -j"${MAX_JOBS:-2}"
  ctest --test-dir cmake-build --output-on-failure
}

run_pytest() { # the fast tier, or with --all (first argument) every test; slowest tests listed
  local tier=(-m fast)
  if [ "${1:-}" = "--all" ]; then tier=(); shift; fi
  "$VENV/bin/python" -m pytest -q --durations=15 "${tier[@]}" "$@"
}

case "$cmd" in
  build) ensure_venv; build ;;
  test) ensure_venv; ensure_built; run_pytest "$@" ;;
  bench)
    ensure_venv; ensure_built
    "$VENV/bin/python" -m benchmarks.run "$@"
    ;;
  ctest) ensure_venv; run_ctest ;;
  shell) ensure_venv; ensure_built; exec "$VENV/bin/python" "$@" ;;
  fl4health-venv) make_fl4health_venv ;;
  fl4health-build) ensure_fl4health_venv; ensure_built ;;
  test-fl4health-stack)
    ensure_fl4health_venv; ensure_built
    export LAYERSEL_REQUIRE_COMPILED="${LAYERSEL_REQUIRE_COMPILED:-1}" LAYERSEL_REQUIRE_ORACLE="${LAYERSEL_REQUIRE_ORACLE:-1}"
    "$VENV/bin/python" -m layersel_ext info
    run_pytest "$@"
    ;;
esac
