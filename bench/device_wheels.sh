#!/usr/bin/env bash
# The wheels bench/device_speed.sh needs on the device machine, downloaded here into .whl/
# (git-ignored; name `.whl` in the device call's carry list, about 2 MB). That machine has Python
# 3.12 with torch, torchvision, numpy, pillow, scikit-learn, pyyaml, tqdm, humanize, psutil,
# matplotlib, py-cpuinfo, colorama, packaging and pytest, but not the data loading, sorting and
# tracking packages below (their dependencies named one by one: pip downloads them without).
# `wrapt<2` and `setuptools<82` are what sacred 0.8.7 needs (it imports pkg_resources).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "webdataset>=1.0" "braceexpand>=0.1.7" "diffsort>=0.2.0" "sacred>=0.8.4" "docopt-ng>=0.9,<1.0" \
  "jsonpickle>=2.2" "munch>=2.5,<5" "wrapt<2" GitPython gitdb smmap "setuptools<82"
ls .whl
