"""Conversions onto a full or read-only filesystem (a small tmpfs the test mounts; skipped where
mounting is not permitted): exit 1 with one line naming the file, and an --overwrite that fails
midway leaves the old checkpoint as it was."""

import contextlib
import hashlib
import subprocess

import pytest

from endor.cli import main
from tests.adversarial.conftest import assert_one_line_error


@contextlib.contextmanager
def small_fs(path, size_kb: int, *, read_only: bool = False):
    path.mkdir()
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_convert_onto_a_full_disk(pristine, tmp_path, capsys):
    with small_fs(tmp_path / "small", 40) as small:
        code = main(["convert", str(pristine[0]), str(small / "out"), "--quiet"])
        assert code == 1
        assert_one_line_error(capsys.readouterr().err, "convert", "No space left on device",
                              str(small / "out"))


def test_convert_onto_a_read_only_disk(pristine, tmp_path, capsys):
    with small_fs(tmp_path / "ro", 64, read_only=True) as ro:
        assert main(["convert", str(pristine[0]), str(ro / "out"), "--quiet"]) == 1
        assert_one_line_error(capsys.readouterr().err, "convert", "Read-only file system",
                              str(ro / "out"))


def test_overwrite_that_runs_out_of_space_keeps_the_old_checkpoint(pristine, tmp_path, capsys):
    with small_fs(tmp_path / "small", 200) as small:
        out = small / "out"
        assert main(["convert", str(pristine[0]), str(out), "--quiet"]) == 0
        before = digests(out)
        capsys.readouterr()
        # The dense twin is larger than the room left beside the old checkpoint.
        code = main(["convert", str(pristine[0]), str(out), "--weights", "dense", "--overwrite",
                     "--quiet"])
        assert code == 1
        assert_one_line_error(capsys.readouterr().err, "convert", "No space left on device")
        assert digests(out) == before
        assert sorted(p.name for p in small.iterdir()) == ["out"]  # the staging dir is gone
