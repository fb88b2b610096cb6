"""A tiny converted checkpoint to attack: decoder Linear weights and, in the rest shard, the
embedding and LM head stored as Endor tensors; norms dense in both shard kinds. Built once; each
test mutates its own copy."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import endor
from endor.checkpoint import Checkpoint, CheckpointWriter
from tests.runtime.checkpoints import greedy, pruned_model, save_char_tokenizer

PROMPT = "Hello, Endor"
NEW_TOKENS = 4
REPO = Path(__file__).resolve().parents[2]


def write_all_compressed(model, out_dir):
    """One shard per decoder layer plus 'rest'; every 2-D floating weight compressed."""
    prefix = "model.layers."
    n = model.config.num_hidden_layers
    groups = [f"layers.{i}" for i in range(n)] + ["rest"]
    per_group = {g: {} for g in groups}
    for name, t in model.state_dict().items():
        group = f"layers.{name[len(prefix):].split('.')[0]}" if name.startswith(prefix) \
            else "rest"
        per_group[group][name] = endor.compress(t) if t.dim() == 2 else t.clone()
    writer = CheckpointWriter(out_dir, groups)
    for i, group in enumerate(groups):
        writer.write(i, per_group[group], metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    writer.finish({"method": "magnitude", "sparsity": 0.5, "nm": None, "summary": {}})
    save_char_tokenizer(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """(checkpoint dir, prompt ids, reference greedy tokens): never mutated."""
    from transformers import AutoTokenizer

    model = pruned_model("llama", torch.bfloat16)
    path = write_all_compressed(model, tmp_path_factory.mktemp("pristine") / "ckpt")
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
    return path, ids, greedy(model, ids, NEW_TOKENS)


@pytest.fixture
def ckpt(pristine, tmp_path):
    """A fresh copy of the checkpoint to mutate, with the prompt and the reference tokens."""
    path, ids, tokens = pristine
    return shutil.copytree(path, tmp_path / "ckpt"), ids, tokens


def shard_of(path: Path, group: str) -> Path:
    manifest = Checkpoint(path)
    return path / manifest.group_shards()[group].file


def flip_bytes(path: Path, start: int, count: int = 8) -> None:
    """Invert `count` bytes from `start` (same file size: only a checksum can tell)."""
    with open(path, "r+b") as f:
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def run_endor(*args, timeout=120, env=None):
    """`python -m endor.cli ARGS` in a child process: its exit code and stderr are real."""
    return subprocess.run([sys.executable, "-m", "endor.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "ENDOR_DEBUG": "", **(env or {})})


def assert_one_line_error(err: str, command: str, *needles: str) -> None:
    """The CLI contract: exactly one line `endor <command>: error: ...`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"endor {command}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)
