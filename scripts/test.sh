#!/usr/bin/env bash
# The test command: builds a fresh virtual environment, installs duodiff with its test extras
# (torch==2.13.0 FIRST, so pip never resolves a CUDA build), then runs ruff and the default test suite.
#   bash scripts/test.sh            # default suite (well over 10 min on 2 cores: 12 min 53 s reported in issue 17)
#   bash scripts/test.sh -m slow    # the slower checks (includes the docs check, scripts/docs_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DUODIFF_VENV:-.venv-test}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# the original paper's stack, only to build old-format checkpoints for the `duodiff convert` parity tests
python -m pip install -q --no-deps "monai-generative==0.2.3"
# nnU-Net v2's own dataset check for the export tests: its pinned deps would pull a CUDA torch, so the four nnU-Net
# packages come without deps and only what `verify_dataset_integrity` imports is added
python -m pip install -q --no-deps "nnunetv2==2.8.1" "batchgenerators==0.25.5" "acvl-utils==0.2.6" \
    "dynamic-network-architectures==0.4.4"
python -m pip install -q pandas scikit-image blosc2 SimpleITK
ruff check src tests benchmarks examples scripts
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
python -m pytest -q "$@"
