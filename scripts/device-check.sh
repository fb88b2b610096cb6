#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU (sized for an H200), build the CPU extension,
# run the GPU tests and the GPU benchmarks, and write everything as JSON (plus PNGs) into one
# folder. Under 5 minutes of GPU time. Needs no network: it uses the machine's own python3 with
# torch, triton, transformers, accelerate, safetensors, xxhash, psutil, tqdm and matplotlib.
#
#   scripts/device-check.sh [OUT_DIR]     (default: $OUT if set, else docs/benchmarks/gpu)
#
# Then commit OUT_DIR under docs/benchmarks/. Each step has its own time limit (they add up to
# 290 s) and a failing step does not stop the others; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-docs/benchmarks/gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORK=${ENDOR_DEVICE_WORK:-/tmp/endor-device-check}
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  if timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - t0))s"
  else
    echo "   FAILED (exit $?) in $((SECONDS - t0))s; last lines:"; tail -n 15 "$OUT_DIR/$name.log"
    failed+=("$name")
  fi
}

step build 45 "$PY" setup.py build_ext --inplace -q
step gpu-info 15 "$PY" -c "import json, torch; assert torch.cuda.is_available(), 'no CUDA device'; \
p = torch.cuda.get_device_properties(0); print(json.dumps({'gpu': p.name, 'torch': torch.__version__, \
'cuda': torch.version.cuda, 'memory_gb': p.total_memory / 1e9}))"
step gpu-tests 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  --junitxml="$OUT_DIR/gpu-tests.xml" tests/kernels/test_triton.py tests/runtime tests/bench/test_decompress.py \
  tests/format/codecs/test_exp.py tests/integrations/test_hf_quantizer.py
# Decompression vs HBM on the issue's headline tensor (4096 x 14336 bf16 at 50%) and more, raw and exp
# values (exp rows: ratio_vs_raw; target >= 60% of HBM for both).
step bench-decompress 55 "$PY" -m endor bench decompress --device cuda --shape 4096,14336 \
  --dtypes bf16,fp16 --sparsities 0.5,0.7 --numpy none --out "$OUT_DIR"
# The link: pinned vs pageable host-to-device, disk with and without the page cache.
# Two block sizes, 3 timed reads each: five read modes fit the step's limit on a slow disk too.
step bench-transfer 30 "$PY" -m endor bench transfer --size-mib 512 --blocks-mib 4,16 \
  --repeat 3 --out "$OUT_DIR"
# End to end on 7B-shaped layers (hidden 4096, MLP 11008, 32 heads; 4 layers so the synthetic
# checkpoints build in seconds): Endor vs dense through the same pipeline vs Accelerate, weights
# in CPU RAM, then on disk (the checkpoints are built once, by the first run). Per-layer time is
# what a 32-layer 7B model would show per layer; the ratios are the figures of merit.
for offload in cpu disk; do
  step "bench-e2e-$offload" 45 "$PY" -m endor bench e2e --device cuda --offload "$offload" \
    --hidden 4096 --intermediate 11008 --layers 4 --heads 32 --kv-heads 32 --vocab 32000 \
    --dtype float16 --new-tokens 8 --warmup 0 --repeat 2 --max-seconds 25 \
    --workdir "$WORK" --out "$OUT_DIR/e2e-$offload"
done

if ((${#failed[@]})); then
  echo "device check: failed steps: ${failed[*]} (logs in $OUT_DIR)"; exit 1
fi
echo "device check: all steps passed; results in $OUT_DIR"
