#!/usr/bin/env bash
# `llama-server` beside `llava-edge serve` on ONE checkpoint, driven by the same OpenAI chat workload
# (`llava-edge bench-serve`: streaming, one image inline as a data URL + a question, temperature 0, ignore_eos,
# max_tokens new tokens), one server after the other, in one sitting (run it on a quiet machine):
#   1. llama-server built from the llama.cpp vendored in the llama-cpp-python sdist of setup.sh (CPU, no curl;
#      skipped when built). On a CPU with AMX, ggml's AMX kernels crash on the first Q4_0 matmul
#      (ggml-org/llama.cpp#20824), so AMX code generation is turned off there.
#   2. the checkpoint's Q4_0 GGUF + f16 mmproj, made (and cached) by bench_llamacpp.py's own conversion functions.
#   3. llama-server -np SLOTS -c SLOTS*CTX_PER_SLOT -t THREADS, measured with `bench-serve --url`; then
#      `llava-edge serve PKG --max-slots SLOTS --threads THREADS`, started by bench-serve, with the same flags.
#   4. the table (compare_serve.py) from both bench-serve JSON files.
# usage: ./serve_side_by_side.sh CKPT PKG OUT_DIR
#   CKPT = a llava-hf checkpoint llama.cpp converts (make_ckpt.py edge-1b CKPT)
#   PKG  = llava-edge export CKPT -o PKG --target cpu-int4
# env: LE (llava-edge executable), PY (the venv of setup.sh), CLIENTS=1,2,4,8, REQUESTS=4 per client per level,
#      M=128 new tokens, ARRIVAL=128 (tokens of the 3 running streams in the arrival case; 0 skips it),
#      THREADS=2, SLOTS=4, CTX_PER_SLOT=1024, LLAMA_BUILD (default PEERS_SRC/llama-server-build),
#      GGUF_DIR (default /tmp/peers-gguf/<ckpt name>, bench_llamacpp.py's cache), SKIP_OURS=1 / SKIP_LLAMACPP=1.
set -euo pipefail
CKPT=$(cd "$1" && pwd); PKG=$2; OUT=$3; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
LE=${LE:-llava-edge}; PY=${PY:-${PEERS_VENV:-/tmp/peers-venv}/bin/python}; SRC=${PEERS_SRC:-/tmp/peers-src}
CLIENTS=${CLIENTS:-1,2,4,8}; REQUESTS=${REQUESTS:-4}; M=${M:-128}; ARRIVAL=${ARRIVAL:-128}
THREADS=${THREADS:-2}; SLOTS=${SLOTS:-4}; CTX_PER_SLOT=${CTX_PER_SLOT:-1024}
GGUF_DIR=${GGUF_DIR:-/tmp/peers-gguf/$(basename "$CKPT")}
HERE=$(cd "$(dirname "$0")" && pwd)
[[ -x $PY ]] || { echo "no $PY: run ./setup.sh first"; exit 1; }
BENCH=(--clients "$CLIENTS" --requests "$REQUESTS" --max-new-tokens "$M" --arrival "$ARRIVAL" --threads "$THREADS"
       --out-dir "$OUT")

# 1. llama-server
LLAMA_SRC=$(ls -d "$SRC"/llama_cpp_python-*/vendor/llama.cpp | tail -1)
LLAMA_BUILD=${LLAMA_BUILD:-$SRC/llama-server-build}
SERVER=$LLAMA_BUILD/bin/llama-server
if [[ ! -x $SERVER ]]; then
  FLAGS=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF)
  if grep -qw amx_int8 /proc/cpuinfo; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    FLAGS+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
  fi
  t0=$(date +%s)
  cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" "${FLAGS[@]}" > "$OUT/llama-server-build.log" 2>&1
  cmake --build "$LLAMA_BUILD" --target llama-server -j"$(nproc)" >> "$OUT/llama-server-build.log" 2>&1 \
    || { tail -30 "$OUT/llama-server-build.log"; exit 1; }
  echo "llama-server built in $(( $(date +%s) - t0 )) s on $(nproc) cores: $SERVER"
fi

# 2. Q4_0 GGUF + mmproj (bench_llamacpp.py's conversion, cached in GGUF_DIR)
mkdir -p "$GGUF_DIR"
read -r GGUF MMPROJ < <(cd "$HERE" && "$PY" -c "
import sys
from pathlib import Path
from bench_llamacpp import convert_mmproj, convert_text
out = Path(sys.argv[2])
print(convert_text(sys.argv[1], out, 'q4_0'), convert_mmproj(sys.argv[1], out, f32=False)[0])
" "$CKPT" "$GGUF_DIR")
[[ -f ${GGUF:-} && -f ${MMPROJ:-} ]] || { echo "GGUF conversion failed"; exit 1; }
echo "GGUF $GGUF, mmproj $MMPROJ"

echo "start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/when.txt"
# 3a. llama-server, measured through its OpenAI endpoint
if [[ -z ${SKIP_LLAMACPP:-} ]]; then
  PORT=$(python3 -c "from llava_edge.benchmarks.serve_load import free_port; print(free_port())")
  "$SERVER" -m "$GGUF" --mmproj "$MMPROJ" -np "$SLOTS" -c $((SLOTS * CTX_PER_SLOT)) -t "$THREADS" \
    --host 127.0.0.1 --port "$PORT" > "$OUT/llamacpp_server.log" 2>&1 &
  SPID=$!
  trap 'kill $SPID 2>/dev/null || true' EXIT
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $SPID 2>/dev/null || { tail -20 "$OUT/llamacpp_server.log"; exit 1; }
    sleep 1
  done
  "$LE" bench-serve --url "http://127.0.0.1:$PORT" --server-pid "$SPID" "${BENCH[@]}" --name llamacpp \
    | tee "$OUT/llamacpp.txt"
  kill $SPID; wait $SPID 2>/dev/null || true
  trap - EXIT
fi
echo "between $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/when.txt"
# 3b. llava-edge serve, started by bench-serve with the same slots and threads
if [[ -z ${SKIP_OURS:-} ]]; then
  "$LE" bench-serve "$PKG" --max-slots "$SLOTS" "${BENCH[@]}" --name llava-edge | tee "$OUT/llava-edge.txt"
fi
echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/when.txt"

# 4. the table
python3 "$HERE/compare_serve.py" "$OUT/llava-edge.json" "$OUT/llamacpp.json" | tee "$OUT/table.md"
