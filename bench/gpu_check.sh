#!/usr/bin/env bash
# Every GPU check the CuPy backend owes, in one run on a machine with a GPU and nothing to
# install (the project's device machines hold numpy, numba, cupy, torch, jax and pytest; xpnet
# runs from the checkout through PYTHONPATH). It writes its logs and results into $OUT:
#   card.txt    nvidia-smi's name, driver and memory; the packages' versions
#   ops.md      bench/gpu_ops.py: each op of a CuPy step, host time against GPU time; an epoch's parts
#   profile.md  bench/gpu_profile.py: a graph node's cost on this card; each contender's kernels per
#               step (CUPTI through torch's profiler); JAX's compiled fusions
#   bench.*     `xpnet bench` on numpy, numba and cupy (CUDA graphs, and op by op) beside
#               PyTorch eager (cuda and cpu), its CUDA-graph torch.compile, its whole step captured
#               as one CUDA graph, and JAX (on the GPU, at float32 precision and its default)
#   tests.log   the whole test suite, cupy included (parity, 50 float64 steps, graphs, accuracy)
#   verify.log  `xpnet verify` in float32 and float64, then with dropout and deformations: each op of a step
#   train.log   `xpnet train` with the defaults on cupy, then numpy: validation accuracies
# The timings run first and alone; the checks after them, side by side (none of them is timed).
# The MNIST files must travel with the checkout, in a folder git ignores:
#   mkdir -p .mnist && cp ../shared/mnist/* .mnist/ && echo /.mnist/ >> .git/info/exclude
# then run `bash bench/gpu_check.sh` there with `.mnist` carried. Each stage has a time limit,
# so one that hangs costs its own result only; the whole run is meant to end within 6 minutes.
# TESTS_K="cupy and not emulated" runs only the suite's GPU tests (pytest -k), for a rerun;
# with BACKENDS=cupy as well, the bench times only the GPU rows and the peers (about 2.5 minutes in all).
# OPS=0 leaves out gpu_ops.py (the profile says more per minute), TRAIN=0 the two training runs.
# RECIPE=ciresan2010 runs only that recipe on the GPU, into recipe.log, within RECIPE_SECONDS
# (default 500: a checkpoint of its network is too large to bring back, so the run must end in
# the call), for RECIPE_EPOCHS epochs where given (else the recipe's own).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-out}
PYTHON=${PYTHON:-python3}
BACKENDS=${BACKENDS:-numpy,numba,cupy}  # a dry run without a GPU: BACKENDS=numpy,numba
PEERS=${PEERS:-torch,torch-graphs,torch-step-graph,jax}  # src/xpnet/bench_peers.py says what each is
OPS=${OPS:-1} TRAIN=${TRAIN:-1}
GPU_BACKEND=${BACKENDS##*,}
mkdir -p "$OUT" && : >"$OUT/bench.log"
export XPNET_DATA_DIR=${XPNET_DATA_DIR:-$PWD/.mnist} PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU: it takes what it uses, not 75% of it
status=0

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PYTHON" -c "import cupy, jax, numba, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__,
        'numba', numba.__version__, 'torch', torch.__version__, 'jax', jax.__version__, jax.devices())"
} >"$OUT/card.txt" 2>&1 || status=1
cat "$OUT/card.txt"
if [ -n "${RECIPE:-}" ]; then
    timeout "${RECIPE_SECONDS:-500}" "$PYTHON" -m xpnet train --backend cupy --recipe "$RECIPE" \
        ${RECIPE_EPOCHS:+--epochs "$RECIPE_EPOCHS"} --quiet >"$OUT/recipe.log" 2>&1
    status=$?
    tail -n 25 "$OUT/recipe.log"
    exit $status
fi

if [ "$GPU_BACKEND" = cupy ]; then
    [ "$OPS" = 0 ] || timeout 150 "$PYTHON" bench/gpu_ops.py --markdown "$OUT/ops.md" 2>&1 || status=1
    # Its log goes first into bench.log: what comes back from a device run is eight files at most.
    timeout 150 "$PYTHON" bench/gpu_profile.py --markdown "$OUT/profile.md" >>"$OUT/bench.log" 2>&1 || status=1
    cat "$OUT/profile.md" 2>/dev/null || tail -n 20 "$OUT/bench.log"
fi
timeout 300 "$PYTHON" -m xpnet bench --backends "$BACKENDS" --batch-sizes 128,512,2048 --repeats 5 \
    --peers "$PEERS" --json "$OUT/bench.json" --markdown "$OUT/bench.md" >>"$OUT/bench.log" 2>&1 || status=1
grep -iE "warn|error" "$OUT/bench.log"
cat "$OUT/bench.md" 2>/dev/null || tail -n 20 "$OUT/bench.log"

timeout 330 "$PYTHON" -m pytest tests -q -ra -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} >"$OUT/tests.log" 2>&1 &
tests=$!
for dtype in float32 float64; do
    timeout 120 "$PYTHON" -m xpnet verify --dtype "$dtype" >>"$OUT/verify.log" 2>&1 || status=1
done
timeout 120 "$PYTHON" -m xpnet verify --dropout 0.3 --augment affine,elastic >>"$OUT/verify.log" 2>&1 || status=1
tail -n 4 "$OUT/verify.log"
[ "$TRAIN" = 0 ] || for backend in "$GPU_BACKEND" numpy; do
    timeout 240 "$PYTHON" -m xpnet train --backend "$backend" --quiet 2>&1 | sed "s/^/[$backend] /" >>"$OUT/train.log" || status=1
done
grep -E "Epoch 20 |Test accuracy|Warning|Error" "$OUT/train.log"
wait $tests || status=1
tail -n 15 "$OUT/tests.log"
exit $status
