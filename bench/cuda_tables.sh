#!/usr/bin/env bash
# Issue 14's tables on a CUDA GPU (README "On a GPU"; docs/moe.md "On a CUDA GPU"): the CUDA MoE dispatch tests,
# per-layer inference (bench/moe_layer.py), whole encoders and decoding at batch 1
# (bench/rtf.py), training step throughput fp32 and bf16 (bench/train_throughput.py),
# each MoE number with the sorted per-expert loop ("loop") and the default ("auto":
# dense experts for small inference batches, grouped GEMM for bf16 on CUDA 9.0+).
# Needs only torch, numpy, PyYAML, tqdm and pytest (no virtual environment: a GPU
# machine's own torch); logs go to $OUT (default /tmp/wm_cuda); DISPATCHES="auto" times
# only the default; SPEECH_NPY=file adds the
# speech-feature table (`bench/rtf.py --save-speech file` writes it where espeak-ng is).
# Where the host CPU has AMX, a last step times the CPU experts per precision (amx.log).
#     bash bench/cuda_tables.sh [quick]
set -u
OUT=${OUT:-/tmp/wm_cuda}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}
reps=10; steps=8
DISPATCHES=${DISPATCHES:-loop auto}     # the MoE dispatches compared
[ "${1:-}" = quick ] && reps=3 && steps=3
step() {   # step LOG LIMIT_S COMMAND...: run, log, never stop the script
  local log=$1 limit=$2; shift 2
  echo "== $*" | tee -a "$OUT/$log"
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1; echo "== rc $?" | tee -a "$OUT/$log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  lscpu | grep -E 'Model name|^CPU\(s\)'; } >"$OUT/env.log" 2>&1
cat "$OUT/env.log"
step tests.log 240 $PY -m pytest -q -p no:cacheprovider tests/layers/test_moe.py -k "cuda or accelerator or grouped"
tail -3 "$OUT/tests.log"
for dtype in fp32 bf16; do
  for d in $DISPATCHES; do
    step train.log 150 $PY bench/train_throughput.py --device cuda --blocks 12 --decoder-blocks 3 \
      --batch 32 --seconds 10 --tokens 40 --steps $steps --dtype $dtype --accelerator-dispatch $d
  done
done
grep -E "SUMMARY|ms/step" "$OUT/train.log"
for d in $DISPATCHES; do
  step layer.log 150 $PY bench/moe_layer.py --device cuda --frames 16 256 4096 --reps $((reps * 2)) \
    --ort-frames --accelerator-dispatch $d
done
grep -A5 "^    T\|^  *T " "$OUT/layer.log" | head -20
for d in $DISPATCHES; do
  step rtf.log 200 $PY bench/rtf.py --device cuda --models dense_s moe_topk dense_l --features random \
    --no-decode --reps $reps --accelerator-dispatch $d
done
speech=(); [ -n "${SPEECH_NPY:-}" ] && speech=(speech --speech-features "$SPEECH_NPY")
step rtf.log 300 $PY bench/rtf.py --device cuda --features random "${speech[@]}" --reps $((reps / 2 + 1))
grep -E "^SUMMARY|^torch|^case" "$OUT/rtf.log"
# The host CPU's AMX table, where it has AMX (the bf16a experts' oneDNN kind runs AMX
# kernels there; issue 14 asks for it and the developer machine has none): one thread.
if grep -q amx_bf16 /proc/cpuinfo; then
  step amx.log 300 env OMP_NUM_THREADS=1 $PY bench/moe_layer.py --threads 1 --reps 15 \
    --frames 16 64 256 1024 --precisions bf16 bf16a w8a8 --ort-frames
  grep -E "^ *T |^ +[0-9]+ " "$OUT/amx.log" | head -20
fi
