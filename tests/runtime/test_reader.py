import errno
import os

import pytest
import xxhash
import torch

from endor.runtime import reader as reader_module
from endor.runtime.reader import (ALIGN, HUGE_PAGE, ShardReader, aligned_buffer, host_region,
                                  round_up)


@pytest.fixture
def reader():
    r = ShardReader()
    yield r
    r.close()  # joins its I/O threads


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 8192 + 5])
def test_whole_file_read_is_exact(tmp_path, monkeypatch, reader, nbytes):
    monkeypatch.setattr(reader_module, "CHUNK", 8192)  # several chunks on a small file
    data = os.urandom(nbytes)
    path = tmp_path / "shard"
    path.write_bytes(data)
    buf = aligned_buffer(nbytes)
    assert buf.data_ptr() % ALIGN == 0 and buf.numel() == round_up(max(nbytes, 1))
    r = reader
    assert r.read_into(path, buf, nbytes) == nbytes
    assert bytes(buf[:nbytes].numpy()) == data
    assert r.direct == (r.fallback_reason is None)  # either direct, or it says why not


def _mapping_flags(address: int) -> dict:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    fields, inside = {}, False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.parametrize("nbytes", [1, 4097, 5 * HUGE_PAGE + 3])
def test_read_buffers_start_on_a_huge_page_and_are_private(nbytes):
    region = host_region(nbytes)
    assert region.ctypes.data % HUGE_PAGE == 0 and region.size == round_up(nbytes)
    region[:] = 7  # writable, and every byte belongs to it
    assert int(region.sum()) == 7 * region.size
    buf = aligned_buffer(nbytes)
    assert buf.data_ptr() % HUGE_PAGE == 0 and buf.numel() == round_up(nbytes)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc only")
