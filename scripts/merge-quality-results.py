"""Merge `endor bench quality` result files (same windows, calibration and group size) into one:
rows unioned (later files win), vs_raw and bars recomputed. Usage: merge-quality-results.py OUTDIR A.json B.json..."""
import json, sys
from pathlib import Path
from endor.bench import quality, harness, plot
out, files = Path(sys.argv[1]), sys.argv[2:]
docs = [json.loads(Path(f).read_text()) for f in files]
base = docs[-1]
rows = []
for f in files:
    rows = quality.merged(quality.earlier_rows(f, base["params"]), rows)
rows = quality.with_vs_raw(rows)
doc = dict(base)
doc["results"] = rows
doc["bars"] = quality.bars(rows)
doc["command"] = [d.get("command") for d in docs]
doc["params"] = dict(base["params"], models=list(dict.fromkeys(r["model"] for r in rows)),
                     methods=sorted({r["method"] for r in rows if r["method"] != "dense"}),
                     values=sorted({r["values"] for r in rows if r["method"] != "dense"}))
doc["merged_from"] = [{"date": d["date"], "command": d.get("command"), "load_avg_at_end": d.get("load_avg_at_end")} for d in docs]
harness.write_json(doc, out / "quality.json")
plot.draw("quality", doc, out / "quality.png")
plot.print_table(doc)
for b in doc["bars"]:
    print(b)
