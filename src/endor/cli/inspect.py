"""`endor inspect PATH`: list the tensors of an Endor file or checkpoint and their compression."""

import json

from ..inspect import budgets, describe, quantization_note


def add_parser(sub):
    p = sub.add_parser("inspect", help="list tensors, sparsity and sizes of a file or checkpoint")
    p.add_argument("path", help="an Endor/safetensors file or a converted checkpoint directory")
    p.add_argument("--verify", action="store_true",
                   help="decompress every tensor and check its checksum")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(run=run)


def run(args) -> int:
    rows = describe(args.path, verify=args.verify)
    note = quantization_note(args.path)
    if args.json:
        print(json.dumps(rows if note is None else {"tensors": rows, "quantization": note},
                         indent=1))
        return 0
    print(f"{'tensor':<60} {'shape':<16} {'dtype':<9} {'values':<6} {'sparsity':>8} "
          f"{'bytes':>12}")
    for r in rows:
        sparsity = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        kind = r["values_codec"] or "dense"
        print(f"{r['name']:<60} {str(r['shape']):<16} {r['dtype']:<9} "
              f"{kind:<6} {sparsity:>8} {r['stored_bytes']:>12}")
    for line in codec_summary(rows):
        print(line)
    if note is not None:
        error = "not recorded" if note["error"] is None else f"{note['error']:.4f}"
        print(f"quantized {note['values']} ({note['quantization']}), group size "
              f"{note['group_size']}: quantization error (relative RMS on the kept weights) "
              f"{error}")
    stored = sum(r["stored_bytes"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    print(f"{len(rows)} tensors, {stored / 1e6:.1f} MB stored, {dense / 1e6:.1f} MB dense "
          f"({dense / max(stored, 1):.2f}x){', verified' if args.verify else ''}")
    b = budgets(args.path)
    if b:
        from ..runtime.budget import least_budget  # local: builds the model (transformers)
        least = least_budget(args.path)
        how = (f"embedding rows read on demand, LM head streamed through a "
               f"{size(least.head_buffer_bytes)} buffer" if least.offloaded else
               "embeddings, norm, LM head resident")
        print(f"smallest --max-memory: {size(least.bytes)} ({how}; every decoder layer "
              f"streamed, plus read buffers of {size(b['largest_layer_shard_bytes'])} each); "
              f"with the non-layer weights resident: {size(b['rest_resident_bytes'])}; every "
              f"layer resident: {size(b['all_resident_fused_bytes'])} with fused compute, "
              f"{size(b['all_resident_dense_bytes'])} dense")
    return 0


def size(nbytes: int) -> str:
    """Bytes in the unit max_memory takes that keeps a few digits ("12.3 MB", "640 B")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def codec_summary(rows) -> list[str]:
    """One line per value codec: bits per element over its Endor tensors."""
    lines = []
    for codec in sorted({r["values_codec"] for r in rows if r["values_codec"]}):
        mine = [r for r in rows if r["values_codec"] == codec]
        stored = sum(r["stored_bytes"] for r in mine)
        numel = sum(r["numel"] for r in mine)
        sizes = sorted({r["group_size"] for r in mine if r.get("group_size")})
        groups = f", group size {'/'.join(map(str, sizes))}" if sizes else ""
        lines.append(f"values {codec}{groups}: {len(mine)} tensors, "
                     f"{8 * stored / max(numel, 1):.3f} bits per element")
    return lines