def test_read_buffers_are_eligible_for_transparent_huge_pages():
    """What makes O_DIRECT reads fast: a private mapping advised MADV_HUGEPAGE (a shared anonymous
    mapping would be shmem, which THP leaves alone by default)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this kernel")
    if "[never]" in thp:
        pytest.skip("transparent huge pages are off on this machine")
    huge = aligned_buffer(4 * HUGE_PAGE)
    small = aligned_buffer(4 * HUGE_PAGE, huge_pages=False)
    assert _mapping_flags(huge.data_ptr()).get("THPeligible") == "1"
    if "[madvise]" in thp:  # without the advice, no huge pages
        assert _mapping_flags(small.data_ptr()).get("THPeligible") == "0"


def test_reused_buffer_holds_the_newest_file(tmp_path, reader):
    buf = aligned_buffer(10_000)
    r = reader
    for size in (10_000, 5):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        r.read_into(tmp_path / "f", buf, size)
        assert bytes(buf[:size].numpy()) == data


def test_refused_o_direct_falls_back_and_says_so(tmp_path, monkeypatch, reader):
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    real_preadv = os.preadv
    calls = []

    def preadv(fd, buffers, offset):
        if os.get_blocking(fd) and fcntl_flags(fd) & getattr(os, "O_DIRECT", 0):
            calls.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    r = reader
    buf = aligned_buffer(5000)
    r.read_into(tmp_path / "f", buf, 5000)
    assert bytes(buf[:5000].numpy()) == data
    if hasattr(os, "O_DIRECT"):
        assert calls and not r.direct and "refused an O_DIRECT read" in r.fallback_reason


def fcntl_flags(fd):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_short_file_and_bad_buffer_are_errors(tmp_path, reader):
    (tmp_path / "f").write_bytes(b"x" * 100)
    r = reader
    with pytest.raises(OSError, match="short read"):
        r.read_into(tmp_path / "f", aligned_buffer(200), 200)
    with pytest.raises(ValueError, match="aligned_buffer"):
        r.read_into(tmp_path / "f", torch.empty(8192, dtype=torch.uint8)[1:], 100)
    with pytest.raises(FileNotFoundError):
        r.read_into(tmp_path / "missing", aligned_buffer(10), 10)


def test_direct_disabled_reads_buffered():
    r = ShardReader(direct=False)
    assert not r.direct and r.fallback_reason == "disabled"


@pytest.mark.parametrize("direct", [True, False])
def test_buffered_reads_leave_nothing_in_the_page_cache(tmp_path, monkeypatch, direct):
    path = tmp_path / "shard.bin"
    data = os.urandom(3 * ALIGN + 5)
    path.write_bytes(data)
    advice = []
    real = os.posix_fadvise
    monkeypatch.setattr(reader_module.os, "posix_fadvise",
                        lambda fd, off, n, how: advice.append(how) or real(fd, off, n, how))
    r = ShardReader(direct=direct)
    buf = aligned_buffer(len(data))
    assert r.read_into(path, buf, len(data)) == len(data)
    assert bytes(buf[:len(data)].numpy()) == data
    if r.direct:  # O_DIRECT never fills the cache: nothing to drop
        assert os.POSIX_FADV_DONTNEED not in advice
    else:  # buffered (chosen, or the filesystem refused O_DIRECT): evicted once read
        assert advice[-1] == os.POSIX_FADV_DONTNEED
    r.close()


@pytest.mark.parametrize("depth", [1, 3])
def test_requests_in_flight_read_the_same_bytes(tmp_path, monkeypatch, depth):
    import threading

    monkeypatch.setattr(reader_module, "CHUNK", 8192)
    before = set(threading.enumerate())
    data = os.urandom(10 * 8192 + 77)
    (tmp_path / "f").write_bytes(data)
    r = ShardReader(depth=depth)
    buf = aligned_buffer(len(data))
    r.read_into(tmp_path / "f", buf, len(data))
    assert bytes(buf[:len(data)].numpy()) == data
    r.close()
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("endor-io")]
    with pytest.raises(ValueError, match="depth"):
        ShardReader(depth=0)


@pytest.mark.parametrize("nbytes", [0, 1, 4097, 3 * 8192 + 5])
@pytest.mark.parametrize("direct", [True, False])
def test_span_digests_are_the_images(tmp_path, monkeypatch, nbytes, direct):
    """start(digest=True): result() hashes each request's span (several here) as it lands, and
    the digest is every span's XXH3 in file order: exactly the file's bytes, the digest the
    runtime checks shards by."""
    from endor.runtime.images import image_digest

    monkeypatch.setattr(reader_module, "CHUNK", 8192)
    data = os.urandom(nbytes)
    (tmp_path / "f").write_bytes(data)
    buf = aligned_buffer(nbytes)
    r = ShardReader(direct=direct)
    try:
        pending = r.start(tmp_path / "f", buf, nbytes, digest=True)
        assert pending.result() == nbytes
        spans = tuple(xxhash.xxh3_64_intdigest(data[s:s + 8192])
                      for s in range(0, max(nbytes, 1), 8192))
        assert pending.digest == image_digest(buf, nbytes) == spans
        assert len(spans) == max(1, -(-nbytes // 8192))
        assert pending.digest_s >= 0
        plain = r.start(tmp_path / "f", buf, nbytes)
        plain.result()
        assert plain.digest is None  # not asked for: not hashed
    finally:
        r.close()


def test_digest_after_a_refused_o_direct_read_and_none_for_a_short_one(tmp_path, monkeypatch,
                                                                      reader):
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        if fcntl_flags(fd) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    buf = aligned_buffer(5000)
    pending = reader.start(tmp_path / "f", buf, 5000, digest=True)
    pending.result()  # the buffered fallback read, hashed where it ran
    assert pending.digest == reader_module.span_digests(memoryview(data), 5000) == \
        (xxhash.xxh3_64_intdigest(data),)
    monkeypatch.undo()
    short = reader.start(tmp_path / "f", aligned_buffer(8000), 8000, digest=True)
    with pytest.raises(OSError, match="short read"):
        short.result()
    assert short.digest is None
