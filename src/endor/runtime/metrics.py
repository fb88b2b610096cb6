"""What the runtime measures: per phase (prefill, decode) the forwards, tokens, wall time, bytes
read from disk and moved to the decompressor, and the time each stage of the stream was busy.

Stages run concurrently (the reader reads layer j+1 while layer j computes), so their busy times
add up to more than the wall time when the overlap works; `stall` is the part of the wall time
the compute thread spent waiting for weights, i.e. what overlap did not hide."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STAGES = ("read", "verify", "transfer", "decompress", "compute", "stall")
PHASES = ("prefill", "decode")


@dataclass
class LoadTimes:
    """What the workers measured for one layer load."""
    bytes_read: int = 0  # from disk
    bytes_moved: int = 0  # shard bytes handed to the decompressor (from disk or from RAM)
    read_s: float = 0.0
    verify_s: float = 0.0
    transfer_s: float = 0.0
    decompress_s: float = 0.0


@dataclass
class PhaseStats:
    forwards: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    layer_loads: int = 0
    bytes_read: int = 0
    bytes_moved: int = 0
    busy_s: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "tokens": self.tokens, "wall_s": self.wall_s,
                "layer_loads": self.layer_loads, "bytes_read": self.bytes_read,
                "bytes_moved": self.bytes_moved, "busy_s": dict(self.busy_s)}


class Metrics:
    """Accumulates per phase. A layer load counts toward the forward that consumed it, so with a
    cyclic prefetch the bytes of one decode token are exactly the streamed shards' sizes."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.phases = {p: PhaseStats() for p in PHASES}
        self._phase = None
        self._t0 = 0.0
        self._stall = 0.0

    def begin_forward(self, phase: str, tokens: int) -> None:
        assert phase in PHASES
        self._phase, self._t0, self._stall = phase, time.perf_counter(), 0.0
        stats = self.phases[phase]
        stats.forwards += 1
        stats.tokens += tokens

    def end_forward(self) -> None:
        if self._phase is None:
            return
        stats = self.phases[self._phase]
        wall = time.perf_counter() - self._t0
        stats.wall_s += wall
        stats.busy_s["stall"] += self._stall
        stats.busy_s["compute"] += max(wall - self._stall, 0.0)
        self._phase = None

    def add_load(self, t: LoadTimes, stall_s: float) -> None:
        stats = self.phases[self._phase or "prefill"]
        self._stall += stall_s
        stats.layer_loads += 1
        stats.bytes_read += t.bytes_read
        stats.bytes_moved += t.bytes_moved
        for stage in ("read", "verify", "transfer", "decompress"):
            stats.busy_s[stage] += getattr(t, stage + "_s")

    def add_expert(self, bytes_read: int, bytes_moved: int, stall_s: float,
                   decompress_s: float) -> None:
        """One routed expert (runtime/experts.py) of the forward running: its bytes count
        toward the token like a layer's, its wait for the disk as a stall."""
        stats = self.phases[self._phase or "prefill"]
        self._stall += stall_s
        stats.bytes_read += bytes_read
        stats.bytes_moved += bytes_moved
        stats.busy_s["read"] += stall_s
        stats.busy_s["decompress"] += decompress_s

    def summary(self) -> dict:
        pre, dec = self.phases["prefill"], self.phases["decode"]
        per_token = (lambda x: x / dec.tokens) if dec.tokens else (lambda x: 0.0)
        return {
            "prefill_s": pre.wall_s,
            "prefill_tokens": pre.tokens,
            "decode_tokens": dec.tokens,
            "decode_s": dec.wall_s,
            "decode_tokens_per_s": dec.tokens / dec.wall_s if dec.wall_s > 0 else 0.0,
            "bytes_read_per_token": per_token(dec.bytes_read),
            "bytes_moved_per_token": per_token(dec.bytes_moved),
            # seconds per decode token each stage was busy; stages overlap, see module doc
            "split_s_per_token": {s: per_token(v) for s, v in dec.busy_s.items()},
            "phases": {p: s.as_dict() for p, s in self.phases.items()},
        }
