"""`endor export`: a plain HF checkpoint that transformers loads in a process where endor cannot
be imported, with logits bit-identical to the Endor model's."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file as st_load

import endor
from endor.cli import main
from endor.format.equal import bit_equal
from endor.integrations.export import export_hf
from tests.integrations.test_hf_quantizer import WITHOUT_ENDOR
from tests.runtime.checkpoints import pruned_model, save_char_tokenizer, write_checkpoint

PROMPT = torch.tensor([[5, 17, 3, 44, 9, 2, 71, 30]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    def get(arch):
        path = write_checkpoint(pruned_model(arch, torch.bfloat16),
                                tmp_path_factory.mktemp(arch), weights="endor")
        save_char_tokenizer(path)
        return path
    return get


def _endor_logits(path) -> torch.Tensor:
    model = endor.load_model(path)
    with torch.no_grad():
        return model(PROMPT).logits


def _plain_logits(path, out, tmp_path) -> torch.Tensor:
    """Logits from transformers alone, in a fresh isolated process without endor."""
    code = WITHOUT_ENDOR + (
        "import torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "torch.set_num_threads(1)\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        f"AutoTokenizer.from_pretrained({str(path)!r})\n"
        f"assert getattr(m.config, 'quantization_config', None) is None\n"
        "with torch.no_grad():\n"
        f"    logits = m(torch.tensor({PROMPT.tolist()})).logits\n"
        f"save_file({{'logits': logits.contiguous()}}, {str(out)!r})\n")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return st_load(out)["logits"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_export_loads_without_endor_with_bit_identical_logits(checkpoint, arch, tmp_path,
                                                             one_torch_thread):
    # one thread on both sides: the same reduction order in every matmul
    src = checkpoint(arch)
    dest = tmp_path / "hf"
    assert main(["export", str(src), str(dest), "--format", "hf"]) == 0
    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    assert not (dest / "endor.json").exists()
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert not any(".endor." in n for n in index["weight_map"])
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert (dest / "tokenizer.json").is_file()
    want = _endor_logits(src)
    got = _plain_logits(dest, tmp_path / "logits.safetensors", tmp_path)
    assert bit_equal(got, want)


def test_shards_follow_max_shard_size_and_never_split_a_layer(checkpoint, tmp_path):
    src = checkpoint("llama")
    done = export_hf(src, tmp_path / "hf", max_shard_size=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == done["shards"] > 1
    assert files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                     for i in range(len(files))]
    by_layer = {}
    for name, file in index["weight_map"].items():
        if ".layers." in name:
            by_layer.setdefault(name.split(".layers.")[1].split(".")[0], set()).add(file)
    assert all(len(f) == 1 for f in by_layer.values())
    from endor.checkpoint import Checkpoint
    ckpt = Checkpoint(src)
    for file in files:
        for name, tensor in st_load(tmp_path / "hf" / file).items():
            assert bit_equal(tensor, ckpt.file_of(name).get_tensor(name)), name
    assert index["metadata"]["total_size"] == done["bytes"]


def test_refuses_a_non_empty_destination(checkpoint, tmp_path):
    src = checkpoint("llama")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_hf(src, tmp_path / "hf")
    export_hf(src, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "keep.txt").exists()
    with pytest.raises(ValueError, match="differ"):
        export_hf(src, src, overwrite=True)
