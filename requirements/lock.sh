#!/usr/bin/env bash
# Refreshes the pinned, hash-checked install sets from pyproject.toml's ranges:
#
#     bash requirements/lock.sh            # rewrites requirements/*.txt
#     bash requirements/lock.sh OUT_DIR    # writes them to OUT_DIR (.ci/run-latest does)
#
# cpu.txt, cpu-test.txt    Linux x86_64, Python 3.11, PyTorch's CPU build (what CI installs)
# cuda.txt, cuda-test.txt  Linux x86_64, Python 3.11, PyPI's CUDA build of torch + FlashInfer
#
# Each *-test.txt is resolved first; the runtime set takes its versions from it, so both
# hold the same version of every package they share. After a refresh, run .ci/run.
# TORCH_CPU_FROM: where the CPU torch wheel is found (a folder or a find-links URL such as
# https://download.pytorch.org/whl/torch/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/requirements}" && cd "${1:-$root/requirements}" && pwd)
cd "$root"
UV_VERSION=0.13.9
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools" && "$tools/bin/pip" install -q "uv==$UV_VERSION"

compile() {
  "$tools/bin/uv" pip compile -q pyproject.toml requirements/extra.in --generate-hashes \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash requirements/lock.sh" "$@"
}
cpu=(-c requirements/torch-cpu.in --find-links "${TORCH_CPU_FROM:-/opt/wheels}")
compile "${cpu[@]}" --extra test -o "$out/cpu-test.txt"
compile "${cpu[@]}" -c "$out/cpu-test.txt" -o "$out/cpu.txt"
compile --extra cuda --extra test -o "$out/cuda-test.txt"
compile --extra cuda -c "$out/cuda-test.txt" -o "$out/cuda.txt"
echo "wrote $out/{cpu,cpu-test,cuda,cuda-test}.txt"
