"""from_pretrained on Endor checkpoints: the in-memory and the offloaded model give endor's tokens;
without `import endor` loading fails instead of returning a randomly initialised model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import endor
from endor.checkpoint import HF_GUARD_FILE, mark_hf_config
from endor.format.equal import bit_equal
from endor.reference_loader import load_in_memory
from tests.runtime.checkpoints import greedy, pruned_model, write_checkpoint

PROMPT = torch.tensor([[5, 17, 3, 44, 9, 2, 71, 30]])
NEW_TOKENS = 6
SRC = Path(endor.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(arch, weights="endor"):
        if (arch, weights) not in made:
            model = pruned_model(arch, torch.bfloat16)
            path = write_checkpoint(model, tmp_path_factory.mktemp(arch), weights=weights)
            made[arch, weights] = path, greedy(model, PROMPT, NEW_TOKENS)
        return made[arch, weights]

    return get


WITHOUT_ENDOR = ("import importlib.util, os, sys\n"
                 "sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p, 'endor'))]\n"
                 "assert importlib.util.find_spec('endor') is None\n")


def _run(code: str, *, endor_importable: bool, cwd) -> subprocess.CompletedProcess:
    """Python in a fresh process; without endor: isolated mode (-I) and every sys.path entry
    holding an `endor` package (the editable install's src/) removed, so importing it fails."""
    if not endor_importable:
        code = WITHOUT_ENDOR + code
    args = [sys.executable, *([] if endor_importable else ["-I"]), "-c", code]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC) if endor_importable
           else ""}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_import_endor_does_not_import_transformers(tmp_path):
    done = _run("import sys, endor\n"
                "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))",
                endor_importable=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_in_memory_load_is_the_decompressed_model(checkpoints, arch):
    from transformers import AutoModelForCausalLM

    path, want = checkpoints(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not hasattr(model, "endor_stats")  # transformers' own model, every weight dense
    assert greedy(model, PROMPT, NEW_TOKENS) == want
    reference, _ = load_in_memory(path)
    with torch.no_grad():
        assert bit_equal(model(PROMPT).logits, reference(PROMPT).logits)
    runtime = endor.load_model(path)
    assert greedy(runtime, PROMPT, NEW_TOKENS) == want


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_budget_smaller_than_the_model_returns_the_offloaded_runtime(checkpoints, arch):
    from transformers import AutoModelForCausalLM

    path, want = checkpoints(arch)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto",
                                                 max_memory={"cpu": 30_000})
    stats = model.endor_stats()
    assert stats["streamed_layers"] and stats["budget_bytes"] == 30_000
    assert greedy(model, PROMPT, NEW_TOKENS) == want
    assert model.endor_stats()["bytes_read_per_token"] > 0  # the layers did stream
    runtime = endor.load_model(path, max_memory=30_000)
    assert runtime.endor_stats()["streamed_layers"] == stats["streamed_layers"]
    assert greedy(runtime, PROMPT, NEW_TOKENS) == want
    model.endor_close()
    runtime.endor_close()


def test_a_budget_that_holds_the_model_loads_it_in_memory(checkpoints):
    from transformers import AutoModelForCausalLM

    path, want = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto",
                                                 max_memory={"cpu": 10**9})
    assert not hasattr(model, "endor_stats")
    assert greedy(model, PROMPT, NEW_TOKENS) == want


def test_without_endor_from_pretrained_fails_naming_the_fix(checkpoints, tmp_path):
    path, _ = checkpoints("llama")
    done = _run("from transformers import AutoModelForCausalLM\n"
                f"AutoModelForCausalLM.from_pretrained({str(path)!r})\n",
                endor_importable=False, cwd=tmp_path)
    assert done.returncode != 0
    assert HF_GUARD_FILE in done.stderr and "import-endor-before-from_pretrained" in done.stderr


