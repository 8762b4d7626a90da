#!/usr/bin/env bash
# The whole GPU check (quantisation memory and speed, the fast path against transformers) in one
# call on a lent device. Prints the table last. Dry run on the CPU with a tiny random model:
#   CONFIG=tiny DEVICE=cpu bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CONFIG="${CONFIG:-real}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-16}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

python - "$DEVICE" > "$OUT/floor.json" <<'PY'
# Device-to-device copy bandwidth and the weight-read floor it implies for one denoising step.
import json, sys, time, torch
device = torch.device(sys.argv[1])
n = (2 << 30) if device.type == "cuda" else (64 << 20)
src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
for _ in range(3):
    dst.copy_(src)
if device.type == "cuda":
    torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(10):
    dst.copy_(src)
if device.type == "cuda":
    torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / 10
print(json.dumps({"copy_gbps": 2 * n / seconds / 1e9}))
PY

run() { python -m diffgen bench --random-config "$CONFIG" --device "$DEVICE" --steps "$STEPS" --prompt-tokens 64 \
          --canvases 2 --json "$@"; }
run --fast --compare-reference > "$OUT/fast_b1.json"
run --exact > "$OUT/exact_b1.json"
run --fast --batch 8 > "$OUT/fast_b8.json"
if [ "$DEVICE" != cpu ]; then run --fast --quant fp8 > "$OUT/fast_fp8_b1.json"; fi
python bench/gpu_quant.py --config "$CONFIG" --device "$DEVICE" --schemes nf4 fp8 bf16 > "$OUT/quant.txt" 2>&1 || true

python bench/gpu_table.py "$OUT"
