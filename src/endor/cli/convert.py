"""`endor convert SRC OUT`: prune and compress a HuggingFace model into an Endor checkpoint."""

import argparse

from ..checkpoint import WEIGHT_KINDS
from ..convert import convert, format_summary
from ..integrations.hub import resolve
from ..prune import METHODS, check_sparsity, parse_nm
from ..data.calib import load_calibration_text


def nm_argument(text: str):
    """argparse type for --nm: '2:4' -> (2, 4); anything else is a usage error."""
    try:
        return parse_nm(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sparsity_argument(text: str) -> float:
    """argparse type for --sparsity: the library's check (endor.prune), as a usage error."""
    try:
        value = float(text)
    except ValueError:
        value = text  # not a number: the check says what a sparsity must be
    try:
        return check_sparsity(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_parser(sub):
    p = sub.add_parser(
        "convert", help="prune and compress a HuggingFace model into an Endor checkpoint",
        description="Prune a HuggingFace model's decoder Linear weights and store them in the "
                    "Endor format, one decoder layer at a time (bounded memory), verified, "
                    "resumable: rerunning an interrupted command continues where it stopped.")
    p.add_argument("src", help="a HuggingFace model directory, a Hub id ORG/NAME (through "
                               "huggingface_hub: HF_HOME, HF_HUB_OFFLINE, HF_TOKEN), a .gguf "
                               "file, an alias (smollm2, gemma3-270m), or an Endor checkpoint "
                               "directory (read decompressed: '--weights dense' writes its dense "
                               "twin)")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hub id (default: main)")
    p.add_argument("out", help="the checkpoint directory to write")
    p.add_argument("--method", choices=METHODS, default="none",
                   help="pruning method; 'none' keeps the weights (and their zeros) as they are "
                        "(default: none)")
    p.add_argument("--sparsity", type=sparsity_argument, default=0.5,
                   help="fraction of each decoder Linear weight set to zero (default: 0.5)")
    p.add_argument("--nm", type=nm_argument, metavar="N:M",
                   help="N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity)")
    p.add_argument("--calib", metavar="TEXT_OR_DATASET",
                   help="calibration text (wanda, sparsegpt): a UTF-8 text file, a .json/.jsonl/"
                        ".csv/.parquet file, a dataset saved with datasets' save_to_disk, or a "
                        "Hub dataset id such as allenai/c4 or wikitext:wikitext-2-raw-v1 (needs "
                        "`pip install datasets`); default: Python's pydoc topics")
    p.add_argument("--calib-split", default="train", metavar="SPLIT",
                   help="split of a --calib dataset (default: train)")
    p.add_argument("--calib-column", default="text", metavar="COLUMN",
                   help="text column of a --calib dataset (default: text)")
    p.add_argument("--calib-samples", type=positive_int, default=None, metavar="N",
                   help="calibration segments (default: 64)")
    p.add_argument("--calib-seqlen", type=positive_int, default=None, metavar="L",
                   help="tokens per calibration segment (default: 256)")
    p.add_argument("--damping", type=float, default=None, metavar="F",
                   help="sparsegpt: fraction of the mean Hessian diagonal added to it (default "
                        "0.1, robust to calibration text unlike the served text; 0.01, the "
                        "paper's, fits better with calibration text like it)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where wanda and sparsegpt run each layer: cpu, cuda or cuda:N "
                        "(default: cuda when available, else cpu)")
    p.add_argument("--weights", choices=WEIGHT_KINDS, default="endor",
                   help="how the weights are stored: 'dense' writes the pruned weights "
                        "uncompressed, loadable by transformers' from_pretrained (default: endor)")
    # The option's former name, still accepted; not shown in --help.
    p.add_argument("--format", choices=WEIGHT_KINDS, dest="weights", help=argparse.SUPPRESS)
    p.add_argument("--values", choices=("exp", "raw", "int8", "int4"), default="exp",
                   help="value codec of the Endor tensors: 'exp' codes each value's exponent in "
                        "3 bits (lossless, about 6.5 bits per element at 50%% bf16), 'raw' keeps "
                        "every bit (format v1's values, 9.02 bits); 'int8' / 'int4' quantize the "
                        "kept weights in groups of input columns (lossy; jointly with --method "
                        "sparsegpt, round-to-nearest otherwise) (default: exp)")
    p.add_argument("--group-size", type=positive_int, default=None, metavar="G",
                   help="input columns per quantization scale for int8/int4 (default: 128)")
    p.add_argument("--keep-dense", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="leave decoder Linear weights whose name matches a glob pattern unpruned "
                        "and uncompressed, e.g. '*.mlp.down_proj.weight'")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading every shard back after writing it")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: the new checkpoint is written beside OUT and replaces "
                        "it whole once complete (every old file goes; a failure leaves the "
                        "old checkpoint as it was)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    calib_text = None
    if args.calib is not None:
        calib_text = load_calibration_text(args.calib, split=args.calib_split,
                                           column=args.calib_column)
    extra = {k: v for k, v in (("calib_samples", args.calib_samples),
                                ("calib_seqlen", args.calib_seqlen),
                                ("damping", args.damping)) if v is not None}
    src = resolve(args.src, revision=args.revision)  # a Hub id: its local snapshot
    summary = convert(src, args.out, method=args.method, sparsity=args.sparsity,
                      nm=args.nm, calib_text=calib_text, weights=args.weights,
                      dense_patterns=args.keep_dense, resume=not args.overwrite,
                      verify=args.verify, progress=not args.quiet, values=args.values,
                      device=args.device, group_size=args.group_size, **extra)
    run_info = summary["run"]
    target = None if args.method == "none" else (
        1 - args.nm[0] / args.nm[1] if args.nm else args.sparsity)
    print(format_summary(summary, target))
    rate = (f"{run_info['layers_per_s']:.3g} layers/s on {run_info['device']}"
            if args.method in ("wanda", "sparsegpt") else f"{run_info['gbps']:.3f} GB/s of source")
    print(f"wrote {run_info['out']} in {run_info['seconds']:.1f} s "
          f"({rate}; {run_info['shards_written']} shards written, "
          f"{run_info['shards_skipped']} already complete)")
    return 0
