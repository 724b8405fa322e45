#!/usr/bin/env bash
# Fig. 14 at GPU scale (search_spaces/fig14_gpu.yaml: full CIFAR-10, width-1 ResNet-18, the
# paper's recipe at 40 epochs) on a bare GPU machine, through the real commands: a local Ray
# instance, Ray Tune + Ray Train for every model, the matrix's Ray tasks and actors.
#
#     bash benchmarks/fig14_gpu.sh install WHEELS   # Ray and its needs from wheels (no network) into /tmp/site
#     bash benchmarks/fig14_gpu.sh run DATA         # python -m rm_sweep.tradeoff, about 8 minutes on an H200
#     bash benchmarks/fig14_gpu.sh speed DATA       # the sweep-speed table: 1, 2, 4 trials sharing the GPU
#     bash benchmarks/fig14_gpu.sh smoke DATA       # `run` on this machine's CPU, on a small copy of the space
#
# from the repository root; DATA is the CIFAR-10 ImageFolder (../shared/data/cifar10-jpeg).
# `run` leaves results/<space>-<gpu>/ (the store's Parquet tables without checkpoints, the
# figure, the command's output, the machine) packed as OUT/results.tar.gz, OUT being $OUT or
# /tmp/fig14_gpu; `speed` writes OUT/speed.log and OUT/speed.json. The steps of a lent GPU
# session are in benchmarks/README.md ("Fig. 14 on a GPU").
set -euo pipefail
stage=${1:?usage: fig14_gpu.sh install WHEELS | run DATA | speed DATA | smoke DATA}
source_dir=${2:?the wheels folder (install) or the CIFAR-10 folder (run, speed, smoke)}
out=${OUT:-/tmp/fig14_gpu}
work=${FIG14_WORK:-/tmp/fig14_gpu_work}   # store and decoded data; kept between calls on a warm machine
mkdir -p "$out" "$work"
# Ray's wheel carries psutil in ray/thirdparty_files and puts it on sys.path when `ray` is imported;
# rm_sweep imports psutil (leases) before Ray, so an image without psutil needs that folder here.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/site/ray/thirdparty_files:$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
space=search_spaces/fig14_gpu.yaml

tradeoff() {  # tradeoff SPACE NAME [FLAGS...]: the Fig. 14 command, its results packed into $out
  local space_file=$1 name=$2
  shift 2
  local results=$work/results/$name
  rm -rf "$results" && mkdir -p "$results"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
    $py -c 'import torch, ray, rm_sweep.tables as t; print("torch", torch.__version__, "ray", ray.__version__,
"rm_sweep", t.code_version())'
    nproc; } >"$results/machine.txt"
  cat "$results/machine.txt"
  # The paper's points are overlaid by default: the space trains as the paper did, at a shortened schedule.
  $py -m rm_sweep.tradeoff --space "$space_file" --store "$work/store-$name" --data "folder:$source_dir" \
    --data-dir "$work/data" --out "$results/fig14.png" "$@" 2>&1 | tee "$results/tradeoff.log"
  for table in models matrix ensembles; do
    if [ -d "$work/store-$name/$table" ]; then cp -r "$work/store-$name/$table" "$results/"; fi
  done
  tar czf "$out/results.tar.gz" -C "$work/results" "$name"
  echo "results: $out/results.tar.gz ($name/: $(ls "$results" | tr '\n' ' '))"
}

gpu_name() {
  nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | sed 's/^NVIDIA //' | tr 'A-Z ' 'a-z-'
}

case $stage in
  install)
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$source_dir"/*.whl
    $py -c 'import rm_sweep.tradeoff, ray, ray.tune, ray.train.torch; print("ray", ray.__version__, "and rm_sweep import")'
    ;;
  run)
    tradeoff "$space" "fig14_gpu-$(gpu_name)"
    ;;
  speed)
    $py benchmarks/gpu_sweep_speed.py --data "folder:$source_dir" --data-dir "$work/data" --json "$out/speed.json" \
      2>&1 | tee "$out/speed.log"
    ;;
  smoke)
    # The same space at a size this CPU trains in minutes: width 0.125, 1000 images, 2 epochs, no GPU.
    small=$work/fig14_gpu_smoke.yaml
    $py - "$space" "$small" <<'EOF'
import sys, yaml
space = yaml.safe_load(open(sys.argv[1]))
space.update(name="fig14_gpu_smoke", train_subset=1000, test_subset=200, recipe={"name": "paper", "epochs": 2},
             resources={"cpus_per_trial": 1, "gpus_per_trial": 0})
for group in space["models"]:
    group["width"] = 0.125
for block in space["matrix"]:
    block["limit"] = 20
yaml.safe_dump(space, open(sys.argv[2], "w"), sort_keys=False)
EOF
    tradeoff "$small" fig14_gpu_smoke-cpu --quiet
    ;;
  *)
    echo "unknown stage $stage: install, run, speed or smoke" >&2
    exit 2
    ;;
esac
