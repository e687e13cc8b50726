#!/usr/bin/env bash
# Everything a lent GPU's device time is for, in one call: the three benchmarks against transformers
# at their GPU shapes, tests/gpu/checks.py (NCCL train, checkpoint, resume, export; grouped GEMM
# parity; no host syncs; decode steps replayed as CUDA graphs against the same steps eager; raymoe
# plan against the CUDA peak), and the host-copy cost of a routed-serving hop (bench/expert_hop.py).
#
# A session has 15 minutes of device time in all (the machine's start counts) and at most 600 s a
# call, so the steps share one budget, --budget seconds (default 540), and run in the order of what
# issue 15 needs most: decode at batch 16 first (the 5x target; CUDA graphs, lever 23), the training
# step (3x, 50% MFU), the MoE layer at the 16B shape (425 TFLOP/s), each against transformers'
# grouped_mm (its eager loop is timed by the MoE layer only), then the checks, the V3 rank
# shape, the serving hop and the compiled training step. Each step has its own time limit, cut to
# what is left of the budget; a step that would start with under 20 s left is skipped and recorded
# as such. Each writes JSON and a log under $OUT, and $OUT/steps.jsonl says how each ended. A step
# stopped by its limit keeps what it finished: decode and the checks write their JSON as they go,
# and the training step prints each implementation's figures to its log as that one finishes.
# --only NAME,NAME reruns chosen steps in a second call (names as in steps.jsonl).
#
# On the device (the hf bundle carries transformers, tokenizers and safetensors; no Ray needed):
#   ../shared/tools/gpu-bundle.sh .gpu hf        # here, once (3 min); add /.gpu/ to .git/info/exclude
#   run: mkdir -p /tmp/site && tar -xJf .gpu/hfbundle.tar.xz -C /tmp/site &&
#        export PYTHONPATH=/tmp/site:$PWD/platform && bash bench/gpu_run.sh      (carry: [".gpu"], timeout_s 600)
# Rehearsal here, on CPU, in about a minute (tiny shapes, the loop checks with gloo; the same
# budget logic, so --budget 20 shows the skipping):
#   bash bench/gpu_run.sh --rehearse
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python || command -v python3)}  # the image may have only python3
REHEARSE=0
BUDGET=540
ONLY=""
MIN_STEP=20
while [ $# -gt 0 ]; do
    case $1 in
        --rehearse) REHEARSE=1 ;;
        --budget) BUDGET=$2; shift ;;
        --only) ONLY=$2; shift ;;
        *) echo "usage: bash bench/gpu_run.sh [--rehearse] [--budget SECONDS] [--only STEP,STEP]" >&2; exit 2 ;;
    esac
    shift
done
DEADLINE=$((SECONDS + BUDGET))

step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return
    fi
    local left=$((DEADLINE - SECONDS))
    if [ $left -lt $MIN_STEP ]; then
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"${left} s of the ${BUDGET} s budget left\"}" | tee -a "$OUT/steps.jsonl"
        return
    fi
    [ "$limit" -gt $left ] && limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit}" | tee -a "$OUT/steps.jsonl"
    tail -n 25 "$OUT/$name.log"
}

if [ $REHEARSE = 1 ]; then
    step decode 120 $PY bench/decode.py --tiny --device cpu --impls grouped_mm --batches 16,1 --mla-expanded --cuda-graphs --out "$OUT/decode-tiny.json"
    step train_step 120 $PY bench/train_step.py --tiny --device cpu --impls grouped_mm --out "$OUT/train_step-tiny.json"
    step moe_layer 120 $PY bench/moe_layer.py --tiny --device cpu --out "$OUT/moe_layer-tiny.json"
    step checks 300 $PY tests/gpu/checks.py "$OUT" --rehearse
    step expert_hop 60 $PY bench/expert_hop.py --tiny --device cpu --out "$OUT/expert_hop-tiny.json"
    step train_step-compile 120 $PY bench/train_step.py --tiny --device cpu --compile --out "$OUT/train_step-tiny-compile.json"
    exit 0
fi

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
    >"$OUT/versions.txt" 2>&1
# --batches 16 first: the target's batch size is measured first, should the limit stop the rest.
# --impls grouped_mm: the targets' baseline only. transformers' eager experts still run once for
# parity; timing them too would cost about a minute of decode and 1.5 minutes of training steps
# (14.2K tokens/s at the 1.26B shape, ../shared/REFERENCE.md), a quarter of the budget.
# --mla-expanded: lever 7's A/B (latent-space decode against rebuilt per-head keys) on the GPU too;
# --cuda-graphs: lever 23, the engine's decode steps replayed as CUDA graphs (captured in the warm-up).
step decode-gpu 180 $PY bench/decode.py --shape gpu --impls grouped_mm --batches 16,1,64 --repeats 2 \
    --mla-expanded --cuda-graphs --out "$OUT/decode-gpu.json"
step train_step-gpu 130 $PY bench/train_step.py --shape gpu --impls grouped_mm --steps 6 --warmup 2 \
    --out "$OUT/train_step-gpu.json"
step moe_layer-16b 75 $PY bench/moe_layer.py --shape 16b --out "$OUT/moe_layer-16b.json"
step checks 150 $PY tests/gpu/checks.py "$OUT"
step moe_layer-v3-rank 75 $PY bench/moe_layer.py --shape v3-rank --out "$OUT/moe_layer-v3-rank.json"
step expert_hop 40 $PY bench/expert_hop.py --out "$OUT/expert_hop.json"
# Lever 9 on CUDA, last because a cold inductor compile of 12 blocks may not fit: compiled training
# blocks against eager raymoe and transformers' grouped_mm in one run.
step train_step-gpu-compile 120 $PY bench/train_step.py --shape gpu --impls grouped_mm --compile --steps 6 --warmup 2 \
    --out "$OUT/train_step-gpu-compile.json"
