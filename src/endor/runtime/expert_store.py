"""The chosen experts' dense weights, one layer at a time, decoded beside the compute.

RoutedExperts (experts.py) asks for the experts a layer's router chose and computes them in
increasing order. Per layer call (a job):

    lookups   every chosen expert at once, in the compute thread: cache hits (compressed images
              in RAM) or held images (cpu offload); the misses' reads are issued at once
              (READ_THREADS O_DIRECT reads in flight, each into its own aligned buffer)
    decode    expert after expert, in order: a miss waits for its read, is verified (XXH3 of
              its bytes against the digest taken at load) and offered to the cache, and its read
              buffer starts the next miss's read; then it is decompressed into a free slot
              (DECODE_SLOTS slots of gate_up [2I, H] + down [H, I])
    compute   the compute thread takes slot k once expert k is decoded, computes, hands it back

Decoding is shared: a decode thread claims the next expert whose slot is free, so expert k+1 is
decompressed while expert k computes; the compute thread, reaching an expert nobody has claimed
yet, decodes it itself rather than wait for the decode thread to be scheduled. On an idle core
the decompression hides behind the compute; on a loaded machine (the decode thread waiting for a
CPU) the work falls back to the compute thread, as if done serially, without hand-off waits.

A layer call that ends early (an error, Ctrl-C) cancels its job and waits until no thread
decodes into its slots and its reads have ended; a decode error (corrupt bytes, I/O error) is
raised in the compute thread, typed."""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from ..errors import FormatError
from ..format.io import check_compressed, endor_tensor
from .expert_cache import ExpertCache
from .experts import (Decoders, Expert, ExpertLayer, _typed, decompress_tensors,
                      expert_tensors)
from .reader import ALIGN, aligned_buffer, round_up

READ_THREADS = 8  # expert reads in flight: top-k of a layer at once (threads wait in the kernel)
# Dense expert buffers: with two, expert k+1 decompresses while k computes; more would only let
# the decode thread run further ahead of a compute that is the slower of the two.
DECODE_SLOTS = 2
_POLL_S = 0.5


class _Job:
    """One layer call. Experts are claimed in order; expert k goes to slot k % DECODE_SLOTS, so
    it may be claimed once expert k - DECODE_SLOTS is handed back (claimed - returned < slots)."""

    def __init__(self, layer: ExpertLayer, chosen: list[int], entries: dict, misses: list):
        self.layer, self.chosen = layer, chosen
        self.entries = entries  # expert -> (compressed image, its tensors): hits, held
        self.misses = misses  # experts read from disk, in order
        self.reads: dict = {}  # expert -> future of its read
        self.claimed = 0  # experts some thread has started decoding
        self.returned = 0  # experts the compute thread is done with
        self.active = 0  # threads decoding now
        self.done = [False] * len(chosen)
        self.info: list = [None] * len(chosen)  # (bytes read, read wait s, decompress s)
        self.error: BaseException | None = None
        self.cancelled = False
        self.cond = threading.Condition()


