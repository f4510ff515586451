#!/usr/bin/env bash
# The GPU checks on a lent CUDA machine, in two calls that each end inside the 10-minute limit
# (15 minutes of device time in all, the machine's start included):
#   bash scripts/gpu_checks.sh tests    # the gpu-marked tests (~4 min at most)
#   bash scripts/gpu_checks.sh bench    # the benchmark table of issue F (~8.5 min at most)
# Results land in $OUT (or ./gpu-results): device.txt, pytest.log, benchmark-*.jsonl.
#
# The device image has torch, accelerate, peft, transformers and safetensors but not diffusers,
# bitsandbytes, datasets, pydantic or tomli-w: fetch their wheels here first with
# scripts/fetch_device_wheels.sh (about 51 MiB), and carry the .whl folder with each call.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-tests}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONPATH="$PWD"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git rev-parse HEAD 2>/dev/null; } \
    | tee "$out/device.txt"

bench() {  # seconds, name, then benchmark.py arguments
    local limit="$1" name="$2"; shift 2
    timeout "$limit" python3 scripts/benchmark.py --no-data "$@" > "$out/benchmark-$name.jsonl" 2> "$out/benchmark-$name.err"
    echo "rc=$? $name"; tail -n +2 "$out/benchmark-$name.jsonl"
}

case "$part" in
tests)  # CUDA-only paths: fp16 loss scaling, bf16, 8-bit optimizers, NF4/fp8, compile, offload, FSDP
    timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -15 ;;
bench)  # 1024², batch 1, rank 16; eager first (compiling SDXL takes minutes), then the compiled fast row
    bench 240 rows --profile all --no-compile --steps 10 --warmup 3 --trace
    bench 60 fast-b4 --profile fast --no-compile --batch-size 4 --steps 5 --warmup 2
    bench 45 low-12g --profile low_vram --vram-gib 12 --steps 5 --warmup 2
    bench 45 min-8g --profile min_vram --vram-gib 8 --steps 5 --warmup 2
    bench 45 offload --profile low_vram --checkpointing offload --steps 5 --warmup 2
    bench 90 fast-compiled --profile fast --steps 10 --warmup 3 ;;
*)  echo "usage: $0 tests|bench" >&2; exit 2 ;;
esac
