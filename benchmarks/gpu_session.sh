#!/usr/bin/env bash
# One prepared call on a lent GPU machine (torch, triton, transformers, peft; no fastapi), in
# this order, each part under its own timeout so the whole stays under ~9 minutes:
#   1. GPU tests: pytest -m gpu over every tests/test_*.py that does not need the server stack
#   2. benchmarks/bench_sampler.py           (if present)
#   3. benchmarks/bench_decode_attention.py  (if present)
#   4. benchmarks/bench_decode_gpu.py        (ends itself before its timeout: --time-limit)
#   5. benchmarks/bench_lora_ops_gpu.py      (short timeout, last)
# At most 8 files land in $OUT: gpu.txt, tests.log, sampler.log, attention.log, decode.log,
# decode.md, lora_ops.log, summary.txt (rc and seconds per part).
# Usage (repo root):  OUT=/some/dir bash benchmarks/gpu_session.sh
# CPU rehearsal:      OUT=/tmp/s DRY_RUN=1 bash benchmarks/gpu_session.sh
# Timeouts (s): TEST_TIMEOUT SAMPLER_TIMEOUT ATTN_TIMEOUT DECODE_TIMEOUT LORA_TIMEOUT;
# extra flags: DECODE_ARGS, LORA_ARGS; SKIP="sampler decode_attention decode_gpu lora_ops_gpu" leaves parts out.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/loraplex_gpu}
mkdir -p "$OUT"
DRY=${DRY_RUN:+--dry-run}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# part NAME TIMEOUT LOGFILE CMD...: run CMD under TIMEOUT, tee into LOGFILE, show its tail
part() {
  local name=$1 limit=$2 log=$3
  shift 3
  case " ${SKIP:-} " in *" ${name#bench_} "*) echo "=== $name skipped (SKIP)"; return;; esac
  local t0=$SECONDS
  echo "=== $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log" | tail -n 60
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$((SECONDS - t0))$([ $rc -eq 124 ] && echo ' (timed out)')" \
    | tee -a "$SUMMARY"
}

{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  else
    echo "no nvidia-smi"
  fi
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'triton', triton.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

# test files importing the HTTP stack at module level cannot be collected there (tests that
# need it inside a function skip themselves with pytest.importorskip)
TESTS=()
for f in tests/test_*.py; do
  grep -qE "^(import|from) (fastapi|uvicorn|httpx|openai|server_utils|loraplex\.server)\b" "$f" \
    || TESTS+=("$f")
done
part tests "${TEST_TIMEOUT:-150}" "$OUT/tests.log" \
  python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors "${TESTS[@]}"

if [ -f benchmarks/bench_sampler.py ]; then
  part bench_sampler "${SAMPLER_TIMEOUT:-45}" "$OUT/sampler.log" \
    python3 benchmarks/bench_sampler.py ${DRY:+--quick}
fi
if [ -f benchmarks/bench_decode_attention.py ]; then
  part bench_decode_attention "${ATTN_TIMEOUT:-60}" "$OUT/attention.log" \
    python3 benchmarks/bench_decode_attention.py $DRY
fi
DECODE_TIMEOUT=${DECODE_TIMEOUT:-240}
# model builds, the last point and teardown run past the last start: leave them a minute
part bench_decode_gpu "$DECODE_TIMEOUT" "$OUT/decode.log" \
  python3 benchmarks/bench_decode_gpu.py $DRY --time-limit $((DECODE_TIMEOUT - 60)) \
  --out "$OUT/decode.md" ${DECODE_ARGS:-}
part bench_lora_ops_gpu "${LORA_TIMEOUT:-45}" "$OUT/lora_ops.log" \
  python3 benchmarks/bench_lora_ops_gpu.py $DRY ${LORA_ARGS:---no-sweep}
cat "$SUMMARY"
