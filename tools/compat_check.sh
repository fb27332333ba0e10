#!/usr/bin/env bash
# The oldest supported torch, checked: builds a side environment with torch 2.1 (the newest torch
# with OpenMMLab's prebuilt mmcv 2.1.0 CUDA wheels, and the oldest mmcbn supports), mmengine 0.10.7
# and pytest, and runs there the layer's float64 references (bound and lazy, window_grad and
# stop-gradient), binding, converter, running-statistics, distributed and census tests (not the
# torch.compile ones: torch 2.1's dynamo cannot trace the layer's autograd Function). mmcv and
# mmdet are not installed there (mmcv would compile for minutes): the tests that build mmdet
# models run in `make test` only. PyPI's torch 2.1 wheel is a CUDA build (about 2.5 GB with its
# libraries); the first run downloads it, later runs reuse the environment.
# Usage: bash tools/compat_check.sh   (or make compat)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${COMPAT_VENV:-.venv-torch2.1}
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.1.2" "numpy<2" "mmengine==0.10.7" "setuptools<81" pytest
"$VENV/bin/python" -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])'
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 PYTHONPATH=$PWD "$VENV/bin/python" -m pytest -q \
    -p no:cacheprovider -rs tests/test_layer.py tests/test_torch_support.py \
    tests/test_step_census.py tests/test_running_stats.py tests/test_conv_moments.py \
    tests/test_compensation_quality.py tests/test_distributed.py \
    tests/test_converters.py \
    -k 'not test_bn_to_cbn_keeps_parameters_stats_and_binds and not test_cbn_to_bn_after_training'
