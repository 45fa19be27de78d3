#!/usr/bin/env bash
# Idempotent environment setup: creates .venv/ at the repo root and installs
# torch, the OpenMMLab stack (mmcv 2.1.0 compiled from its sdist) and
# dfq_dense in editable mode.  A second run with everything in place only
# checks a stamp and returns in seconds.
#
# The mmcv wheel is cached outside the clone, keyed by Python, torch and CUDA
# versions, so only the first setup on a machine pays the ~10 minute build:
#   ${DFQ_CACHE:-~/.cache/dfq_dense}/wheels/<key>/mmcv-2.1.0-*.whl
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CACHE="${DFQ_CACHE:-$HOME/.cache/dfq_dense}"
PY="${PYTHON:-python3}"
MMCV_VERSION=2.1.0

die() { echo "setup_env: $*" >&2; exit 1; }
log() { echo "setup_env: $*" >&2; }

# The stamp covers every input that decides what gets installed.
stamp_key() {
  cat "$ROOT"/requirements/*.txt "$ROOT/pyproject.toml" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1
}

if [[ -x "$VENV/bin/python" && -f "$VENV/.dfq_stamp" && "$(cat "$VENV/.dfq_stamp")" == "$(stamp_key)" ]]; then
  if "$VENV/bin/python" -c "import mmcv.ops, mmdet, mmseg, timm, dfq_dense" 2>/dev/null; then
    exit 0
  fi
  log "environment stamp present but imports fail; reinstalling"
fi

command -v "$PY" >/dev/null || die "no '$PY' found: install Python >= 3.10 or set PYTHON=/path/to/python3"

CXX_BIN="${CXX:-g++}"
have_cxx() { command -v "$CXX_BIN" >/dev/null; }
no_cxx() {
  die "no C++ compiler ('$CXX_BIN') found, and mmcv $MMCV_VERSION must be compiled: install one (e.g. apt-get install g++) or set CXX, then re-run"
}
# Fail before installing anything if mmcv will have to be compiled.
if ! "$VENV/bin/python" -c "import mmcv.ops" 2>/dev/null && \
   ! ls "$CACHE"/wheels/*/mmcv-$MMCV_VERSION-*.whl >/dev/null 2>&1 && ! have_cxx; then
  no_cxx
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV" || die "could not create $VENV: install the venv module (e.g. apt-get install python3-venv)"
fi
VPY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"   # ninja from the venv, so mmcv compiles in parallel
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

log "installing build requirements and torch"
pip_install -r "$ROOT/requirements/build.txt"
pip_install -r "$ROOT/requirements/runtime.txt"

have_mmcv_ops() {
  "$VPY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null
}

if ! have_mmcv_ops; then
  KEY="$("$VPY" -c "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split(\"+\")[0]}-' + ('cu' + torch.version.cuda.replace('.', '') if torch.version.cuda and torch.cuda.is_available() else 'cpu'))")"
  WHEEL_DIR="$CACHE/wheels/$KEY"
  WHEEL="$(ls "$WHEEL_DIR"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$WHEEL" ]]; then
    have_cxx || no_cxx
    log "building mmcv $MMCV_VERSION with ops (one-time, about 10 minutes on 2 cores) -> $WHEEL_DIR"
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
    "$VPY" -m pip download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD" \
      || die "could not download the mmcv $MMCV_VERSION sdist from PyPI"
    tar xzf "$BUILD"/mmcv-$MMCV_VERSION.tar.gz -C "$BUILD"
    # torch >= 2.14's headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-$MMCV_VERSION/setup.py"
    # Python's own CFLAGS (keeps -O3) with -g0: a 1.4 MB wheel instead of 32 MB.
    CFLAGS="$("$VPY" -c "import re, sysconfig; print(re.sub(r'(^| )-g( |$)', r'\1-g0\2', sysconfig.get_config_var('CFLAGS') or ''))")"
    export CFLAGS
    mkdir -p "$BUILD/wheel"
    (cd "$BUILD/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" \
      "$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$BUILD/wheel" .) \
      || die "mmcv $MMCV_VERSION build failed (see the compiler output above)"
    mkdir -p "$WHEEL_DIR"
    # Copy then rename, so a concurrent or interrupted setup never sees half a wheel.
    built="$(ls "$BUILD"/wheel/mmcv-*.whl)"
    cp "$built" "$WHEEL_DIR/.tmp.whl" && mv "$WHEEL_DIR/.tmp.whl" "$WHEEL_DIR/$(basename "$built")"
    WHEEL="$WHEEL_DIR/$(basename "$built")"
  else
    log "reusing cached $WHEEL"
  fi
  pip_install --no-deps "$WHEEL"
  # mmcv's own runtime requirements (its wheel was installed without deps).
  pip_install addict packaging pyyaml yapf opencv-python
fi

log "installing the OpenMMLab stack and dfq_dense"
pip_install -r "$ROOT/requirements/mminstall.txt" -r "$ROOT/requirements/tests.txt"
pip_install --no-deps --no-build-isolation -e "$ROOT"

"$VPY" -c "import mmcv.ops, mmdet, mmseg, timm, dfq_dense" \
  || die "installed packages do not import; remove $VENV and re-run"
stamp_key > "$VENV/.dfq_stamp"
log "ready: $VENV"
