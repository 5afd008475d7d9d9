#!/usr/bin/env bash
# llava-edge against llama.cpp on ONE checkpoint, in one sitting (run it on a quiet machine):
#   llama.cpp f32 and Q4_0 (text and image prompt), then `llava-edge bench` on an int4 and an fp32 package
#   (text and image prompt), then the peak RSS of one `llava-edge run` per package, then the table (compare.py).
# usage: ./side_by_side.sh CKPT PKG_INT4 PKG_FP32 OUT_DIR
#   PKG_INT4 = llava-edge export CKPT -o PKG_INT4 --target cpu-int4
#   PKG_FP32 = llava-edge export CKPT -o PKG_FP32 --target cpu
# env: LE (llava-edge executable), PY (the venv of setup.sh), RUNS=3, M=128 new tokens, N=64 prompt tokens,
#      THREADS=2, SKIP_LLAMACPP=1 to reuse OUT_DIR's llama.cpp JSON, QUANTS="f32 q4_0" (llama.cpp's),
#      PKG_FP32=- to skip the fp32 rows,
#      EXTRA="TAG:PKG" more int4 packages benched in the same sitting (space-separated; TAG starts with int4),
#      e.g. EXTRA="int4b256:/tmp/pk/int4b256" for an `--int4-block 256` export.
set -uo pipefail
CKPT=$1; PKG_INT4=$2; PKG_FP32=$3; OUT=$4; mkdir -p "$OUT"
LE=${LE:-llava-edge}; PY=${PY:-${PEERS_VENV:-/tmp/peers-venv}/bin/python}
RUNS=${RUNS:-3}; M=${M:-128}; N=${N:-64}; THREADS=${THREADS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
echo "start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/when.txt"
if [[ -z ${SKIP_LLAMACPP:-} ]]; then
  for q in ${QUANTS:-f32 q4_0}; do
    (cd "$HERE" && $PY bench_llamacpp.py "$CKPT" --prompt-tokens "$N" --new-tokens "$M" --runs "$RUNS" \
      --threads "$THREADS" --quant $q > "$OUT/llamacpp-$q.json" 2> "$OUT/llamacpp-$q.err") || echo "llama.cpp $q failed"
  done
fi
EXTRA_BENCH=(); EXTRA_RSS=()
for e in ${EXTRA:-}; do EXTRA_BENCH+=("$e:ort-fast-int4"); EXTRA_RSS+=("$e"); done
for pair in "int4:$PKG_INT4:ort-fast-int4" "fp32:$PKG_FP32:ort-fast" "${EXTRA_BENCH[@]}"; do
  IFS=: read -r tag pkg backend <<< "$pair"
  [[ $pkg == - ]] && continue
  "$LE" bench "$pkg" --backend "$backend" --prompt-len "$N" --new-tokens "$M" --repeat "$RUNS" --threads "$THREADS" \
    -o "$OUT/ours-$tag-image.json" > "$OUT/ours-$tag-image.txt" 2>&1 || echo "ours $tag image failed"
  "$LE" bench "$pkg" --backend "$backend" --no-image --prompt-len "$N" --new-tokens "$M" --repeat "$RUNS" \
    --threads "$THREADS" -o "$OUT/ours-$tag-text.json" > "$OUT/ours-$tag-text.txt" 2>&1 || echo "ours $tag text failed"
done
$PY -c "import numpy as np; from PIL import Image; Image.fromarray(np.random.default_rng(0).integers(0,256,(336,336,3),dtype=np.uint8)).save('$OUT/img.png')"
for pair in "int4:$PKG_INT4" "fp32:$PKG_FP32" "${EXTRA_RSS[@]}"; do
  IFS=: read -r tag pkg <<< "$pair"
  [[ $pkg == - ]] && continue
  /usr/bin/time -v "$LE" run "$pkg" --image "$OUT/img.png" --prompt "Describe the image." --greedy \
    --max-new-tokens 32 --threads "$THREADS" --json > "$OUT/rss-$tag.json" 2> "$OUT/rss-$tag.err" || echo "rss $tag failed"
  grep "Maximum resident" "$OUT/rss-$tag.err" | sed "s/^/$tag: /"
done
echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/when.txt"
python3 "$HERE/compare.py" "$OUT" --plot "$OUT/side_by_side.png" | tee "$OUT/table.md"
