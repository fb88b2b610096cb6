#!/usr/bin/env bash
# SmolLM2 pruned with SparseGPT and Wanda on the GPU and on the CPU (same calibration, 16 x 256
# tokens, so the CPU side fits a few minutes), then the perplexity of each on 8 windows of the
# evaluation text: the GPU/CPU perplexity ratio must stay within 2%; the conversion times give
# the GPU's speed-up. Writes gpu-cpu-pruning.json into OUT_DIR. Used by device-check.sh.
set -euo pipefail
OUT_DIR=${1:?usage: gpu_cpu_pruning.sh OUT_DIR [WORK]}
WORK=${2:-/tmp/endor-gpu-cpu}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
for method in wanda sparsegpt; do
  for device in cuda cpu; do
    "$PY" -m endor convert smollm2 "$WORK/$method-$device" --method "$method" --device "$device" \
      --calib-samples 16 --calib-seqlen 256 --overwrite --quiet | tail -n 1 \
      > "$WORK/$method-$device.convert.txt"
    "$PY" -m endor eval "$WORK/$method-$device" --max-windows 8 --json \
      > "$WORK/$method-$device.eval.json"
  done
done
"$PY" - "$WORK" "$OUT_DIR/gpu-cpu-pruning.json" <<'PYEOF'
import json, re, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
doc, ok = {"calibration": "16x256", "windows": 8, "rows": []}, True
for method in ("wanda", "sparsegpt"):
    row = {"method": method}
    for device in ("cuda", "cpu"):
        line = (work / f"{method}-{device}.convert.txt").read_text()
        row[f"{device}_convert_s"] = float(re.search(r"in ([0-9.]+) s", line).group(1))
        row[f"{device}_perplexity"] = json.loads((work / f"{method}-{device}.eval.json")
                                                 .read_text())["perplexity"]
    row["ppl_ratio_gpu_cpu"] = row["cuda_perplexity"] / row["cpu_perplexity"]
    row["speedup"] = row["cpu_convert_s"] / row["cuda_convert_s"]
    row["within_2pct"] = abs(row["ppl_ratio_gpu_cpu"] - 1) <= 0.02
    ok &= row["within_2pct"]
    doc["rows"].append(row)
out.write_text(json.dumps(doc, indent=1) + "\n")
print(json.dumps(doc, indent=1))
sys.exit(0 if ok else 1)
PYEOF
