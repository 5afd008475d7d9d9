#!/usr/bin/env bash
# The CPU sitting with three columns, on ONE checkpoint, one after the other (run it on a quiet machine):
#   1. llama.cpp Q4_0 and `llava-edge bench` on the cpu-int4 package (../llamacpp/side_by_side.sh, int4 rows);
#   2. OpenVINO GenAI's VLMPipeline on an int4 export of the same checkpoint (optimum-intel, g128, sym, ratio 1.0),
#      with fp32 math asked for and with the CPU's default (bf16 where the CPU has it): genai_bench.py;
#   3. our own package's graphs in onnxruntime and in OpenVINO (same_graph.py);
#   then the table (compare_cpu.py).
# usage: ./sitting.sh CKPT PKG_INT4 OUT_DIR
#   CKPT     = a llava-hf checkpoint (../llamacpp/make_ckpt.py edge-1b CKPT)
#   PKG_INT4 = llava-edge export CKPT -o PKG_INT4 --target cpu-int4
# env: OV_VENV [/tmp/ovg-venv] (made on first use: optimum-intel 2.2, nncf 3.4, openvino(-genai) 2026.4.1, and
#      onnxruntime 1.31.1 + onnx for same_graph.py), OV_WORK [/tmp/ov-work] (renamed checkpoint and IR, cached),
#      RUNS=3, and side_by_side.sh's LE, PY, M, N, THREADS, SKIP_LLAMACPP.
set -euo pipefail
CKPT=$(cd "$1" && pwd); PKG=$2; OUT=$3; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd); V=${OV_VENV:-/tmp/ovg-venv}; RUNS=${RUNS:-3}
WORK=${OV_WORK:-/tmp/ov-work}/$(basename "$CKPT")
if [[ ! -x $V/bin/optimum-cli ]]; then
  python3 -m venv "$V"; "$V/bin/pip" -q install torch==2.13.0; echo "torch==2.13.0" > "$V/c.txt"
  "$V/bin/pip" -q install -c "$V/c.txt" optimum-intel==2.2.0 nncf==3.4.0 openvino==2026.4.1 openvino-genai==2026.4.1.0 \
    openvino-tokenizers pillow sentencepiece safetensors onnxruntime==1.31.1 onnx
  # the registry's torchvision does not import beside the CPU torch 2.13.0 wheel, and transformers then fails to
  # import PreTrainedModel; optimum-intel does not need it for this export
  "$V/bin/pip" -q uninstall -y torchvision || true
fi
if [[ ! -f $WORK/ir-int4/openvino_language_model.xml ]]; then
  "$V/bin/python" "$HERE/prep_ckpt.py" "$CKPT" "$WORK/ckpt"
  /usr/bin/time -v "$V/bin/optimum-cli" export openvino -m "$WORK/ckpt" --task image-text-to-text \
    --weight-format int4 --group-size 128 --ratio 1.0 --sym "$WORK/ir-int4" > "$OUT/ov-export.log" 2>&1
  cp "$WORK/ckpt/preprocessor_config.json" "$WORK/ir-int4/"  # optimum writes none: images would be preprocessed
fi                                                          # differently without a word
# 1. llama.cpp Q4_0 + llava-edge int4 (writes OUT/img.png, the image every column sees)
QUANTS=q4_0 RUNS=$RUNS "$HERE/../llamacpp/side_by_side.sh" "$CKPT" "$PKG" - "$OUT"
# 2. OpenVINO GenAI
for prec in f32 default; do
  /usr/bin/time -v "$V/bin/python" "$HERE/genai_bench.py" "$WORK/ir-int4" "$OUT/img.png" "$RUNS" "$prec" \
    > "$OUT/ov-genai-$prec.json" 2> "$OUT/ov-genai-$prec.err" || echo "OpenVINO GenAI $prec failed"
done
# 3. the same graphs in both runtimes
"$V/bin/python" "$HERE/same_graph.py" "$PKG" "$RUNS" > "$OUT/same-graph.json" 2> "$OUT/same-graph.err" \
  || echo "same_graph failed"
echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/when.txt"
python3 "$HERE/compare_cpu.py" "$OUT" | tee "$OUT/table.md"
