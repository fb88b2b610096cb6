"""The prefetch pipeline: while decoder layer j computes, layers j+1..j+P load.

One load goes through these stages:

    read       [disk] the shard, whole, into the slot's aligned buffer: O_DIRECT requests queued
               on the reader's I/O threads as soon as the slot is free (reader.py), so the next
               shard's requests follow the current one's with no gap. [cpu offload] nothing:
               the shard's bytes are held in RAM.
    verify     [disk] XXH3 of the image against the digest taken at load time
    transfer   [cuda] the image to the device, on a dedicated CUDA stream
    decompress every Endor tensor into the slot's dense buffer (endor.decompress with out=:
               nothing is allocated per layer per token); dense tensors are views of the image

(read runs on the I/O threads, the rest on one loader thread) and the compute thread follows
FlexGen's loop, one layer at a time:

    acquire(j)  wait until load j is done, its views become layer j's weights
    compute(j)  the layer's forward
    release(j)  the slot is free again: start loading the layer P+1 positions ahead

The schedule is cyclic: after the last streamed layer come the first ones of the next forward,
so they load while the resident layers, the LM head and sampling run. A worker error (I/O
error, checksum mismatch, corrupt bitmap) is stored on its load and raised in the compute
thread by `acquire`; the next forward restarts the schedule, re-reading from disk."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import xxhash

from ..errors import FormatError
from ..format.tensor import EndorTensor
from ..kernels import decompress
from .metrics import LoadTimes, Metrics
from .plan import LayerPlan, Part
from .reader import PendingRead, ShardReader, aligned_buffer

_WORKER_POLL_S = 0.5


def image_digest(image: torch.Tensor, nbytes: int) -> int:
    """XXH3-64 of a whole shard image: one pass, far faster than the disk (GIL released)."""
    return xxhash.xxh3_64_intdigest(memoryview(image.numpy())[:nbytes])


@dataclass(eq=False)
class Slot:
    host: torch.Tensor | None  # aligned host read buffer (pinned on cuda); None with cpu offload
    device_image: torch.Tensor | None  # the shard copied to the GPU; None on cpu
    dense: torch.Tensor  # uint8 dense buffer on the device
    free_event: object = None  # cuda: the compute stream finished with this slot


@dataclass(eq=False)
class Load:
    layer: LayerPlan
    slot: Slot
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    pending: PendingRead | None = None  # the disk read in flight
    image: torch.Tensor | None = None  # the shard's bytes as the decoder reads them
    views: dict | None = None  # relative tensor name -> dense tensor on the device
    times: LoadTimes = field(default_factory=LoadTimes)
    ready_event: object = None  # cuda: the decode stream finished this layer


class LayerStream:
    """Streams `layers` (in execution order) cyclically through prefetch+1 slots."""

    def __init__(self, layers: list[LayerPlan], *, device: torch.device, prefetch: int,
                 backend: str, reader: ShardReader | None, digests: dict[int, int],
                 held: dict[int, torch.Tensor] | None, metrics: Metrics,
                 decode_threads: int | None = None):
        if not layers:
            raise ValueError("nothing to stream")
        self.layers = layers
        self.position = {plan.index: k for k, plan in enumerate(layers)}
        self.device = device
        self.backend = backend
        self.reader = reader
        self.digests = digests
        self.held = held  # cpu offload: layer index -> shard image in host memory
        self.metrics = metrics
        self.decode_threads = decode_threads
        self.closed = False
        self._cuda = device.type == "cuda"
        nslots = min(prefetch + 1, len(layers))
        read_bytes = max(p.file_size for p in layers)
        dense_bytes = max(p.dense_buffer_bytes for p in layers)
        self.slots = []
        for _ in range(nslots):
            host = None if held is not None else aligned_buffer(read_bytes, pin=self._cuda)
            dev_image = (torch.empty(read_bytes, dtype=torch.uint8, device=device)
                         if self._cuda else None)
            dense = torch.empty(max(dense_bytes, 1), dtype=torch.uint8, device=device)
            self.slots.append(Slot(host, dev_image, dense))
        self.host_buffer_bytes = sum(s.host.numel() for s in self.slots if s.host is not None)
        self.device_buffer_bytes = sum(
            s.dense.numel() + (s.device_image.numel() if self._cuda else 0) for s in self.slots)
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)
            self._decode_stream = torch.cuda.Stream(device)
        self._inflight: deque[Load] = deque()
        self._current: Load | None = None
        self._next_pos = 0
        self._next_slot = 0
        self._needs_restart = True
        self._last_read_end = 0.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loader_loop, name="endor-loader",
                                          daemon=True)]
        for t in self._threads:
            t.start()
        self._restart(0)

    # ---- compute thread ------------------------------------------------------------------

    def acquire(self, index: int) -> dict:
        """Block until layer `index` is loaded; return its dense tensors (name -> tensor)."""
        if self.closed:
            raise RuntimeError("this Endor model was closed (endor_close); load it again")
        pos = self.position[index]
        if self._needs_restart or not self._inflight or self._inflight[0].layer.index != index:
            self._restart(pos)
        load = self._inflight[0]
        t0 = time.perf_counter()
        self._wait(load)
        stall = time.perf_counter() - t0
        if load.error is not None:
            self._needs_restart = True
            raise load.error
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(load.ready_event)
        self.metrics.add_load(load.times, stall)
        self._current = load
        return load.views

    def release(self, index: int) -> None:
        """Layer `index` finished computing: its slot may be overwritten; load the next layer."""
        load = self._current
        if load is None or load.layer.index != index or self.closed:
            return  # acquire failed, or the schedule was reset: nothing to hand back
        self._current = None
        self._inflight.popleft()
        load.views = None
        if self._cuda:
            load.slot.free_event = torch.cuda.Event()
            load.slot.free_event.record(torch.cuda.current_stream(self.device))
        self._issue()

    def _issue(self) -> None:
        slot = self.slots[self._next_slot]
        load = Load(self.layers[self._next_pos], slot)
        self._next_slot = (self._next_slot + 1) % len(self.slots)
        self._next_pos = (self._next_pos + 1) % len(self.layers)
        if self.held is None:
            load.pending = self.reader.start(load.layer.file, slot.host, load.layer.file_size)
        self._inflight.append(load)
        self._queue.put(load)

    def _restart(self, pos: int) -> None:
        """Drop the schedule (after an error, an interrupted forward or at start) and begin
        again at streamed position `pos`."""
        self._drain()
        self._current = None
        self._next_pos = pos
        self._next_slot = 0
        for _ in self.slots:
            self._issue()
        self._needs_restart = False

    def _drain(self) -> None:
        while self._inflight:
            load = self._inflight.popleft()
            self._wait(load)  # its error, if any, no longer matters
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _wait(self, load: Load) -> None:
        while not load.done.wait(_WORKER_POLL_S):
            if not all(t.is_alive() for t in self._threads):
                load.error = RuntimeError("an Endor streaming thread died; load the model again")
                return

    def close(self) -> None:
        """Stop the workers, join them and free every buffer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._queue.put(None)
        for t in self._threads:
            t.join()
        if self.reader is not None:
            self.reader.close()
        for load in self._inflight:
            load.views = None
        self._inflight.clear()
        self._current = None
        self.slots = []
        self.held = None

    # ---- worker threads ------------------------------------------------------------------

    def _loader_loop(self) -> None:
        if self.decode_threads:
            # Per thread: the CPU decoder and torch ops here use this many, compute keeps its own.
            torch.set_num_threads(self.decode_threads)
        while True:
            load = self._queue.get()
            if load is None:
                return
            try:
                if self.closed:
                    if load.pending is not None:
                        load.pending.result()  # let its requests finish and its file close
                    raise RuntimeError("the stream was closed")
                self._fetch(load)
                self._decode(load)
            except BaseException as e:  # noqa: BLE001 - handed to the compute thread
                load.error = e
            finally:
                load.done.set()

    def _fetch(self, load: Load) -> None:
        plan, slot, times = load.layer, load.slot, load.times
        if load.pending is None:
            image = self.held[plan.index]
        else:
            load.pending.result()
            t1 = time.perf_counter()
            if image_digest(slot.host, plan.file_size) != self.digests[plan.index]:
                raise FormatError("checksum mismatch: the shard changed on disk or is corrupt "
                                  "since the model was loaded", path=plan.file)
            # The disk's busy time for this shard: two reads overlap, count the overlap once.
            started = max(load.pending.started or t1, self._last_read_end)
            times.read_s = max(0.0, (load.pending.finished or t1) - started)
            times.verify_s = time.perf_counter() - t1
            self._last_read_end = max(self._last_read_end, load.pending.finished or t1)
            times.bytes_read = plan.file_size
            image = slot.host
        times.bytes_moved = plan.file_size
        if self._cuda:
            t0 = time.perf_counter()
            with torch.cuda.stream(self._copy_stream):
                if slot.free_event is not None:
                    self._copy_stream.wait_event(slot.free_event)
                slot.device_image[:plan.file_size].copy_(image[:plan.file_size],
                                                         non_blocking=True)
            # The host buffer is reused by the next read: the copy must be complete.
            self._copy_stream.synchronize()
            times.transfer_s = time.perf_counter() - t0
            image = slot.device_image
        load.image = image

    def _decode(self, load: Load) -> None:
        t0 = time.perf_counter()
        if self._cuda:
            with torch.cuda.stream(self._decode_stream):
                if load.slot.free_event is not None:
                    self._decode_stream.wait_event(load.slot.free_event)
                load.views = decode_layer(load.layer, load.image, load.slot.dense, self.backend)
                load.ready_event = torch.cuda.Event()
                load.ready_event.record(self._decode_stream)
            load.ready_event.synchronize()
        else:
            load.views = decode_layer(load.layer, load.image, load.slot.dense, self.backend)
        load.times.decompress_s = time.perf_counter() - t0
        load.image = None


