"""Calibration activations, one decoder layer at a time (the SparseGPT / Wanda reference scheme).

The embeddings run once on N segments of L tokens; every decoder layer then sees, as its input,
the output of the layers before it *after* they were pruned. Layers are called exactly as the
model calls them: on one forward pass every layer is swapped for a recorder that keeps the
arguments the model passes it (attention mask, rotary position embeddings, ... which may differ
per layer, e.g. Gemma 3's sliding/global layers) and passes the hidden states through unchanged.
Everything runs in float32, one segment at a time, on the conversion's device (the CPU, or a
GPU: `place_activations` keeps the activations in the GPU's memory when a layer's inputs and
outputs fit there, else in host memory, moved to the GPU one segment at a time), so results are
reproducible on one device: a resumed conversion recomputes a layer's inputs bit for bit.

Size: a segment is L x hidden float32 values. A 70B layer (hidden 8192) calibrated on 128 x 2048
tokens holds 128 * 2048 * 8192 * 4 B = 8.6 GB of inputs, and as much again for the outputs while
they are computed: 17.2 GB, which fits an 80 GB or 141 GB GPU with the layer (1.7 GB in bf16,
3.4 GB in float32) and its largest Hessian (28672^2 float32 = 3.3 GB)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..prune import CalibrationStats

DEFAULT_SAMPLES = 64  # 64 x 256 = 16k tokens: a few minutes for a 135M model on 2 CPU cores
DEFAULT_SEQLEN = 256


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers needs to run."""


class _Recorder(nn.Module):
    def __init__(self, layer: nn.Module, index: int, sink: dict, last: bool):
        super().__init__()
        self.layer = layer
        self.index, self.sink, self.last = index, sink, last

    def __getattr__(self, name):
        # Models read attributes of their layers (e.g. `attention_type`): answer for the layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        self.sink[self.index] = (args, kwargs)
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class LayerCall:
    """How the model calls one decoder layer; `__call__` replays it on other hidden states."""
    args: tuple
    kwargs: dict

    def to(self, device) -> "LayerCall":
        """The same call with every tensor argument (masks, rotary tables) on `device`."""
        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, (tuple, list)):
                return type(x)(move(v) for v in x)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x
        return LayerCall(move(self.args), move(self.kwargs))

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.args:
            out = layer(hidden, *self.args[1:], **self.kwargs)
        else:
            out = layer(**{**self.kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, (tuple, list)) else out


def segments(token_ids: torch.Tensor, nsamples: int, seqlen: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens spread evenly over the text ([N, L] int64); fewer
    when the text is short, an error when it holds less than one window."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"calibration needs at least one sample of one token, got "
                         f"{nsamples} x {seqlen}")
    total = token_ids.numel()
    if total < seqlen:
        raise ValueError(f"the calibration text has {total} tokens, fewer than one segment of "
                         f"{seqlen}; give a longer text or a smaller sequence length")
    n = min(nsamples, total // seqlen)
    starts = torch.linspace(0, total - seqlen, n).round().long() if n > 1 else torch.zeros(1).long()
    return torch.stack([token_ids[s:s + seqlen] for s in starts.tolist()])


def tokenize(src, text: str) -> torch.Tensor:
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"calibration needs the model's tokenizer, but {src} has none that "
                         f"transformers can load ({e}); use --method magnitude or none, or add "
                         "the tokenizer files") from None
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor):
    """Run the model up to its decoder layers on every segment of `tokens` [N, L]: returns the
    first layer's input per segment (float32 [1, L, H] each) and one LayerCall per layer (the
    arguments are the same for every segment since all have the same length)."""
    originals = list(layers)
    sink: dict = {}
    calls = None
    hidden = []
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, i, sink, last=i == len(originals) - 1)
        for seg in tokens:
            sink.clear()
            try:
                model(input_ids=seg[None], use_cache=False)
            except _Stop:
                pass
            if len(sink) != len(originals):
                raise RuntimeError(f"the model called {len(sink)} of its {len(originals)} "
                                   "decoder layers; calibration cannot replay it")
            args, kwargs = sink[0]
            hidden.append((args[0] if args else kwargs["hidden_states"]).float())
            if calls is None:
                calls = [LayerCall(*sink[i]) for i in range(len(originals))]
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, calls


def activation_bytes(hidden: list) -> int:
    return sum(h.numel() * h.element_size() for h in hidden)


def place_activations(hidden: list, device) -> list:
    """The segments where they stay between layers: on `device` when a layer's inputs and
    outputs (twice their size) fit in half its free memory, else in host memory (pinned, for
    asynchronous copies), moved to the device one segment at a time when used."""
    device = torch.device(device)
    if device.type == "cpu":
        return [h.cpu() for h in hidden]
    free, _ = torch.cuda.mem_get_info(device)
    if 2 * activation_bytes(hidden) <= free // 2:
        return [h.to(device) for h in hidden]
    return [h.cpu().pin_memory() for h in hidden]


@torch.no_grad()
def propagate(layer: nn.Module, call: LayerCall, hidden: list, device="cpu") -> list:
    """The layer's outputs on every segment (run on `device`, kept where the inputs were): the
    next layer's inputs."""
    return [call(layer, h.to(device, non_blocking=True)).to(h.device) for h in hidden]


@torch.no_grad()
def collect_stats(layer: nn.Module, call: LayerCall, hidden: list, targets: dict,
                  *, hessian: bool, device="cpu") -> dict:
    """CalibrationStats of the inputs of every Linear in `targets` ({weight name: module}).
    Linears that receive the very same input tensor (q/k/v, gate/up) share one accumulator,
    so the Gram matrix of a shared input is computed once."""
    leader_of: dict[str, str] = {}
    stats: dict[str, CalibrationStats] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # id(input) -> (leader, input), per forward

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            entry = seen.get(id(x))
            if name not in leader_of:  # first forward: learn who shares an input
                shared = entry is not None and entry[1] is x
                leader_of[name] = entry[0] if shared else name
                if not shared:
                    stats[name] = CalibrationStats(x.shape[-1], hessian=hessian,
                                                   device=x.device)
            leader = leader_of[name]
            if leader == name:
                stats[name].update(x)
                seen[id(x)] = (name, x)
            elif entry is None or entry[1] is not x or entry[0] != leader:
                raise RuntimeError(f"{name} no longer shares its input with {leader}")
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in targets.items()]
    try:
        for h in hidden:
            seen.clear()
            call(layer, h.to(device, non_blocking=True))
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    missing = sorted(set(targets) - set(leader_of))
    if missing:
        raise RuntimeError(f"the layer never called {', '.join(missing)} on calibration data")
    return {name: stats[leader_of[name]] for name in targets}
