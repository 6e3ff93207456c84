#!/usr/bin/env bash
# GPU checks of the core (issue 2), run on a CUDA machine from the repository root:
# the CUDA tests, the quickstart in float16 / bfloat16 / float32, and the loss speed.
# Wheels missing on that machine (webdataset, braceexpand, diffsort) are carried in .whl/.
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
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15
for mp in true bf16 false; do
  echo "== quickstart, trainer.mixed_precision=$mp"
  SECONDS=0
  python3 train.py --config configs/examples/quickstart.yaml --gpu 0 "trainer.mixed_precision=$mp" \
    "save_dir=$OUT/runs" --results-json "$OUT/quickstart_$mp.json" > "$OUT/quickstart_$mp.log" 2>&1
  echo "exit $? in ${SECONDS} s"
  grep -a -o "knn@20_online=[0-9.]*\|float32 on\|ERROR.*" "$OUT/quickstart_$mp.log" | tr '\n' ' '; echo
done
echo "== loss speed (forward + backward)"
python3 -m bench.bench_loss --batch 256 1024 --dim 2048 --views 2 --device cuda
python3 -m bench.bench_loss --batch 256 --dim 2048 --views 4 --device cuda