class ExpertStore:
    """Dense weights of chosen experts, from the cache, RAM (cpu offload) or disk."""

    def __init__(self, layers: list[ExpertLayer], *, held: bool, cache_bytes: int,
                 policy: str, backend: str, direct: bool, metrics, device=None,
                 decode_threads: int | None = None, verify: bool = True):
        self.layers = {x.index: x for x in layers}
        self.verify = verify  # False (load_model(verify=False)): expert reads are not checked
        self.backend, self.metrics = backend, metrics
        self.device = torch.device(device or "cpu")
        self._decoders = Decoders(backend, self.device)
        self.decode_threads = decode_threads
        self.cache = ExpertCache(0 if held else cache_bytes, policy)
        self.hits = self.misses = self.bytes_read = 0
        self.digests: dict = {}
        self.held: dict | None = {} if held else None
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict = {}
        self._pool = None
        self._lock = threading.Lock()
        span = max(x.nbytes for layer in layers for x in layer.experts)
        self._span = round_up(span) + ALIGN
        self._buffers = [aligned_buffer(self._span) for _ in range(READ_THREADS)]
        biggest = max(layers, key=lambda x: x.intermediate * x.hidden)
        # Compressed bytes stay in host memory; a GPU gets them right before decompressing there.
        n = biggest.intermediate * biggest.hidden
        self._slots = [(torch.empty(2 * n, dtype=biggest.dtype, device=self.device),
                        torch.empty(n, dtype=biggest.dtype, device=self.device))
                       for _ in range(DECODE_SLOTS)]
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last: _Job | None = None
        self.closed = False
        self._check_all()

    # ---- load time ------------------------------------------------------------------------
    def _check_all(self) -> None:
        """Read every expert once: rules 5 and 7 of each Endor tensor, and the digest each later
        read must match (cpu offload: keep the bytes)."""
        if not self.verify and self.held is None:
            return
        for layer in self.layers.values():
            for e, expert in enumerate(layer.experts):
                if not self.verify:
                    self.held[(layer.index, e)] = self._entry(
                        expert, self._read(layer, expert, self._buffers[0]).clone())
                    continue
                image = self._read(layer, expert, self._buffers[0])
                for t in expert.tensors:
                    if t.compressed:
                        parts = [_typed(image, s, x, d) for s, x, d in t.parts]
                        check_compressed(endor_tensor(t.entry, dict(zip(t.suffixes, parts)),
                                                      t.version), path=layer.file,
                                         name=f"layer {layer.index} expert {e}")
                self.digests[(layer.index, e)] = xxhash.xxh3_64_intdigest(
                    memoryview(image.numpy()))
                if self.held is not None:
                    self.held[(layer.index, e)] = self._entry(expert, image.clone())
        self.bytes_read = 0

    def _entry(self, expert: Expert, image: torch.Tensor) -> tuple:
        """What the cache and held experts keep: the image and, on the cpu, its tensors."""
        return image, expert_tensors(expert, image) if self.device.type == "cpu" else None

    # ---- reads ----------------------------------------------------------------------------
    def _fd(self, path: str) -> tuple[int, bool]:
        with self._lock:
            if path not in self._fds:
                fd, direct = None, False
                if self._direct:
                    try:
                        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
                    except OSError:
                        pass
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                self._fds[path] = (fd, direct)
            return self._fds[path]

    def _read(self, layer: ExpertLayer, expert: Expert, buf: torch.Tensor) -> torch.Tensor:
        """Expert bytes from disk into `buf` (aligned), returned as a view of exactly them."""
        fd, direct = self._fd(layer.file)
        lo = expert.start - expert.start % ALIGN
        hi = round_up(expert.end)
        view = memoryview(buf.numpy())
        pos = lo
        while pos < expert.end:
            try:
                got = os.preadv(fd, [view[pos - lo:hi - lo]], pos)
            except OSError as e:
                raise FormatError(f"cannot read expert bytes: {e.strerror or e}",
                                  path=layer.file) from None
            if got <= 0:
                raise FormatError("the file ended inside an expert (truncated since it was "
                                  "opened)", path=layer.file)
            pos += got
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)  # stay cold
        with self._lock:
            self.bytes_read += expert.nbytes
        return buf[expert.start - lo:expert.end - lo]

    # ---- compute thread -------------------------------------------------------------------
    def weights(self, index: int, chosen: list[int]):
        """Yield (expert, gate_up [2I, H], down [H, I]) for `chosen` (increasing) of decoder
        layer `index`; the buffers are reused once the caller asks for the next expert."""
        if self.closed:
            raise RuntimeError("this Endor model was closed (endor_close); load it again")
        if self._last is not None:  # a layer call abandoned mid-way (an error): end it first
            self._cancel(self._last)
        layer = self.layers[index]
        job = self._last = self._start(layer, chosen)
        inter, hidden = layer.intermediate, layer.hidden
        try:
            for k, e in enumerate(chosen):
                t0 = time.perf_counter()
                with job.cond:
                    mine = job.claimed == k and job.error is None
                    if mine:
                        job.claimed, job.active = k + 1, job.active + 1
                if mine:
                    self._decode(job, k)
                with job.cond:
                    while not job.done[k] and job.error is None:
                        if not job.cond.wait(_POLL_S) and not self._thread.is_alive():
                            raise RuntimeError("the Endor expert decode thread died; load the "
                                               "model again")
                    if job.error is not None:
                        raise job.error
                read, read_wait, decompress_s = job.info[k]
                stall = read_wait if mine else time.perf_counter() - t0
                if self.metrics is not None:
                    self.metrics.add_expert(read, layer.experts[e].nbytes, stall, decompress_s)
                gate_up, down = self._slots[k % DECODE_SLOTS]
                yield (e, gate_up[:2 * inter * hidden].view(2 * inter, hidden),
                       down[:inter * hidden].view(hidden, inter))
                with job.cond:
                    job.returned = k + 1
                    job.cond.notify_all()
        finally:
            with job.cond:
                complete = job.returned == len(chosen)
            if not complete:
                self._cancel(job)
            self._last = None

    def _start(self, layer: ExpertLayer, chosen: list[int]) -> _Job:
        """Look every chosen expert up, issue the misses' reads, hand the job to the decode
        thread."""
        entries, misses = {}, []
        for e in chosen:
            key = (layer.index, e)
            with self._lock:
                entry = self.held[key] if self.held is not None else self.cache.get(key)
            if entry is not None:
                entries[e] = entry
                self.hits += self.held is None
            else:
                misses.append(e)
        self.misses += len(misses)
        job = _Job(layer, chosen, entries, misses)
        if misses and self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="endor-experts")
        for slot, e in enumerate(misses[:len(self._buffers)]):
            job.reads[e] = self._pool.submit(self._read, layer, layer.experts[e],
                                             self._buffers[slot])
        if self._thread is None:
            self._thread = threading.Thread(target=self._decode_loop, name="endor-expert-decode",
                                            daemon=True)
            self._thread.start()
        self._jobs.put(job)
        return job

    def _cancel(self, job: _Job) -> None:
        """Stop `job`: wait until no thread decodes into its slots and its reads have ended."""
        with job.cond:
            job.cancelled = True
            job.cond.notify_all()
            while job.active:
                if not job.cond.wait(_POLL_S) and not self._thread.is_alive():
                    break
            reads = list(job.reads.values())
        for future in reads:  # every read ends before its buffer is used again
            future.exception()

    # ---- decode thread --------------------------------------------------------------------
    def _decode_loop(self) -> None:
        if self.decode_threads:
            torch.set_num_threads(self.decode_threads)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            while True:
                with job.cond:
                    while (job.claimed < len(job.chosen) and not job.cancelled
                           and job.error is None
                           and job.claimed - job.returned >= DECODE_SLOTS):
                        job.cond.wait()
                    if job.claimed >= len(job.chosen) or job.cancelled or job.error is not None:
                        break
                    k = job.claimed
                    job.claimed, job.active = k + 1, job.active + 1
                self._decode(job, k)

    def _decode(self, job: _Job, k: int) -> None:
        """Decode expert chosen[k] of `job` into its slot (the caller claimed it: active + 1)."""
        layer, e = job.layer, job.chosen[k]
        read = 0
        t0 = t1 = time.perf_counter()
        try:
            entry = job.entries.get(e)
            if entry is None:
                image = job.reads[e].result()
                t1 = time.perf_counter()
                if self.verify and xxhash.xxh3_64_intdigest(memoryview(image.numpy())) != \
                        self.digests[(layer.index, e)]:
                    raise FormatError(f"checksum mismatch in expert {e} of decoder layer "
                                      f"{layer.index}: the file changed on disk or is corrupt",
                                      path=layer.file)
                with self._lock:
                    self.cache.put((layer.index, e), image,
                                   lambda copy, x=layer.experts[e]: self._entry(x, copy))
                entry = (image, None)
                read = layer.experts[e].nbytes
            image, tensors = entry
            if tensors is None:  # a read buffer, or host bytes for a GPU
                tensors = expert_tensors(layer.experts[e], image.to(self.device))
            gate_up, down = self._slots[k % DECODE_SLOTS]
            n = layer.intermediate * layer.hidden
            decompress_tensors(layer, tensors,
                               gate_up[:2 * n].view(2 * layer.intermediate, layer.hidden),
                               down[:n].view(layer.hidden, layer.intermediate), self._decoders)
            with job.cond:
                if read:  # its read buffer is free now: the next miss's read goes there
                    m = job.misses.index(e) + len(self._buffers)
                    if m < len(job.misses) and not job.cancelled:
                        job.reads[job.misses[m]] = self._pool.submit(
                            self._read, layer, layer.experts[job.misses[m]],
                            self._buffers[m % len(self._buffers)])
                job.info[k] = (read, t1 - t0, time.perf_counter() - t1)
                job.done[k] = True
        except BaseException as error:  # noqa: BLE001 - raised in the compute thread
            with job.cond:
                job.error = job.error or error
        finally:
            with job.cond:
                job.active -= 1
                job.cond.notify_all()

    # ---- reporting, closing ---------------------------------------------------------------
    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {"expert_cache_policy": self.cache.policy,
                "expert_cache_capacity_bytes": self.cache.capacity,
                "expert_cache_bytes": self.cache.nbytes,
                "expert_cache_entries": len(self.cache.items),
                "expert_hits": self.hits, "expert_misses": self.misses,
                "expert_hit_rate": self.hits / lookups if lookups else 0.0,
                "expert_bytes_read": self.bytes_read,
                "expert_held_bytes": sum(image.numel() for image, _ in self.held.values())
                if self.held else 0}

    def close(self) -> None:
        """Stop the decode thread and the readers, close the files. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._last is not None:
            self._cancel(self._last)
            self._last = None
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


__all__ = ["DECODE_SLOTS", "READ_THREADS", "ExpertStore"]
