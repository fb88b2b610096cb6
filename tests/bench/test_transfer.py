"""endor bench transfer: the O_DIRECT reader reads exactly the file (aligned buffer, short last
block, several readers in flight), falls back with a recorded flag where O_DIRECT is refused,
and the benchmark reports every mode and block size."""

import ctypes
import errno
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from endor.bench import transfer
from endor.cli import build_parser
from endor.cli.bench import benchmark_params
from endor.runtime.reader import host_region

MIB = transfer.MIB


def _address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_read_buffers_are_aligned_and_large_enough():
    for nbytes in (1, 4096, 4097, 3 * MIB + 5):
        for huge_pages in (True, False):
            buffer = host_region(nbytes, huge_pages=huge_pages)
            assert _address(buffer) % 4096 == 0
            assert len(buffer) >= nbytes and len(buffer) % 4096 == 0


@pytest.fixture
def data_file(tmp_path):
    # Not a whole number of blocks: the last read is short.
    data = os.urandom(3 * 65536 + 4096)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _open(path) -> int:
    """O_DIRECT where this filesystem takes it (the tests then check aligned reads), else
    buffered."""
    if transfer.direct_io_works(path, host_region(4096)):
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    return os.open(path, os.O_RDONLY)


def test_stream_file_reads_every_byte(data_file):
    path, data = data_file
    block = 65536
    buffer = host_region(block)
    fd = _open(path)
    try:
        assert transfer.stream_file(fd, buffer, block) == len(data)
    finally:
        os.close(fd)
    tail = len(data) % block
    assert bytes(buffer[:tail]) == data[-tail:]  # the last, short block landed in the buffer


def test_pread_into_reads_a_given_range(data_file):
    path, data = data_file
    buffer = host_region(65536)
    fd = _open(path)
    try:
        assert transfer.pread_into(fd, memoryview(buffer)[:8192], 65536) == 8192
        assert transfer.pread_into(fd, memoryview(buffer)[8192:16384], len(data)) == 0
    finally:
        os.close(fd)
    assert bytes(buffer[:8192]) == data[65536:65536 + 8192]


def test_parallel_stream_reads_every_block_once(data_file):
    path, data = data_file
    block, depth = 65536, 3
    buffer = host_region(block * depth)
    fd = _open(path)
    with ThreadPoolExecutor(depth) as pool:
        try:
            assert transfer.stream_file_parallel(fd, buffer, block, pool, depth) == len(data)
        finally:
            os.close(fd)
    # 4 blocks over 3 workers: worker 0 read blocks 0 and 3 (short), 1 read 1, 2 read 2.
    assert bytes(buffer[block:2 * block]) == data[block:2 * block]
    assert bytes(buffer[2 * block:3 * block]) == data[2 * block:3 * block]
    assert bytes(buffer[:4096]) == data[3 * block:]


def test_write_test_file_has_the_size_asked(tmp_path):
    path = tmp_path / "t.bin"
    transfer.write_test_file(path, 3 * MIB + 4096)
    assert path.stat().st_size == 3 * MIB + 4096
    assert len(set(path.read_bytes()[:4096])) > 200  # random bytes, nothing to compress


def _args(tmp_path, *extra):
    args = build_parser().parse_args(["bench", "transfer", "--quick", "--dir", str(tmp_path),
                                      "--size-mib", "4", "--blocks-mib", "1,2",
                                      "--queue-depth", "2", "--warmup", "0", "--repeat", "1",
                                      *extra])
    return benchmark_params(args)


def test_run_reports_every_mode_and_block_size(tmp_path):
    doc = transfer.run(**_args(tmp_path))
    disk = [r for r in doc["results"] if r["link"] == "disk"]
    assert {(r["mode"], r["block_mib"]) for r in disk} == {
        (m, b) for m in ("direct", "direct_small_pages", "direct_qd2", "buffered_cold",
                         "buffered_warm")
        for b in (1, 2)}
    for r in disk:
        assert r["gbps"] > 0 and r["size_mib"] == 4 and r["n"] == 1
        assert r["vs_memcpy"] > 0
        assert r["cache_evicted"] == (r["mode"] != "buffered_warm")
        assert r["o_direct"] == (doc["params"]["o_direct"] and r["mode"].startswith("direct"))
    memcpy = [r for r in doc["results"] if r["link"] == "host_memcpy"]
    assert memcpy and memcpy[0]["threads"] == 1 and all(r["gbps"] > 0 for r in memcpy)
    assert list(tmp_path.iterdir()) == []  # the test file is gone


def test_run_falls_back_and_says_so_where_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *a, **k):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", refusing_open)
    doc = transfer.run(**_args(tmp_path, "--queue-depth", "1"))
    assert doc["params"]["o_direct"] is False
    assert {r["mode"] for r in doc["results"] if r["link"] == "disk"} == {
        "direct", "direct_small_pages", "buffered_cold", "buffered_warm"}
    assert not any(r.get("o_direct") for r in doc["results"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        transfer.run(**_args(tmp_path, "--queue-depth", "0"))
    with pytest.raises(ValueError, match="not a directory"):
        transfer.run(**_args(tmp_path / "missing"))
