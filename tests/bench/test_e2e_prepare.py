"""The e2e benchmark's checkpoint cache: one writer at a time per cache folder."""

import subprocess
import sys
from types import SimpleNamespace

from endor.bench import e2e_prepare

# A second process, as a second `endor bench e2e` on the same --workdir would be: can it take
# the cache folder's lock right now?
_TRY_LOCK = ("import sys, filelock; l = filelock.FileLock(sys.argv[1], timeout=0)\n"
             "try:\n    l.acquire()\nexcept filelock.Timeout:\n    print('busy')\n"
             "else:\n    print('free')")


def _lock_state(root):
    return subprocess.run([sys.executable, "-c", _TRY_LOCK, str(root / ".lock")],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_cache_lock_keeps_out_another_process(tmp_path):
    root = tmp_path / "llama-abc"
    with e2e_prepare.cache_lock(root):
        assert _lock_state(root) == "busy"
    assert _lock_state(root) == "free"


def test_prepare_converts_while_holding_the_lock(tmp_path, monkeypatch):
    seen = {}

    def fake_source(config, opts, workdir, family):
        root = workdir / "llama-abc"
        assert _lock_state(root) == "free"  # nothing holds it before prepare converts
        return root, root / "hf"

    def fake_convert_all(hf, outs, sparsity):
        seen["outs"], seen["lock"] = sorted(outs), _lock_state(hf.parent)

    monkeypatch.setattr(e2e_prepare, "synthetic_source", fake_source)
    monkeypatch.setattr(e2e_prepare, "convert_all", fake_convert_all)
    paths = e2e_prepare.prepare(None, SimpleNamespace(sparsity=0.5), tmp_path, ["raw", "int4"])
    assert seen == {"outs": ["dense", "int4", "raw"], "lock": "busy"}
    assert paths["int4"] == tmp_path / "llama-abc" / "endor-int4"
    assert _lock_state(tmp_path / "llama-abc") == "free"
