"""One model, one generation at a time, text handed out as it is generated: what `endor serve`
runs behind its HTTP routes (server.py). Sampling follows OpenAI's parameters; temperature 0 is
greedy, the same tokens as `endor generate`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Request:
    """A validated generation request (openai_api.py builds it from the HTTP body)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_token_s: float | None

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after it: the decode rate, prefill apart."""
        if self.first_token_s is None or self.completion_tokens < 2:
            return 0.0
        return (self.completion_tokens - 1) / max(self.seconds - self.first_token_s, 1e-9)


class _TextStream:
    """transformers streamer: accumulates generated ids, hands out the new text as it becomes
    final (never half a UTF-8 character, never a possible start of a stop string), and ends
    generation at a stop string or when the caller cancels."""

    def __init__(self, tokenizer, stop: list[str], on_text, cancelled: threading.Event):
        self.tokenizer, self.stop = tokenizer, stop
        self.on_text, self.cancelled = on_text, cancelled
        self.ids: list[int] = []
        self.sent = 0  # characters of text handed out
        self.text = ""
        self.stopped = False
        self.first_token_at: float | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(value.reshape(-1).tolist())
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        self._flush(final=self.stopped)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        ready = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # a character still incomplete
                ready = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back what may become a stop string
                for k in range(min(len(s) - 1, ready), 0, -1):
                    if self.text[:ready].endswith(s[:k]):
                        ready -= k
                        break
        if ready > self.sent and self.on_text is not None:
            self.on_text(self.text[self.sent:ready])
        self.sent = max(self.sent, ready)

    def should_stop(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = self.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class Engine:
    """A loaded model and its tokenizer. `generate` runs one request (callers serialise them:
    server.py queues requests on one worker thread)."""

    def __init__(self, model, tokenizer, *, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            eos[0] if isinstance(eos, list) else eos)

    @classmethod
    def load(cls, path, *, name: str | None = None, **load_kwargs) -> Engine:
        """endor.load_model(path, **load_kwargs) and the checkpoint's tokenizer."""
        from ..reference_loader import load_tokenizer
        from ..runtime import load_model

        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise FileNotFoundError(f"{path} holds no tokenizer; copy the source model's "
                                    "tokenizer files into it")
        model = load_model(path, **load_kwargs)
        return cls(model, tokenizer, name=name or Path(path).resolve().name)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding regardless
            ids = ids["input_ids"]
        return list(ids)

    def generate(self, request: Request, on_text=None,
                 cancelled: threading.Event | None = None) -> Result:
        """Generate for `request`; on_text(str) receives the text as it becomes final."""
        from transformers import GenerationConfig, StoppingCriteriaList

        cancelled = cancelled or threading.Event()
        stream = _TextStream(self.tokenizer, request.stop, on_text, cancelled)
        if cancelled.is_set():  # the client left while the request waited in the queue
            return Result("", "stop", len(request.prompt_ids), 0, 0.0, None)
        sample = request.temperature > 0
        config = GenerationConfig(
            max_new_tokens=request.max_tokens, do_sample=sample, eos_token_id=self.eos,
            pad_token_id=self.pad,
            **({"temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
               if sample else {}))
        ids = torch.tensor([request.prompt_ids], device=self.model.device)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=config, streamer=stream,
                                      stopping_criteria=StoppingCriteriaList([stream.should_stop]))
        seconds = time.perf_counter() - start
        generated = out[0, ids.shape[1]:].tolist()
        eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
        finish = "stop" if stream.stopped or (generated and generated[-1] in eos) else "length"
        return Result(stream.text, finish, len(request.prompt_ids), len(generated), seconds,
                      None if stream.first_token_at is None else stream.first_token_at - start)
