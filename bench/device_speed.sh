#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md, run on a CUDA machine from the repository root. Sections (each
# fits in one 10-minute call; `all` runs them in this order):
#   tests      the CUDA tests (loss without host syncs, compiled loss = eager, CUDA-graph training,
#              quickstart in fp16/bf16, decoding and augmentation on the GPU)            ~4 min
#   loss       the loss alone, batch 256 and 1024, eager / compiled / CUDA graphs          ~2 min
#   step       ResNet-50 step, 2 x 224, synthetic images: reference-style, compile default
#              and reduce-overhead, each with the loss's share of the step                 ~5 min
#   multicrop  the same for 2 x 224 + 6 x 96                                               ~5 min
#   shards     GPU decode + augmentation alone, then end to end from synthetic JPEG shards:
#              PIL workers vs augment_on gpu (prefetched), the files decoded on the GPU
#              and by the CPU workers (decode_on cpu)                                     ~9 min
#   syncbn     does torch.compile keep SyncBatchNorm in its graph under DDP (2 gloo processes
#              sharing the GPU): graphs, breaks, gradients against eager, ms per step     ~3 min
# Wheels missing on that machine (webdataset, braceexpand, diffsort, sacred, ...) are carried in .whl/
# (git-ignored: pass it in the device call's carry list); `bash bench/device_wheels.sh` makes it for
# the machine's Python 3.12 (about 2 MB).
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_speed.log") 2>&1  # the whole output comes back as a file too
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
date -u; nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
STEP="--batch 256 --steps 20 --warmup 8 --short --compile-mode default reduce-overhead"
for section in "${@:-all}"; do
  if [[ $section == tests || $section == all ]]; then
    echo "== CUDA tests"
    timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short tests
  fi
  if [[ $section == loss || $section == all ]]; then
    echo "== loss, forward + backward"
    timeout 150 python3 -m bench.bench_loss --batch 256 1024 --views 2 --device cuda --compile default reduce-overhead
    timeout 100 python3 -m bench.bench_loss --batch 256 --views 8 --n-pos 2 --device cuda --compile reduce-overhead
  fi
  if [[ $section == step || $section == all ]]; then
    echo "== training step, ResNet-50, 2 x 224, synthetic images"
    timeout 330 python3 -m bench.train_throughput $STEP
  fi
  if [[ $section == multicrop || $section == all ]]; then
    echo "== training step, ResNet-50, 2 x 224 + 6 x 96, synthetic images"
    timeout 330 python3 -m bench.train_throughput $STEP --multicrop
  fi
  if [[ $section == shards || $section == all ]]; then
    echo "== GPU decode + augmentation alone, batch 512 (PIL baseline skipped: measured before)"
    timeout 90 python3 -m bench.bench_gpu_augment --device cuda --workers 0 --batches 5
    echo "== end to end from JPEG shards (synthetic 500 x 375 photos), 16 PIL workers vs augment_on gpu"
    timeout 290 python3 -m bench.train_throughput --batch 256 --steps 15 --warmup 5 --short --compile-mode default \
      --make-shards 3072 --workers 16
    timeout 200 python3 -m bench.train_throughput --batch 256 --steps 10 --warmup 4 --short --compile-mode default \
      --make-shards 1536 --workers 16 --multicrop
  fi
  if [[ $section == syncbn || $section == all ]]; then
    echo "== SyncBatchNorm under torch.compile and DDP, ResNet-50, 2 processes on one GPU"
    timeout 300 python3 -m bench.syncbn_compile --arch resnet50 --batch 32 --steps 5
  fi
done
