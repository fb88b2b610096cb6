"""The prefetch pipeline: while decoder layer j computes, layers j+1..j+P load.

One load goes through these stages:

    read       [disk] the shard, whole, into the slot's aligned buffer: O_DIRECT requests queued
               on the reader's I/O threads as soon as the slot is free (reader.py), so the next
               shard's requests follow the current one's with no gap. [cpu offload] nothing:
               the shard's bytes are held in RAM.
    verify     [disk] the image's digest (one XXH3 per read span, reader.span_digests) against
               the one taken at load time, when every tensor's stored checksum (and an Endor
               tensor's tile index) was checked on the same bytes: equal digests mean the bytes
               checked then, at the cost of one hash pass per layer instead of one or more per
               tensor. The loader hashes each span as soon as it lands (reader.PendingRead),
               while the shard's later spans are still in flight;
               load_model(verify=False) skips it
    transfer   [cuda] the image to the device, on a dedicated CUDA stream
    decompress every Endor tensor into a dense slot (endor.decompress with out=: nothing is
               allocated per layer per token), its few dense tensors copied beside them; a
               layer without Endor tensors is used in place, views of its image

(read runs on the I/O threads, the rest on one loader thread) and the compute thread follows
FlexGen's loop, one layer at a time:

    acquire(j)  wait until load j is done, its views become layer j's weights
    compute(j)  the layer's forward
    release(j)  its buffers are free again: start loading the next layers into them

Buffers come in two pools: read slots (a shard image; prefetch+1 of them, more for compressed
shards read from disk: read_slot_count) and dense slots (a decompressed layer; DENSE_SLOTS). A
decompressed layer gives its read slot back at once, so with Endor weights the reads of the next layers go on
while a decompressed layer waits for its turn to compute; a dense layer's weights are views of its
image, which it keeps until it has computed.

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

from ..errors import FormatError
from ..format.tensor import EndorTensor
from ..kernels import decompress
from .images import part_view, planned_tensor
from .metrics import LoadTimes, Metrics
from .plan import LayerPlan
from .reader import PendingRead, ShardReader, aligned_buffer

_WORKER_POLL_S = 0.5
# Decompressed layers buffered (Endor weights). One: the next layer is decompressed when the
# current one has computed, so decompression and compute take turns on the CPU instead of contending for cores and
# memory bandwidth, while the reads of the layers after go on. Measured on the e2e model, 2
# cores, interleaved runs: 0.29 s/token with one dense slot, 0.48 with two (prefetch 3).
DENSE_SLOTS = 1
# On a GPU, decompress kernels (their own stream) run beside the compute stream's, so a second
# decompressed layer lets layer j+1 decompress while layer j computes.
DENSE_SLOTS_CUDA = 2


def read_slot_count(layers: list[LayerPlan], prefetch: int, dense_slot_bytes: int,
                    read_bytes: int) -> int:
    """Read slots for shards read from disk: prefetch+1, or more if they fit in the host memory
    (prefetch+1) dense layers would take, less the dense slots'. Prefetch counts layers, but the
    disk needs bytes in flight: compressed shards are smaller, so the same memory keeps more of
    them reading ahead. Measured on the e2e model (2 cores, O_DIRECT, 51 MB Endor shards of 90 MB
    layers), prefetch 3: 4 read slots 0.19-0.20 s/token (1.08-1.10x the ideal), 5 slots 0.17
    (0.95x) in less buffer memory than the dense pipeline (344 vs 361 MB)."""
    dense_layer = max(max(p.weight_bytes for p in layers), read_bytes)
    fits = ((prefetch + 1) * dense_layer - dense_slot_bytes) // max(read_bytes, 1)
    return min(len(layers), max(prefetch + 1, fits))


@dataclass(eq=False)
class ReadSlot:
    host: torch.Tensor | None  # aligned host read buffer (pinned on cuda); None with cpu offload
    device_image: torch.Tensor | None  # the shard copied to the GPU; None on cpu
    free_event: object = None  # cuda: the compute stream finished with device_image


@dataclass(eq=False)
class DenseSlot:
    buffer: torch.Tensor  # uint8, on the device
    free_event: object = None  # cuda: the compute stream finished with it


@dataclass(eq=False)
class Load:
    layer: LayerPlan
    read_slot: ReadSlot
    dense_slot: DenseSlot | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # dropped by a restart: the loader only lets its read finish
    error: BaseException | None = None
    pending: PendingRead | None = None  # the disk read in flight
    image: torch.Tensor | None = None  # the shard's bytes as the decompressor reads them
    views: dict | None = None  # relative tensor name -> dense tensor on the device
    times: LoadTimes = field(default_factory=LoadTimes)
    ready_event: object = None  # cuda: the decompress stream finished this layer


class LayerStream:
    """Streams `layers` (in execution order) cyclically; prefetch+1 read slots or more
    (read_slot_count)."""

    def __init__(self, layers: list[LayerPlan], *, device: torch.device, prefetch: int,
                 backend: str, reader: ShardReader | None, digests: dict[int, tuple[int, ...]],
                 held: dict[int, torch.Tensor] | None, metrics: Metrics,
                 decompress_threads: int | None = None, verify: bool = True):
        if not layers:
            raise ValueError("nothing to stream")
        self.layers = layers
        self.position = {plan.index: k for k, plan in enumerate(layers)}
        self.device = device
        self.backend = backend
        self.reader = reader
        self.digests = digests
        self.verify = verify  # False: reads are not checked against `digests` (load_model)
        self.held = held  # cpu offload: layer index -> shard image in host memory
        self.metrics = metrics
        self.decompress_threads = decompress_threads
        self.closed = False
        self._cuda = device.type == "cuda"
        n_read = min(prefetch + 1, len(layers))
        # Layers that keep their image hold both slots until they compute: pair them up.
        keeps_image = any(p.keeps_image for p in layers)
        n_dense = n_read if keeps_image else \
            min(DENSE_SLOTS_CUDA if self._cuda else DENSE_SLOTS, n_read)
        read_bytes = max(p.file_size for p in layers)
        dense_bytes = max(max(p.dense_buffer_bytes for p in layers), 1)
        if held is None and not keeps_image:
            n_read = read_slot_count(layers, prefetch, n_dense * dense_bytes, read_bytes)
        self.read_slots = [
            ReadSlot(None if held is not None else aligned_buffer(read_bytes, pin=self._cuda),
                     torch.empty(read_bytes, dtype=torch.uint8, device=device)
                     if self._cuda else None) for _ in range(n_read)]
        self.dense_slots = [DenseSlot(torch.empty(dense_bytes, dtype=torch.uint8, device=device))
                            for _ in range(n_dense)]
        self.host_buffer_bytes = sum(s.host.numel() for s in self.read_slots if s.host is not None)
        self.device_buffer_bytes = sum(s.buffer.numel() for s in self.dense_slots) + sum(
            s.device_image.numel() for s in self.read_slots if s.device_image is not None)
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)
            self._decompress_stream = torch.cuda.Stream(device)
        self._lock = threading.Condition()
        self._inflight: deque[Load] = deque()  # issued and not yet released, in order
        self._free_read: deque[ReadSlot] = deque()
        self._free_dense: deque[DenseSlot] = deque()
        self._current: Load | None = None
        self._next_pos = 0
        self._needs_restart = True
        self._stopping = False  # a restart or close is cancelling: issue nothing
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
        with self._lock:
            head = self._inflight[0] if self._inflight else None
        if self._needs_restart or head is None or head.layer.index != index or head.cancelled:
            self._restart(self.position[index])
            with self._lock:
                head = self._inflight[0]
        t0 = time.perf_counter()
        self._wait(head)
        stall = time.perf_counter() - t0
        if head.error is not None:
            self._needs_restart = True
            raise head.error
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(head.ready_event)
        self.metrics.add_load(head.times, stall)
        self._current = head
        return head.views

    def release(self, index: int) -> None:
        """Layer `index` finished computing: its buffers may be reused; load the next layers."""
        load = self._current
        if load is None or load.layer.index != index or self.closed:
            return  # acquire failed, or the schedule was reset: nothing to hand back
        self._current = None
        load.views = None
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            assert self._inflight[0] is load
            self._inflight.popleft()
            if load.read_slot is not None:  # the layer kept its image until now
                load.read_slot.free_event = event
                self._free_read.append(load.read_slot)
            load.dense_slot.free_event = event
            self._free_dense.append(load.dense_slot)
            self._pump()
            self._lock.notify_all()

    def _pump(self) -> None:
        """Issue loads while a read slot is free (lock held)."""
        while self._free_read and not self._stopping:
            load = Load(self.layers[self._next_pos], self._free_read.popleft())
            self._next_pos = (self._next_pos + 1) % len(self.layers)
            if self.held is None:
                load.pending = self.reader.start(load.layer.file, load.read_slot.host,
                                                 load.layer.file_size, digest=self.verify)
            self._inflight.append(load)
            self._queue.put(load)

    def _restart(self, pos: int) -> None:
        """Drop the schedule (after an error, an interrupted forward or at start) and begin
        again at streamed position `pos`."""
        self._needs_restart = True  # until done: a Ctrl-C in here leaves it to the next call
        self._cancel_all()
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        with self._lock:
            self._inflight.clear()
            self._current = None
            for slot in (*self.read_slots, *self.dense_slots):
                slot.free_event = None
            self._free_read = deque(self.read_slots)
            self._free_dense = deque(self.dense_slots)
            self._next_pos = pos
            self._stopping = False
            self._pump()
        self._needs_restart = False

    def _cancel_all(self) -> None:
        """Stop issuing, let every load in flight end (reads finish, nothing more is
        decompressed)."""
        with self._lock:
            self._stopping = True
            loads = list(self._inflight)
            for load in loads:
                load.cancelled = True
            self._lock.notify_all()
        for load in loads:
            self._wait(load)  # its error, if any, no longer matters

    def _wait(self, load: Load) -> None:
        while not load.done.wait(_WORKER_POLL_S):
            if not all(t.is_alive() for t in self._threads):
                load.error = RuntimeError("an Endor streaming thread died; load the model again")
                return

    def close(self) -> None:
        """Stop the loader, join it and free every buffer. Idempotent."""
        if self.closed:
            return
        self._cancel_all()
        self.closed = True
        self._queue.put(None)
        for t in self._threads:
            t.join()
        if self.reader is not None:
            self.reader.close()
        with self._lock:
            self._inflight.clear()
            self._free_read.clear()
            self._free_dense.clear()
        self._current = None
        self.read_slots, self.dense_slots = [], []
        self.held = None

    # ---- loader thread -------------------------------------------------------------------

    def _loader_loop(self) -> None:
        if self.decompress_threads:
            # Per thread: the CPU decompressor and torch ops here use this many, compute keeps
            # its own.
            torch.set_num_threads(self.decompress_threads)
        while True:
            load = self._queue.get()
            if load is None:
                return
            try:
                self._fetch(load)
                if self._take_dense_slot(load):
                    self._decompress(load)
                    if not load.layer.keeps_image:
                        with self._lock:  # its image is no longer needed: read the next shard
                            self._free_read.append(load.read_slot)
                            load.read_slot = None
                            self._pump()
            except BaseException as e:  # noqa: BLE001 - handed to the compute thread
                load.error = e
            finally:
                load.done.set()

    def _take_dense_slot(self, load: Load) -> bool:
        with self._lock:
            while not self._free_dense and not load.cancelled:
                self._lock.wait()
            if load.cancelled:
                return False
            load.dense_slot = self._free_dense.popleft()
            return True

    def _fetch(self, load: Load) -> None:
        plan, slot, times = load.layer, load.read_slot, load.times
        if load.pending is None:
            image = self.held[plan.index]
        else:
            load.pending.result()  # also when cancelled: the request must end before reuse
            if load.cancelled:
                return
            t1 = time.perf_counter()
            if self.verify:  # hashed span by span as the read went (reader.PendingRead)
                if load.pending.digest != self.digests[plan.index]:
                    raise FormatError("checksum mismatch: the shard changed on disk or is "
                                      "corrupt since the model was loaded", path=plan.file)
                times.verify_s = load.pending.digest_s
            # The disk's busy time for this shard: two reads overlap, count the overlap once.
            started = max(load.pending.started or t1, self._last_read_end)
            times.read_s = max(0.0, (load.pending.finished or t1) - started)
            self._last_read_end = max(self._last_read_end, load.pending.finished or t1)
            times.bytes_read = plan.file_size
            image = slot.host
        times.bytes_moved = plan.file_size
        if self._cuda and not load.cancelled:
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

    def _decompress(self, load: Load) -> None:
        t0 = time.perf_counter()
        dense = load.dense_slot
        if self._cuda:
            with torch.cuda.stream(self._decompress_stream):
                if dense.free_event is not None:
                    self._decompress_stream.wait_event(dense.free_event)
                load.views = decompress_layer(load.layer, load.image, dense.buffer, self.backend)
                load.ready_event = torch.cuda.Event()
                load.ready_event.record(self._decompress_stream)
            load.ready_event.synchronize()  # for the timing; it also frees the image below
        else:
            load.views = decompress_layer(load.layer, load.image, dense.buffer, self.backend)
        load.times.decompress_s = time.perf_counter() - t0
        load.image = None


def decompress_layer(plan: LayerPlan, image: torch.Tensor, dense: torch.Tensor,
                 backend: str) -> dict:
    """Every tensor of one layer, dense, from its shard image: Endor tensors decompressed into
    `dense`, dense tensors used in place (or cast into `dense` when their dtype differs)."""
    views = {}
    for tp in plan.tensors:
        parts = [part_view(image, dense, p) for p in tp.parts]
        out = None
        if tp.out is not None:
            out = dense[tp.out:tp.out + tp.nbytes].view(tp.dtype)
        if tp.compressed:
            et = planned_tensor(tp, parts)
            if out is None:  # kept compressed: computed from the image (runtime/fused.py)
                views[tp.name] = et
                continue
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
