"""Why SparseGPT loses to Wanda on the embedded SmolLM2 (issue 15): perplexity on the first
windows of the evaluation text (the 1911 Britannica article on Shakespeare) after 50% pruning,
varying one thing at a time: method, calibration text (pydoc topics, the default; the rest of the
Britannica article, held out from the scored windows; Hamlet), SparseGPT's damping, calibration
size. Small settings so that it runs in minutes on 2 shared cores; every figure in the JSON.

    python scripts/sparsegpt_quality.py OUT.json [--samples 8] [--seqlen 256] [--windows 4]
"""

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from endor import prune
from endor.convert import convert
from endor.data.models import resolve_model
from endor.data.text import britannica_path, calibration_text, evaluation_text
from endor.evaluate import perplexity
from endor.loading import load_in_memory
from endor.prune import sparsegpt


def texts(tokenizer, windows: int, window: int) -> dict:
    """Calibration texts; the Britannica one starts after the scored windows (held out)."""
    article = evaluation_text()
    ids = tokenizer(article, add_special_tokens=False)["input_ids"]
    held_out = tokenizer.decode(ids[windows * window + 64:])
    hamlet = (britannica_path().parents[1] / "texts" / "hamlet_gut.txt").read_text(
        encoding="utf-8", errors="replace")
    return {"pydoc": calibration_text(), "britannica-heldout": held_out, "hamlet": hamlet}


def score(path, windows: int, window: int) -> float:
    model, tokenizer = load_in_memory(str(path))
    return perplexity(model, tokenizer, evaluation_text(), window=window, max_windows=windows,
                      progress=False)["perplexity"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    args = ap.parse_args()
    src = resolve_model("smollm2")
    _, tokenizer = load_in_memory(str(src))
    calib = texts(tokenizer, args.windows, args.window)
    variants = [  # name, method, calibration text, samples, damping
        ("dense", None, None, 0, None),
        ("wanda/pydoc", "wanda", "pydoc", args.samples, None),
        ("sparsegpt/pydoc", "sparsegpt", "pydoc", args.samples, None),
        ("wanda/britannica-heldout", "wanda", "britannica-heldout", args.samples, None),
        ("sparsegpt/britannica-heldout", "sparsegpt", "britannica-heldout", args.samples, None),
        ("sparsegpt/pydoc/damping-0.1", "sparsegpt", "pydoc", args.samples, 0.1),
        ("sparsegpt/hamlet", "sparsegpt", "hamlet", args.samples, None),
        ("wanda/hamlet", "wanda", "hamlet", args.samples, None),
        ("sparsegpt/pydoc/4x-samples", "sparsegpt", "pydoc", 4 * args.samples, None),
    ]
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {r["variant"] for r in rows}
    work = Path(tempfile.mkdtemp(prefix="endor-sgpt-quality-"))
    real = prune.sparsegpt_prune
    try:
        for name, method, text, samples, damping in variants:
            if name in done or (only and name not in only):
                continue
            t0 = time.perf_counter()
            if method is None:
                ppl = score(src, args.windows, args.window)
            else:
                prune.sparsegpt_prune = (functools.partial(real, damping=damping) if damping
                                         else real)
                convert(src, work / "out", method=method, sparsity=0.5, calib_text=calib[text],
                        calib_samples=samples, calib_seqlen=args.seqlen, device="cpu",
                        progress=False, resume=False)
                ppl = score(work / "out", args.windows, args.window)
            rows.append({"variant": name, "method": method or "dense", "calibration": text,
                         "calib_tokens": samples * args.seqlen,
                         "damping": damping or (sparsegpt.DAMPING if method == "sparsegpt"
                                                else None),
                         "perplexity": round(ppl, 3),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
            out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")
    finally:
        prune.sparsegpt_prune = real
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
