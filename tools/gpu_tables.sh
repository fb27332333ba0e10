#!/usr/bin/env bash
# The CUDA evidence for the README in one run, on a GPU machine that has PyTorch but no network
# (such as the project's device machine; about 3-5 minutes on one H200):
#   1. the steady-step check on CUDA (tests/test_step_census.py: no host sync in a training step,
#      under torch.cuda.set_sync_debug_mode('error'));
#   2. the layer table on CUDA (tools/benchmark_layer.py), every timed step under
#      set_sync_debug_mode('warn') with the host syncs of each variant counted;
#   3. the Mask R-CNN table on CUDA (tools/benchmark.py) when mmcv's compiled ops import there
#      (mmcv 2.1.0 must be built against that machine's torch and CUDA); else it says so.
# mmengine and its pure-Python needs travel as wheels in .whl/ (ignored by git): fetch them here
# first with `bash tools/gpu_tables.sh --fetch`, then carry .whl. Tables go to $OUT (or
# work_dirs/gpu_tables) and to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(mmengine==0.10.7 addict==2.4.0 yapf==0.43.0 termcolor==3.3.0 platformdirs==4.14.8)

if [ "${1:-}" = --fetch ]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
out=${OUT:-work_dirs/gpu_tables}
mkdir -p "$out"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
    | tee "$out/device.txt"

echo '## 1. steady training step on CUDA: no host sync'
python3 -m pytest -q -p no:cacheprovider -rs tests/test_step_census.py 2>&1 | tee "$out/census.txt"

echo '## 2. layer table, CUDA'
python3 tools/benchmark_layer.py --device cuda --repeats 50 --warmup 10 --sync-debug --compile 2>&1 \
    | tee "$out/benchmark_layer_cuda.txt"

echo '## 3. Mask R-CNN R-50-FPN, CUDA'
if python3 -c 'import mmcv.ops' 2>/dev/null; then
    python3 tools/benchmark.py --device cuda --models mask_rcnn --batches 2 4 --repeats 5 \
        --memory 2>&1 | tee "$out/benchmark_cuda.txt"
else
    echo "mmcv's compiled ops do not import here: no Mask R-CNN table (build mmcv 2.1.0 with" \
         "MMCV_WITH_OPS=1 FORCE_CUDA=1 against this torch first)" | tee "$out/benchmark_cuda.txt"
fi