def test_registers_when_transformers_was_imported_first(checkpoints, tmp_path):
    path, want = checkpoints("llama")
    done = _run("import torch\n"
                "from transformers import AutoModelForCausalLM\n"
                "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
                "assert 'endor' not in AUTO_QUANTIZER_MAPPING\n"
                "import endor\n"
                f"m = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
                f"out = m.generate(torch.tensor({PROMPT.tolist()}), max_new_tokens={NEW_TOKENS},"
                f" min_new_tokens={NEW_TOKENS}, do_sample=False, pad_token_id=0)\n"
                f"print(out[0, {PROMPT.shape[1]}:].tolist())\n",
                endor_importable=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want


def test_a_corrupt_tensor_fails_the_load(checkpoints, tmp_path):
    import logging

    import shutil

    from transformers import AutoModelForCausalLM

    path, _ = checkpoints("llama")
    broken = shutil.copytree(path, tmp_path / "broken")
    shard = broken / "model-00001-of-00005.safetensors"
    with endor.open_file(shard) as f:
        start = f.header.tensors[next(n for n in f.header.tensors
                                      if n.endswith(".endor.bitmap"))].start
    data = bytearray(shard.read_bytes())
    data[start] ^= 0x40
    shard.write_bytes(bytes(data))
    # transformers collects conversion errors, logs its report, then raises one RuntimeError
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match="CONVERSION"):
            AutoModelForCausalLM.from_pretrained(broken)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert any("'model.layers.0.mlp.down_proj.weight': checksum mismatch" in r.getMessage()
               for r in records)


def test_a_device_map_over_several_devices_is_refused(checkpoints):
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints("llama")
    with pytest.raises(ValueError, match="loads on one device"):
        AutoModelForCausalLM.from_pretrained(path, device_map={"model": "cpu", "lm_head": "disk"})


def test_dense_checkpoints_stay_plain_hf_checkpoints(checkpoints, tmp_path):
    path, want = checkpoints("llama", "dense")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    done = _run("import torch\n"
                "from transformers import AutoModelForCausalLM\n"
                f"m = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
                f"out = m.generate(torch.tensor({PROMPT.tolist()}), max_new_tokens={NEW_TOKENS},"
                f" min_new_tokens={NEW_TOKENS}, do_sample=False, pad_token_id=0)\n"
                f"print(out[0, {PROMPT.shape[1]}:].tolist())\n",
                endor_importable=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want


def test_mark_hf_config_adds_and_removes_the_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}}))
    mark_hf_config(tmp_path, "endor")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "endor"
    assert config["transformers_weights"] == HF_GUARD_FILE
    mark_hf_config(tmp_path, "dense")
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}
    mark_hf_config(tmp_path / "nowhere", "endor")  # no config.json: nothing to do
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(endor.FormatError, match="not a JSON object"):
        mark_hf_config(tmp_path, "endor")


@pytest.mark.gpu
def test_on_a_gpu_in_memory_and_offloaded(checkpoints):
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints("llama")
    prompt = PROMPT.cuda()
    want = greedy(endor.load_model(path, device="cuda"), prompt, NEW_TOKENS)  # GPU arithmetic
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    assert model.device.type == "cuda" and not hasattr(model, "endor_stats")
    assert greedy(model, prompt, NEW_TOKENS) == want
    offloaded = AutoModelForCausalLM.from_pretrained(path, device_map="auto",
                                                     max_memory={0: 30_000, "cpu": 10**9})
    stats = offloaded.endor_stats()
    assert stats["device"].startswith("cuda") and stats["streamed_layers"]
    assert stats["offload"] == "cpu"  # a CPU budget given: compressed layers held in RAM
    assert greedy(offloaded, prompt, NEW_TOKENS) == want
    offloaded.endor_close()
    runtime = endor.load_model(path, device="cuda", offload="cpu", max_memory=30_000)
    assert greedy(runtime, prompt, NEW_TOKENS) == want
    runtime.endor_close()
