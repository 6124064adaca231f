#!/usr/bin/env bash
# One command that validates and measures the project on a GPU (docs/OPERATIONS.md, "Checking on a GPU").
#
#   scripts/gpu_check.sh          on the GPU machine, from the repository root: installs the wheels in .whl/
#                                 (scripts/gpu_wheels.sh downloads them) and runs scripts/gpu_check.py
#   scripts/gpu_check.sh --dry    the same steps at tiny sizes on the CPU (what CI runs, where .whl/ is absent)
#
# Results: $OUT/gpu_check.json and $OUT/gpu_check.md, with each step's log ($OUT defaults to ./gpu_check_out).
# Exit status 0 only when every step ran and no test failed. PYTHON picks the interpreter (default python3),
# GPU_CHECK_WHEELS_DIR the wheel folder (default .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

WHEELS=${GPU_CHECK_WHEELS_DIR:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    # The GPU image lacks Composer, streaming, diffusers, lpips, omegaconf and what they import: carried as
    # wheels, installed beside (not over) its own packages, which stay as they are.
    SITE=${GPU_CHECK_SITE:-/tmp/eqvae-site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    GPU_CHECK_WHEELS="$(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ in $SITE"
    export GPU_CHECK_WHEELS
fi
# eqvae_composer/compat.py refuses versions outside setup.py's ranges (torch 2.7.0, torchmetrics < 1.7.5):
# the GPU image's torch 2.11 and torchmetrics 1.9 are what this check is for, so a warning instead.
export EQVAE_ALLOW_UNTESTED_VERSIONS=${EQVAE_ALLOW_UNTESTED_VERSIONS:-1}
exec "$PYTHON" scripts/gpu_check.py "$@"
