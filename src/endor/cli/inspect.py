"""`endor inspect PATH`: list the tensors of an Endor file or checkpoint and their compression."""

import json

from ..inspect import describe


def add_parser(sub):
    p = sub.add_parser("inspect", help="list tensors, sparsity and sizes of a file or checkpoint")
    p.add_argument("path", help="an Endor/safetensors file or a converted checkpoint directory")
    p.add_argument("--verify", action="store_true",
                   help="decompress every tensor and check its checksum")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(run=run)


def run(args) -> int:
    rows = describe(args.path, verify=args.verify)
    if args.json:
        print(json.dumps(rows, indent=1))
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
    stored = sum(r["stored_bytes"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    print(f"{len(rows)} tensors, {stored / 1e6:.1f} MB stored, {dense / 1e6:.1f} MB dense "
          f"({dense / max(stored, 1):.2f}x){', verified' if args.verify else ''}")
    return 0


def codec_summary(rows) -> list[str]:
    """One line per value codec: bits per element over its Endor tensors."""
    lines = []
    for codec in sorted({r["values_codec"] for r in rows if r["values_codec"]}):
        mine = [r for r in rows if r["values_codec"] == codec]
        stored = sum(r["stored_bytes"] for r in mine)
        numel = sum(r["numel"] for r in mine)
        lines.append(f"values {codec}: {len(mine)} tensors, "
                     f"{8 * stored / max(numel, 1):.3f} bits per element")
    return lines
