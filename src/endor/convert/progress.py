"""What a running conversion shows: one bar over the shards (the rest shard, then each decoder
layer), its description the stage now running ("layer 3/30: calibrating", "pruning", "writing"),
its postfix the rate in layers per second. Only a conversion that streams weights without
calibration also shows GB/s of source: in a calibrated one the time goes to running the model on
the calibration tokens, and bytes per second would say nothing (the old bar fell to 0.8 MB/s)."""

from __future__ import annotations

import threading
import time

from tqdm.auto import tqdm


class ConversionProgress:
    def __init__(self, total: int, done: int, *, num_layers: int, calibrated: bool,
                 enabled: bool = True):
        self.num_layers, self.calibrated = num_layers, calibrated
        self.bar = tqdm(total=total, initial=done, unit="shard", desc="endor convert",
                        disable=not enabled, dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.layers_done, self.bytes_done = 0, 0
        self._lock = threading.Lock()  # shards are finished on the writer thread

    def stage(self, layer: int | None, what: str) -> None:
        """Show `what` is running ("calibrating", "pruning", "writing"...) on decoder layer
        `layer` (None: the embeddings and head)."""
        where = "embeddings + head" if layer is None else f"layer {layer + 1}/{self.num_layers}"
        with self._lock:
            self.bar.set_description_str(f"{where}: {what}", refresh=True)

    def shard_done(self, source_bytes: int, *, layer: bool) -> None:
        with self._lock:
            self.bytes_done += source_bytes
            self.layers_done += int(layer)
            seconds = max(time.perf_counter() - self.t0, 1e-9)
            parts = [f"{self.layers_done / seconds:.3g} layers/s"]
            if not self.calibrated:
                rate = self.bytes_done / seconds
                parts.append(f"{rate / 1e9:.2f} GB/s" if rate >= 1e8 else f"{rate / 1e6:.1f} MB/s")
            self.bar.set_postfix_str(", ".join(parts), refresh=False)
            self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
