"""`endor export SRC DEST --format hf`: write an Endor checkpoint as a plain, dense HF checkpoint
(standard shard names and index, no Endor metadata) that transformers, vLLM and TGI load as is."""


def add_parser(sub):
    p = sub.add_parser("export", help="write a checkpoint as a plain HF checkpoint for serving "
                                      "engines (vLLM, TGI)", description=__doc__)
    p.add_argument("src", help="a converted checkpoint directory (endor convert)")
    p.add_argument("dest", help="the directory to write")
    p.add_argument("--format", choices=("hf",), default="hf",
                   help="hf: dense safetensors shards + index, config.json, tokenizer (default)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, e.g. 2GB (default 5GB; a decoder layer is never "
                        "split)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..integrations.export import export_hf

    done = export_hf(args.src, args.dest, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite)
    print(f"wrote {done['dest']}: {done['tensors']} tensors, {done['bytes'] / 1e6:.1f} MB dense "
          f"in {done['shards']} shard(s)")
    return 0
