"""Validation-only tuning: calibrate on the article from char CUT, score on chars [VAL, CUT)."""
import json, sys
import endor.bench.quality as q
import endor.prune.sparsegpt as sg
from endor.data.text import evaluation_text
CUT, VAL = 60_000, 34_000
t = evaluation_text()
cut = t.index("\n", CUT) + 1
val = t.index("\n", VAL) + 1
held, valtext = t[cut:], t[val:cut]
q.calibration_text = lambda: held
q.evaluation_text = lambda: valtext
q.article_split = lambda: (valtext, held)
q.CALIB_TEXTS['article'] = ('article', lambda: held)
models, patterns, values, rounding, damping, samples, out = sys.argv[1:8]
sg.sparsegpt_prune.__kwdefaults__["damping"] = float(damping)
import os
sg.WEIGHTED_SCALES = os.environ.get("WEIGHTED") == "1"
import endor.convert.pipeline as pl
pl.TRUE_SEQUENTIAL = os.environ.get("TRUESEQ") == "1"
print("weighted", sg.WEIGHTED_SCALES, file=sys.stderr)
doc = q.run(models=models.split(","), methods=["sparsegpt"], patterns=patterns.split(","), window=512,
            max_windows=64, calib_samples=int(samples), workdir="/work/scratch/calib/work", quick=False,
            warmup=0, repeat=1, values=values.split(","), group_size=128, rounding=rounding.split(","))
doc["text"] = {"calibration": f"article chars {cut}:", "evaluation": f"VALIDATION article chars {val}:{cut}"}
doc["damping_used"] = float(damping)
json.dump(doc, open(out, "w"), indent=1)
for r in doc["results"]:
    print("RESULT", "REFITS", sg.REFITS, "W" if sg.WEIGHTED_SCALES else "", "TS" if pl.TRUE_SEQUENTIAL else "", models, patterns, "damp", damping, "n", samples, r["method"], r["values"], r.get("rounding"), round(r["perplexity"], 3), r.get("vs_raw"), r["eval"]["tokens"])
