#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md, run on a CUDA machine from the repository root (about 6 min):
# the CUDA tests, the quickstart in float16 and bfloat16, the loss with and without torch.compile,
# and the ResNet-50 training step, reference-style against ours. Wheels missing on that machine
# (webdataset, braceexpand, diffsort) are carried in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
date -u; nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== CUDA tests"
timeout 90 python3 -m pytest -q tests/test_gpu.py tests/test_gpu_augment.py -p no:cacheprovider 2>&1 | tail -4
for mp in true bf16; do
  echo "== quickstart, trainer.mixed_precision=$mp"
  SECONDS=0
  timeout 90 python3 train.py --config configs/examples/quickstart.yaml --gpu 0 "trainer.mixed_precision=$mp" \
    "save_dir=$OUT/runs" --results-json "$OUT/quickstart_$mp.json" > "$OUT/quickstart_$mp.log" 2>&1
  echo "exit $? in ${SECONDS} s"
  grep -a -o "knn@20_online=[0-9.]*" "$OUT/quickstart_$mp.log" | tr '\n' ' '; echo
done
echo "== loss, forward + backward"
timeout 75 python3 -m bench.bench_loss --batch 256 1024 --dim 2048 --views 2 --device cuda --compile default reduce-overhead
echo "== training step, ResNet-50, synthetic images"
timeout 170 python3 -m bench.train_throughput --batch 256 --views 2 --steps 20 --warmup 8
