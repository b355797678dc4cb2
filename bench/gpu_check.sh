#!/usr/bin/env bash
# Every GPU check the CuPy backend still owes, in one run on a machine with a GPU and nothing
# to install (the project's device machines hold numpy, numba, cupy, torch and pytest; xpnet
# runs from the checkout through PYTHONPATH). It writes its logs and results into $OUT:
#   card.txt    nvidia-smi's name, driver and memory
#   tests.log   the whole test suite, cupy included (parity, 50 float64 steps, accuracy)
#   train.log   `xpnet train` with the defaults on cupy, then numpy: validation accuracies
#   bench.*     `xpnet bench` on numpy, numba and cupy with the torch rows (cuda and cpu)
# The MNIST files must travel with the checkout, in a folder git ignores:
#   mkdir -p .mnist && cp ../shared/mnist/* .mnist/ && echo /.mnist/ >> .git/info/exclude
# then run `bash bench/gpu_check.sh` there with `.mnist` carried. The dry run on the 2-core
# development machine (no GPU rows) took under 9 minutes; each step's log lands in $OUT as it
# finishes, so a call cut off at its 10-minute limit still returns what was done.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-out}
PYTHON=${PYTHON:-python3}
BACKENDS=${BACKENDS:-numpy,numba,cupy}  # a dry run without a GPU: BACKENDS=numpy,numba
GPU_BACKEND=${BACKENDS##*,}
mkdir -p "$OUT"
export XPNET_DATA_DIR=${XPNET_DATA_DIR:-$PWD/.mnist} PYTHONPATH=$PWD PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/card.txt" 2>&1 || status=1
"$PYTHON" -c "import cupy, numpy, numba, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__,
    'numba', numba.__version__, 'torch', torch.__version__)" >>"$OUT/card.txt" 2>&1
cat "$OUT/card.txt"

"$PYTHON" -m pytest tests -q -ra -p no:cacheprovider >"$OUT/tests.log" 2>&1 || status=1
tail -n 3 "$OUT/tests.log"

for backend in "$GPU_BACKEND" numpy; do
    "$PYTHON" -m xpnet train --backend "$backend" --quiet 2>&1 | sed "s/^/[$backend] /" >>"$OUT/train.log" || status=1
done
grep -E "Epoch 20 |Test accuracy" "$OUT/train.log"

"$PYTHON" -m xpnet bench --backends "$BACKENDS" --batch-sizes 128,512,2048 --repeats 5 \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md" >"$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.md" 2>/dev/null || tail -n 20 "$OUT/bench.log"
exit $status
