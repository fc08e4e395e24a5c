#!/usr/bin/env bash
# The GPU suite as one device command. The lent GPU machines have jax, flax, optax and orbax but not
# grain, tensorflow-datasets, array-record, ml-collections, clu or tensorboardX: their wheels (python 3.12,
# see bench/NOTES.md for the list) travel in .whl/ and are installed without an index.
#
#   bash bench/gpu_device.sh [--only=...] [--budget_s=...]      (any bench.gpu_suite option)
#
# Results land in $OUT (gpu.json, results.md, the trace), or bench/out without $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
if ! python3 -c "import grain, tensorflow_datasets, ml_collections, clu, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
exec python3 -m bench.gpu_suite --out="$out/gpu.json" --budget_s=480 "$@"
