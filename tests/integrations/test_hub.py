"""`endor convert ORG/NAME OUT` through huggingface_hub, offline, against a Hub cache laid out by
hand in a temporary HF_HOME (never the network): revisions resolve through refs/, a missing id
fails with a message that says what to do."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from endor.format import load_file
from endor.format.equal import bit_equal
from endor.integrations.hub import is_hub_id, resolve
from tests.runtime.checkpoints import pruned_model

REPO = "tiny-org/tiny-llama"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}  # branch main and tag v1 -> model seed 0 / 1


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME holding REPO at two revisions, in huggingface_hub's cache layout: blobs, one
    snapshot directory per commit (files linked to blobs) and refs naming the commits."""
    home = tmp_path_factory.mktemp("hf_home")
    storage = home / "hub" / ("models--" + REPO.replace("/", "--"))
    for seed, (ref, commit) in enumerate(COMMITS.items()):
        saved = tmp_path_factory.mktemp(f"saved{seed}")
        pruned_model("llama", torch.bfloat16, seed=seed).save_pretrained(saved)
        snapshot = storage / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in saved.iterdir():
            blob = storage / "blobs" / f"{commit[:8]}-{f.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return home


def _convert(hf_home, *args, cwd):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "endor.cli", "convert", *args, "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.mark.parametrize("revision", [None, "v1", COMMITS["v1"]])
def test_convert_a_hub_id_from_the_local_cache(hf_home, revision, tmp_path):
    out = tmp_path / "out"
    args = [REPO, str(out), "--method", "none"]
    if revision is not None:
        args += ["--revision", revision]
    done = _convert(hf_home, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seed = 0 if revision is None else 1
    model = pruned_model("llama", torch.bfloat16, seed=seed)
    converted = {}
    for shard in out.glob("model-*.safetensors"):
        converted.update(load_file(shard))
    for name, tensor in model.state_dict().items():
        if name in converted:
            assert bit_equal(converted[name], tensor), name
    assert "lm_head.weight" in converted


def test_an_id_missing_from_the_cache_fails_offline_saying_why(hf_home, tmp_path):
    done = _convert(hf_home, "tiny-org/absent", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1  # a user error (cli.EXIT_FAILURE)
    assert "not in the local Hub cache" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    done = _convert(hf_home, REPO, str(tmp_path / "out"), "--revision", "v9", cwd=tmp_path)
    assert done.returncode == 1 and "tiny-org/tiny-llama@v9" in done.stderr


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not is_hub_id("org/model")  # exists here
    assert is_hub_id("org/other") and not is_hub_id("smollm2")
    assert not is_hub_id("a/b/c") and not is_hub_id("org/model.gguf")
    assert resolve("smollm2") == "smollm2"
    with pytest.raises(ValueError, match="--revision"):
        resolve("org/model", revision="main")
