"""`endor generate MODEL --prompt TEXT`: greedy generation through the offloaded runtime, text
streamed as it is generated, then prefill time, decode tokens/s, bytes moved per token and the
time split of the stream."""

import json
import sys

import torch

from ..checkpoint import require_checkpoint
from ..reference_loader import load_tokenizer
from ..runtime import load_model
from .args import add_placement, at_least, non_empty


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text, streaming weights from disk or RAM",
                       description=__doc__)
    p.add_argument("model", help="a converted checkpoint directory (endor convert)")
    p.add_argument("--prompt", required=True, type=non_empty, help="the text to continue")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32, metavar="N",
                   help="tokens to generate (default 32)")
    add_placement(p)
    p.add_argument("--buffered-io", action="store_true",
                   help="read shards buffered and evict them right after, instead of O_DIRECT "
                        "(cold reads either way; faster on some virtual disks where "
                        "transparent huge pages are off)")
    p.add_argument("--prefetch", type=at_least(0), default=1, metavar="N",
                   help="layers loading ahead of the one computing, in dense layers' memory: "
                        "compressed shards read further ahead in it (default 1)")
    p.add_argument("--backend", default="auto", help="decompressor backend (default auto)")
    p.add_argument("--compute", choices=("auto", "fused", "dense"), default="auto",
                   help="fused: decoder weights stay compressed and decode steps compute from "
                        "them; dense: decompress every layer; auto: fused where the fused kernel "
                        "reads the layer's value codec, dense elsewhere (runtime/fused.py says "
                        "why) (default auto)")
    p.add_argument("--expert-cache", choices=("lfu", "lru"), default="lfu",
                   help="mixture-of-experts models: which experts the cache keeps, the most used "
                        "(lfu, default) or the most recent (lru)")
    p.add_argument("--whole-layers", action="store_true",
                   help="mixture-of-experts models: stream MoE layers whole instead of reading "
                        "only the experts the router picks")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object (tokens, text, speed, split) instead")
    p.set_defaults(run=run)


def _report(stats: dict) -> str:
    split = stats["split_s_per_token"]
    busy = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in split.items())
    streamed = len(stats["streamed_layers"])
    return (f"prefill {stats['prefill_s']:.3f} s ({stats['prefill_tokens']} tokens), decode "
            f"{stats['decode_tokens_per_s']:.2f} tokens/s ({stats['decode_tokens']} tokens)\n"
            f"moved {stats['bytes_moved_per_token'] / 1e6:.2f} MB/token "
            f"(read from disk {stats['bytes_read_per_token'] / 1e6:.2f} MB/token); "
            f"{streamed} of {stats['layers']} layers streamed, prefetch {stats['prefetch']}, "
            f"direct I/O {'yes' if stats['direct_io'] else 'no'}\n"
            f"busy ms/token (stages overlap): {busy}"
            + (f"\nexperts: {stats['expert_hits']} cache hits, {stats['expert_misses']} reads "
               f"(hit rate {stats['expert_hit_rate']:.2f}, {stats['expert_cache_policy']})"
               if "expert_hits" in stats else ""))


def run(args) -> int:
    tokenizer = load_tokenizer(require_checkpoint(args.model))
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} holds no tokenizer; copy the source model's "
                                "tokenizer files into it")
    prompt_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if prompt_ids.shape[1] == 0:
        raise ValueError(f"--prompt {args.prompt!r} gives no tokens; give some text")
    model = load_model(args.model, device=args.device, offload=args.offload,
                       max_memory=args.max_memory, prefetch=args.prefetch,
                       direct_io=not args.buffered_io, backend=args.backend,
                       compute=args.compute, expert_reads=not args.whole_layers,
                       expert_cache=args.expert_cache)
    try:
        ids = prompt_ids.to(model.device)
        streamer = None
        if not args.json:
            # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
            from transformers import TextStreamer

            print(args.prompt, end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 streamer=streamer, pad_token_id=pad)
        stats = model.endor_stats()
    finally:
        model.endor_close()
    tokens = out[0, ids.shape[1]:].tolist()
    if args.json:
        print(json.dumps({
            "model": str(args.model), "prompt": args.prompt, "tokens": tokens,
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "decode_tokens_per_s": stats["decode_tokens_per_s"],
            "prefill_s": stats["prefill_s"],
            "bytes_read_per_token": stats["bytes_read_per_token"],
            "bytes_moved_per_token": stats["bytes_moved_per_token"],
            "split_s_per_token": stats["split_s_per_token"],
            "stats": stats,
        }))
    else:
        print(_report(stats), file=sys.stderr)
    return 0
