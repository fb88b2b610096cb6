"""A checkpoint rewritten or truncated while a model runs from it: the next generation gives the
same tokens (weights held in memory the process owns) or a clean error (endor.FormatError or
OSError, one line from the CLI), never a signal. (Before issue 16 these cases raised SIGBUS,
which kills the test run: that is how a regression would show.) The issue's own reproducer runs
in a child process, so that there a regression is an ordinary failure with its exit code."""

import os
import subprocess
import sys

import pytest
import torch

import endor
from endor.cli import main
from endor.runtime import load_model
from tests.adversarial.conftest import REPO, assert_one_line_error

MODES = {"resident": dict(max_memory=None), "streamed-disk": dict(max_memory=0, offload="disk"),
         "streamed-cpu": dict(max_memory=0, offload="cpu")}
# What each (mode, change) must end in: weights in memory the process owns are unaffected;
# weights read from disk for every token fail on the next read, cleanly.
EXPECTED = {("resident", "rewrite"): "same", ("resident", "truncate"): "same",
            ("streamed-cpu", "rewrite"): "same", ("streamed-cpu", "truncate"): "same",
            ("streamed-disk", "rewrite"): endor.FormatError,
            ("streamed-disk", "truncate"): (endor.FormatError, OSError)}


def mutate(ckpt_dir, how: str) -> None:
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        if how == "truncate":
            os.truncate(path, 2000)
        else:  # the middle half of every shard rewritten in place, same size
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.seek(size // 4)
                block = f.read(size // 2)
                f.seek(size // 4)
                f.write(bytes(b ^ 0x5A for b in block))


def tokens(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("mode,how", sorted(EXPECTED))
def test_changed_file_gives_same_tokens_or_a_clean_error(ckpt, mode, how, one_torch_thread):
    ckpt_dir, ids, want = ckpt
    model = load_model(ckpt_dir, compute_threads=1, **MODES[mode])
    try:
        assert tokens(model, ids, len(want)) == want
        mutate(ckpt_dir, how)
        expected = EXPECTED[mode, how]
        if expected == "same":
            assert tokens(model, ids, len(want)) == want
        else:
            with pytest.raises(expected) as e:
                tokens(model, ids, len(want))
            assert ".safetensors" in str(e.value), "the error names the shard"
    finally:
        model.endor_close()


REPRODUCER = r"""
import os, sys, torch, endor
path = sys.argv[1]
endor.save_file({"d": torch.randn(64, 64), "e": endor.compress(torch.randn(64, 64))}, path)
f = endor.open_file(path)
loaded = endor.load_file(path)
kept = {k: v.clone() for k, v in loaded.items()}
with open(path, "r+b") as out:  # rewrite the data, same size
    out.seek(200)
    out.write(os.urandom(os.path.getsize(path) - 200))
assert all(torch.equal(loaded[k], kept[k]) for k in kept), "load_file's tensors changed"
try:  # the open file's header is the old one: its checksums refuse the new bytes
    f.get_tensor("d")
    raise SystemExit("rewritten bytes were returned unchecked")
except endor.FormatError as e:
    assert "checksum" in str(e), e
os.truncate(path, 2000)
try:
    f.get_tensor("d")
except endor.FormatError as e:
    print("FormatError:", e)
"""


def test_issue_reproducer_truncate_after_open_file(tmp_path):
    """`f = endor.open_file(p); os.truncate(p, 2000); f.get_tensor(...)` was a SIGBUS."""
    child = subprocess.run([sys.executable, "-c", REPRODUCER, str(tmp_path / "a.safetensors")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])  # -7: SIGBUS
    assert child.stdout.startswith("FormatError:") and "a.safetensors" in child.stdout
    assert "truncated" in child.stdout


def test_cli_says_one_line_when_a_streamed_shard_shrinks_mid_run(ckpt, monkeypatch, capsys):
    """`endor generate` whose layer shards are truncated after the load-time check (the EIO
    case of issue 16): exit 1, one line naming the shard."""
    from endor.runtime import model as runtime_model

    ckpt_dir = ckpt[0]
    checked = runtime_model.check_streamed

    def check_then_truncate(*args, **kwargs):
        result = checked(*args, **kwargs)
        mutate(ckpt_dir, "truncate")
        return result
    monkeypatch.setattr(runtime_model, "check_streamed", check_then_truncate)
    code = main(["generate", str(ckpt_dir), "--prompt", "x", "--max-new-tokens", "2",
                 "--max-memory", "0"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert_one_line_error(err, "generate", ".safetensors")
