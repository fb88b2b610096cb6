"""`endor eval MODEL [--text FILE]`: perplexity of a model on a text (the shipped evaluation text
by default), with the protocol of endor.evaluate.perplexity."""

import json
from pathlib import Path

from ..data.text import evaluation_text
from ..evaluate import perplexity
from ..reference_loader import load_in_memory
from .args import at_least


def add_parser(sub):
    p = sub.add_parser("eval", help="perplexity of a model on a text",
                       description="Perplexity in non-overlapping windows; a BOS starts every "
                                   "window when the tokenizer adds one.")
    p.add_argument("model", help="an Endor checkpoint directory, an HF model directory, a .gguf "
                                 "file, or an alias: smollm2, gemma3-270m")
    p.add_argument("--text", metavar="FILE",
                   help="UTF-8 text file (default: the 1911 Britannica article on Shakespeare)")
    p.add_argument("--window", type=at_least(2), default=512,
                   help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=at_least(1), default=None, metavar="N",
                   help="score only the first N windows")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="BOS in front of every window (default: as the tokenizer does)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="compute dtype (default: as stored)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    text = Path(args.text).read_text(encoding="utf-8") if args.text else evaluation_text()
    model, tokenizer = load_in_memory(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} holds no tokenizer; perplexity needs one")
    add_bos = {"auto": None, "yes": True, "no": False}[args.bos]
    # Progress goes to stderr, so --json keeps stdout one JSON document and still shows it.
    result = perplexity(model, tokenizer, text, window=args.window, add_bos=add_bos,
                        max_windows=args.max_windows, progress=not args.quiet)
    result = {"model": str(args.model), "text": args.text or "evaluation_text", **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f}  (nll {result['nll']:.4f} over "
              f"{result['tokens']} tokens, {result['windows']} windows of {result['window']}, "
              f"bos {'yes' if result['add_bos'] else 'no'})")
    return 0
