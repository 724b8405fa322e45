#!/usr/bin/env bash
# The GPU checks in one run (about 7 minutes on an H200), for a lent GPU machine whose python3
# has torch, torchvision, pytest, tqdm, pandas and pyarrow (no Ray needed):
#
#     bash benchmarks/gpu_checks.sh [LOG_DIR]      # from the repository root
#
# Each step has its own time limit and its own log (LOG_DIR, default $OUT or /tmp/gpu_checks),
# so one that fails or runs long does not cost the others. What matters most comes first: the
# side-by-side throughput ratios (eager, compiled with CUDA graphs, reference), the GPU tests
# (every architecture trains with CUDA graphs; compiled training tracks eager training), the
# full-epoch time, then the mask overhead. The perf_hints logs say whether Inductor skipped
# CUDA graphs anywhere, and why.
set -u
log_dir=${1:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCH_LOGS=perf_hints
py=${PYTHON:-python3}

step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$log_dir/$name.log" 2>&1
  local rc=$?
  grep -v "^\s*$" "$log_dir/$name.log" | tail -n 25
  echo "== $name: rc $rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
cd benchmarks
step 220 throughput $py train_throughput.py --device cuda --steps 30 --rounds 3 --workers 2 --compile
(cd .. && step 330 tests $py -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
  tests/test_train.py tests/test_attacks.py tests/test_evaluate.py)
step 60 epoch_compiled $py train_throughput.py --device cuda --epoch --compile --rounds 3
step 80 mask_overhead $py mask_overhead.py --device cuda --width 1.0 --rounds 30 --steps-per-round 5 --compile
