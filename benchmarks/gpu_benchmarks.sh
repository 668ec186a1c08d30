#!/usr/bin/env bash
# One script for a GPU machine: the Triton kernels' tests compiled on the GPU, then the GPU benchmark.
#
#   benchmarks/gpu_benchmarks.sh OUTDIR [bench_gpu arguments...]
#
# Meant for a GPU machine that reaches no package registry: it runs on that machine's python3 and
# its torch, transformers and triton.  hcmemory is installed from this checkout in editable mode with
# no dependencies and no build isolation (setuptools maps kernels/ and integrations/ to subpackages, as
# in any install); pure-Python dependencies the machine lacks are put on PYTHONPATH from $VENDOR
# (default .gpu/, e.g. copies of simpleeval.py or llguidance).  Everything it writes goes to OUTDIR.
set -u
out=${1:?usage: benchmarks/gpu_benchmarks.sh OUTDIR [bench_gpu arguments...]}
shift
mkdir -p "$out"
export PYTHONPATH="$PWD/${VENDOR:-.gpu}" PYTHONUNBUFFERED=1 HCMEMORY_BENCH_RESULTS="$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$out/device.txt"
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1; then
  # no usable setuptools there: run from the checkout (hcmemory.folders maps kernels/ and integrations/)
  echo "editable install failed ($(tail -1 "$out/install.log")); running from the checkout instead"
  export PYTHONPATH="$PWD:$PYTHONPATH"
fi
python3 -c "import hcmemory.kernels, hcmemory.integrations" || exit 1
if [ "${KERNEL_TESTS:-1}" != 0 ]; then  # KERNEL_TESTS=0: the benchmark only
  echo "== Triton kernels' tests (compiled on this device) =="
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py >"$out/kernel_tests.log" 2>&1
  echo "exit $?: $(tail -1 "$out/kernel_tests.log")"
fi
echo "== GPU benchmark =="
python3 -m benchmarks.bench_gpu "$@" >"$out/bench.log" 2>&1
echo "exit $?"
grep -v "^{" "$out/bench.log" | tail -30