def _part(image: torch.Tensor, dense: torch.Tensor, part: Part) -> torch.Tensor:
    raw = image[part.start:part.end]
    if part.staging is not None:  # not aligned for a typed view: copy to an aligned spot first
        staged = dense[part.staging:part.staging + raw.numel()]
        staged.copy_(raw)
        raw = staged
    return raw.view(part.dtype)


def decode_layer(plan: LayerPlan, image: torch.Tensor, dense: torch.Tensor,
                 backend: str) -> dict:
    """Every tensor of one layer, dense, from its shard image: Endor tensors decoded into
    `dense`, dense tensors used in place (or cast into `dense` when their dtype differs)."""
    views = {}
    for tp in plan.tensors:
        parts = [_part(image, dense, p) for p in tp.parts]
        out = None
        if tp.out is not None:
            out = dense[tp.out:tp.out + tp.nbytes].view(tp.dtype)
        if tp.compressed:
            bitmap, values, tiles = parts
            et = EndorTensor(tp.shape, values.dtype, bitmap, values, tiles, tp.checksum)
            try:
                decompress(et, out=out, backend=backend)
            except FormatError as e:
                raise e.at(path=plan.file, tensor=tp.name) from None
            views[tp.name] = out.view(tp.shape)
        elif out is None:
            views[tp.name] = parts[0].view(tp.shape)
        else:
            out.copy_(parts[0])
            views[tp.name] = out.view(tp.shape)
    return views
