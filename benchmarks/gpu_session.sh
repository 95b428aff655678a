#!/usr/bin/env bash
# One prepared call on a lent GPU machine: GPU tests, then the op + decode-step benchmark.
# Usage (repo root, torch + triton + transformers + peft preinstalled there):
#   OUT=/some/dir bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/loraplex_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_lora_triton.py tests/test_engine_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
echo "tests rc=${PIPESTATUS[0]}"
timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/bench_lora_ops_gpu.py ${BENCH_ARGS:-} \
  --out "$OUT/bench_gpu.md" 2>&1 | tee "$OUT/bench.log" | tail -n 80
echo "bench rc=${PIPESTATUS[0]}"
