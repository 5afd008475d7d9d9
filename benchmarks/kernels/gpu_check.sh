#!/usr/bin/env bash
# One device call for issue 5's GPU part: kernel tests on the GPU (not the interpreter), then the three
# benchmarks at LLaVA-7B shapes. Sized to fit one ~8-minute run; what it writes under $OUT comes back.
#
#   run(command="bash benchmarks/kernels/gpu_check.sh", timeout_s=540)
#
# Needs torch with CUDA and triton (the H200 image has both); nothing is installed here.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG="$OUT/gpu_check.log"  # one log: the device tool returns at most 8 files
{
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
# correctness first: a kernel that is wrong on hardware makes its timings meaningless
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/kernels 2>&1 | tail -25
} 2>&1 | tee "$LOG"
status=0
for b in decode_attention int4_matmul prefill_attention; do
    timeout 100 python3 "benchmarks/kernels/bench_$b.py" 2>&1 | tee -a "$LOG" || status=1
    [ "$OUT" = benchmarks/results ] || cp -f "benchmarks/results/$b.json" "benchmarks/results/$b.md" "$OUT/" 2>/dev/null
done
exit $status
