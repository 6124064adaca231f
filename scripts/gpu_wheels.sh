#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that scripts/gpu_check.sh installs on the lent GPU machine.
#
#   scripts/gpu_wheels.sh [DEST]     (default DEST: .whl)
#
# That machine has Python 3.12 and torch 2.11 (torchvision, torchmetrics, numpy, scipy, pillow, safetensors,
# huggingface-hub, transformers, opencv, pytest, ...) but not Composer, streaming, diffusers, lpips,
# omegaconf, nor the packages those import, and no network. These are the missing ones, at
# requirements/constraints.txt's pins, for CPython 3.12 on manylinux x86-64, without their dependencies
# (docs/OPERATIONS.md, "Running on a newer torch", says how this list was found). What travels to the
# machine (the working tree and .whl/) must stay under 64 MiB: checked at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
PACKAGES=(
    mosaicml mosaicml-cli mosaicml-streaming diffusers lpips omegaconf antlr4-python3-runtime
    torch-fidelity pytorch-fid torch-optimizer pytorch-ranger coolname importlib-metadata
    # imported by mosaicml-cli, which Composer imports
    backoff gql graphql-core websockets ruamel.yaml questionary prompt-toolkit wcwidth validators
    # imported by streaming
    brotli python-snappy cramjam zstd catalogue
    # eqvae_composer.data.remote_output imports botocore.exceptions
    botocore
)
PINS=$("$PYTHON" - "${PACKAGES[@]}" <<'PY'
import re, sys
norm = lambda name: re.sub(r'[-_.]+', '-', name).lower()
pins = {norm(line.split('==')[0]): line.strip() for line in open('requirements/constraints.txt') if '==' in line}
missing = [name for name in sys.argv[1:] if norm(name) not in pins]
if missing:
    sys.exit(f'error: no pin in requirements/constraints.txt for {missing}')
print(' '.join(pins[norm(name)] for name in sys.argv[1:]))
PY
)
PLATFORMS=()
for n in 5 12 14 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DEST"
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" $PINS

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((wheels / 1048576)) MiB; with the working tree $(((wheels + tree) / 1048576)) MiB (limit 64)"
if (( wheels + tree >= 64 * 1048576 )); then
    echo 'error: over the 64 MiB that travels to the GPU machine' >&2
    exit 1
fi
