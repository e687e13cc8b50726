#!/usr/bin/env bash
# Everything a lent GPU's device time is for, in one call: tests/gpu/checks.py (NCCL train,
# checkpoint, resume, export; grouped GEMM parity; no host syncs; decode steps replayed as CUDA
# graphs against the same steps eager; raymoe plan against the CUDA
# peak), the three benchmarks against transformers at their GPU shapes, and the host-copy cost of a
# routed-serving hop (bench/expert_hop.py). Every step has its own
# time limit, so one that hangs cannot eat the others'; each writes JSON and a log under $OUT, and
# $OUT/steps.jsonl says how each ended. About 8 minutes on an H100/H200, plus up to 2 for
# the compiled training step at the end.
#
# On the device (the hf bundle carries transformers, tokenizers and safetensors; no Ray needed):
#   ../shared/tools/gpu-bundle.sh .gpu hf        # here, once; /.gpu/ is in .git/info/exclude
#   run: mkdir -p /tmp/site && tar -xJf .gpu/hfbundle.tar.xz -C /tmp/site &&
#        export PYTHONPATH=/tmp/site:$PWD/platform && bash bench/gpu_run.sh      (carry: [".gpu"])
# Rehearsal here, on CPU, in about 20 seconds (tiny shapes, the loop checks with gloo):
#   bash bench/gpu_run.sh --rehearse
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1

step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" | tee -a "$OUT/steps.jsonl"
    tail -n 25 "$OUT/$name.log"
}

if [ $REHEARSE = 1 ]; then
    step checks 300 $PY tests/gpu/checks.py "$OUT" --rehearse
    step moe_layer 120 $PY bench/moe_layer.py --tiny --device cpu --out "$OUT/moe_layer-tiny.json"
    step train_step 120 $PY bench/train_step.py --tiny --device cpu --compile --out "$OUT/train_step-tiny.json"
    step decode 120 $PY bench/decode.py --tiny --device cpu --mla-expanded --cuda-graphs --out "$OUT/decode-tiny.json"
    step expert_hop 60 $PY bench/expert_hop.py --tiny --device cpu --out "$OUT/expert_hop-tiny.json"
    exit 0
fi

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
    >"$OUT/versions.txt" 2>&1
step checks 150 $PY tests/gpu/checks.py "$OUT"
step moe_layer-16b 75 $PY bench/moe_layer.py --shape 16b --out "$OUT/moe_layer-16b.json"
step moe_layer-v3-rank 75 $PY bench/moe_layer.py --shape v3-rank --out "$OUT/moe_layer-v3-rank.json"
step train_step-gpu 130 $PY bench/train_step.py --shape gpu --impls eager,grouped_mm --steps 6 --warmup 2 \
    --out "$OUT/train_step-gpu.json"
# --mla-expanded: lever 7's A/B (latent-space decode against rebuilt per-head keys) on the GPU too;
# --cuda-graphs: lever 23, the engine's decode steps replayed as CUDA graphs (captured in the warm-up).
step decode-gpu 180 $PY bench/decode.py --shape gpu --impls eager,grouped_mm --repeats 2 --mla-expanded --cuda-graphs \
    --out "$OUT/decode-gpu.json"
step expert_hop 40 $PY bench/expert_hop.py --out "$OUT/expert_hop.json"
# Lever 9 on CUDA, last because a cold inductor compile of 12 blocks may not fit: compiled training
# blocks against eager raymoe and transformers' grouped_mm in one run.
step train_step-gpu-compile 120 $PY bench/train_step.py --shape gpu --impls grouped_mm --compile --steps 6 --warmup 2 \
    --out "$OUT/train_step-gpu-compile.json"
