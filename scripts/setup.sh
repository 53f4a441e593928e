#!/usr/bin/env bash
# Installs what fusionpasses needs on a fresh machine, idempotently:
#   torch >= 2.11 (the CPU build where there is no NVIDIA GPU), Triton (its CPU interpreter runs the
#   kernel tests), pytest, and this project in editable mode (which maps kernels/ to fusionpasses.kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" - <<'PYCHECK' 2>/dev/null; then
import torch, sys
major, minor = (int(v) for v in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYCHECK
  echo "[setup] installing torch"
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch>=2.11"
  else
    # The CPU build is a tenth of the size of the CUDA one; fall back to PyPI where its index is unreachable.
    pip_install --timeout 15 --retries 0 "torch>=2.11" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || pip_install "torch==2.13.0"
  fi
fi

if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "[setup] installing triton (its CPU interpreter runs the kernel tests)"
  pip_install "triton>=3.9"
fi
"$PY" -c "import pytest, numpy" 2>/dev/null || pip_install pytest numpy
# (Re)install when fusionpasses or its kernels resolve to another checkout than this one.
here=$(pwd -P)
if ! "$PY" - "$here" <<'PYCHECK' 2>/dev/null; then
import os, sys
import fusionpasses, fusionpasses.kernels as k
here = sys.argv[1]
ok = all(os.path.realpath(m.__file__).startswith(here + os.sep) for m in (fusionpasses, k))
sys.exit(0 if ok else 1)
PYCHECK
  echo "[setup] installing fusionpasses (editable) from $here"
  # Without build isolation the editable build runs on this interpreter's setuptools, which must build
  # wheels itself (setuptools >= 70.1; older ones need the separate `wheel` package).
  "$PY" -c "import setuptools.command.bdist_wheel" 2>/dev/null || pip_install "setuptools>=70.1"
  pip_install --no-deps --no-build-isolation -e .
fi
"$PY" -c "import torch, fusionpasses; print(f'[setup] torch {torch.__version__}, fusionpasses {fusionpasses.__version__}')"
