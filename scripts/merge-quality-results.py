"""Merge `endor bench quality` result files (same windows, calibration and group size) into one:
rows unioned (later files win), vs_raw and bars recomputed.
Usage: merge-quality-results.py OUTDIR A.json[@DAMPING] B.json[@DAMPING]...
@DAMPING records SparseGPT's dampening in that file's sparsegpt rows that lack it (files written
before rows carried "damping"), except rows repeated from an earlier file (a run with --merge). Raw-valued and quantized SparseGPT rows of one model and pattern
measured with different dampenings are not compared: a quantized row whose raw twin has another
dampening is dropped, with a line on stderr."""
import json, sys
from pathlib import Path
from endor.bench import quality, harness, plot
out, specs = Path(sys.argv[1]), sys.argv[2:]
files, dampings = [], []
for spec in specs:
    path, _, damping = spec.partition("@")
    files.append(path)
    dampings.append(float(damping) if damping else None)
docs = [json.loads(Path(f).read_text()) for f in files]
base = docs[-1]


def measured(row) -> str:
    """A row's measurements, without vs_raw (recomputed whenever rows are merged)."""
    return json.dumps({k: v for k, v in row.items() if k != "vs_raw"}, sort_keys=True)


rows, seen = [], set()
for f, damping in zip(files, dampings):
    mine = quality.earlier_rows(f, base["params"])
    # a file written with --merge repeats earlier files' rows: those keep their annotation
    fresh = [r for r in mine if measured(r) not in seen]
    seen |= {measured(r) for r in mine}
    for r in fresh:
        if r["method"] == "sparsegpt" and r.get("damping") is None and damping is not None:
            r["damping"] = damping
    rows = quality.merged(fresh, rows)
raw_damping = {quality._key(r)[:3]: r.get("damping") for r in rows
               if (r.get("values") or "raw") == "raw"}
kept = []
for r in rows:
    if r["method"] == "sparsegpt" and r.get("damping") != raw_damping.get(quality._key(r)[:3]):
        print(f"dropped {quality._key(r)}: damping {r.get('damping')}, its raw twin's "
              f"{raw_damping.get(quality._key(r)[:3])}", file=sys.stderr)
        continue
    kept.append(r)
rows = quality.with_vs_raw(kept)
doc = dict(base)
doc["results"] = rows
doc["table_columns"] = quality.TABLE_COLUMNS
doc["bars"] = quality.bars(rows)
doc["command"] = [d.get("command") for d in docs]
doc["params"] = dict(base["params"], models=list(dict.fromkeys(r["model"] for r in rows)),
                     methods=sorted({r["method"] for r in rows if r["method"] != "dense"}),
                     values=sorted({r["values"] for r in rows if r["method"] != "dense"}))
doc["merged_from"] = [{"date": d["date"], "command": d.get("command"),
                       "load_avg_at_end": d.get("load_avg_at_end"), "sparsegpt_damping": damp}
                      for d, damp in zip(docs, dampings)]
harness.write_json(doc, out / "quality.json")
plot.draw("quality", doc, out / "quality.png")
plot.print_table(doc)
for b in doc["bars"]:
    print(b)
