"""The smallest `max_memory` load_model accepts for a checkpoint (what `endor inspect` prints).

Every decoder layer streams; below the non-layer weights, the runtime also reads embedding rows
on demand and streams the LM head through a buffer of an eighth of the budget at most
(runtime/rest.py), so what must stay is that buffer and the other non-layer tensors (the final
norm and such). The answer comes from the runtime's own pieces on a meta-device model: which
tensors offload_rest takes out, what load_rest then holds, and the head buffer rule."""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint import Checkpoint
from .rest import (digest_block_rows, head_block_bytes, head_chunk_bytes, head_chunk_rows,
                   offload_rest, rest_size, StreamedHead)
from .weights import find_layer_list, layer_files, load_rest, model_dtype


@dataclass(frozen=True)
class LeastBudget:
    bytes: int  # the smallest max_memory (> 0) load_model accepts
    rest_resident_bytes: int  # the non-layer weights in full: what stays at or above them
    head_buffer_bytes: int  # the streamed head's buffer at `bytes` (0: the head stays resident)
    offloaded: tuple[str, ...]  # non-layer tensors read on demand / streamed at `bytes`


def least_budget(path) -> LeastBudget:
    """Reads the rest shard once (the embeddings and head are checked as load_model checks
    them), builds nothing but the meta-device model."""
    from .model import _empty_model  # local: model.py imports this package's other modules

    ckpt = Checkpoint(path)
    files, rest_file = layer_files(ckpt)
    model = _empty_model(ckpt.path, model_dtype([rest_file, *files[:1]]))
    layer_path, _ = find_layer_list(model, files[0].keys() if files else [], len(files))
    full = rest_size(rest_file)
    skip, _ = offload_rest(model, rest_file, device="cpu", budget=max(full - 1, 1))
    kept = load_rest(model, rest_file, f"{layer_path}.", device="cpu", backend="auto",
                     skip=skip)
    head = model.get_output_embeddings()
    if not skip:  # nothing can leave: the non-layer weights stay whole
        return LeastBudget(full, full, 0, ())

    def head_buffer(budget: int) -> int:
        if not isinstance(head, StreamedHead):
            return 0
        source = head.source
        block = digest_block_rows(source.row_bytes, head_block_bytes(budget))
        return head_chunk_rows(source.shape[0], source.row_bytes, block,
                               head_chunk_bytes(budget)) * source.row_bytes

    # load_model needs budget >= kept + head_buffer(budget); the buffer grows with the budget
    # (an eighth of it, at least one row), so step up to the first budget that holds both.
    budget = kept + head_buffer(0)
    while budget < kept + head_buffer(budget):
        budget = kept + head_buffer(budget)
    if budget >= full:
        return LeastBudget(full, full, 0, ())
    return LeastBudget(budget, full, head_buffer(budget), tuple(sorted(skip)))
