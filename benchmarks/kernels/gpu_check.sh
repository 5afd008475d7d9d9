#!/usr/bin/env bash
# One device call for issue 5's GPU part: kernel tests on the GPU (not the interpreter), then the three
# benchmarks at LLaVA-7B shapes. Sized to fit one ~8-minute run; what it writes under $OUT comes back.
#
#   run(command="bash benchmarks/kernels/gpu_check.sh", timeout_s=540)
#
# Needs torch with CUDA and triton (a CUDA machine image usually has both); nothing is installed here.
#
# Time budget (s): tests 200 + decode 110 + int4 120 + prefill 60 = 490 < 540. Estimates for the benches
# on a datacenter GPU (~0.5 s of timing per op: do_bench + do_bench_cudagraph + loop, ~1-3 s per Triton compile,
# ~10 s torch/CUDA start): decode 36 ops + 10-case sweep (splits, 8 warps), 11 kernel variants -> ~70 s; int4 33 ops +
# 17-config M=1 sweep + 4-config M=4 sweep, ~20 compiles -> ~70 s; prefill 12 ops -> ~25 s. Each bench rewrites its results
# after every row, so one killed by its timeout still returns the rows it finished.
# Files back under $OUT: gpu_check.log + {decode_attention,int4_matmul,prefill_attention}.{json,md} = 7 (max 8).
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
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider tests/kernels 2>&1 | tail -40  # no -x: the image's Triton (3.6 when last seen) differs from ours; see every failure
} 2>&1 | tee "$LOG"
status=0
for spec in decode_attention:110 int4_matmul:120 prefill_attention:60; do
    b=${spec%%:*} limit=${spec##*:}
    start=$SECONDS
    timeout "$limit" python3 "benchmarks/kernels/bench_$b.py" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "== bench_$b: exit $rc after $((SECONDS - start)) s (limit $limit s; 124 = timed out)" | tee -a "$LOG"
    [ "$rc" = 0 ] || status=1
    [ "$OUT" = benchmarks/results ] || cp -f "benchmarks/results/$b.json" "benchmarks/results/$b.md" "$OUT/" 2>/dev/null
done
exit $status
