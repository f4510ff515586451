#!/usr/bin/env bash
# The GPU checks, as one call on a lent CUDA machine (15 minutes of device time in all):
# the gpu-marked tests, then the benchmark table of issue F, each row bounded in time.
# Results land in $OUT (or ./gpu-results): pytest.log and benchmark-*.jsonl.
#
# The device image has torch, accelerate, peft, transformers and safetensors but not diffusers,
# bitsandbytes, datasets, pydantic or tomli-w: fetch their wheels here first with
# scripts/fetch_device_wheels.sh, and carry the .whl folder with the call.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONPATH="$PWD"
if [ -d .whl ]; then  # about 51 MiB of wheels, inside the 64 MiB a call may carry
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt"

# 1. CUDA-only paths: fp16 loss scaling, bf16, NF4/fp8 on CUDA, compile, offload memory, 2-GPU FSDP.
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -5

# 2. The table: 1024², batch 1, rank 16 (then fast at batch 4, and the 8/12 GiB caps).
bench() {  # name, then benchmark.py arguments
    local name="$1"; shift
    timeout 150 python3 scripts/benchmark.py --no-data "$@" > "$out/benchmark-$name.jsonl" 2> "$out/benchmark-$name.err"
    tail -n +2 "$out/benchmark-$name.jsonl"
}
bench rows --profile all --steps 10 --warmup 3
bench fast-b4 --profile fast --batch-size 4 --steps 10 --warmup 3
bench low-12g --profile low_vram --vram-gib 12 --steps 5 --warmup 2
bench min-8g --profile min_vram --vram-gib 8 --steps 5 --warmup 2
bench offload --profile low_vram --checkpointing offload --steps 5 --warmup 2
