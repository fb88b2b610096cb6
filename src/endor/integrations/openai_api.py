"""OpenAI's HTTP API, the part `endor serve` speaks: request bodies checked and turned into an
engine.Request, responses and stream chunks shaped as the `openai` client expects, errors as
`{"error": {"message", "type", "param", "code"}}` with a 4xx status."""

from __future__ import annotations

import time
import uuid

from .engine import Request, Result

MAX_STOP = 4  # as OpenAI


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style JSON error with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = \
            status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _number(body: dict, key: str, default, *, low, high, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {what} in [{low}, {high}], got {value!r}",
                       param=key)
    return value


def _check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required (a string; GET /v1/models lists it)",
                       param="model")
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                       f"'{served}'", param="model", code="model_not_found")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and s for s in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} "
                       "of them", param="stop")
    return stops


def _common(body, engine, prompt_ids: list[int], default_max: int | None) -> Request:
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    context = engine.context_length
    if context is not None and len(prompt_ids) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the "
                       f"prompt has {len(prompt_ids)}", param="messages",
                       code="context_length_exceeded")
    room = context - len(prompt_ids) if context is not None else 2**31
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, key, None, low=1, high=2**31, integer=True)
    if max_tokens is None:
        max_tokens = min(default_max or room, room)
    elif max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the "
                       f"prompt has {len(prompt_ids)} and {max_tokens} more were requested",
                       param=key, code="context_length_exceeded")
    return Request(prompt_ids=prompt_ids, max_tokens=max_tokens,
                   temperature=float(_number(body, "temperature", 1.0, low=0, high=2)),
                   top_p=float(_number(body, "top_p", 1.0, low=0, high=1)),
                   stop=_stop(body),
                   seed=_number(body, "seed", None, low=-2**63, high=2**63 - 1, integer=True))


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "'stream' must be a boolean", param="stream")
    return bool(stream)


def parse_completion(body, engine) -> tuple[Request, bool]:
    """POST /v1/completions: (request, stream)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_model(body, engine.name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = engine.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(engine.tokenizer)
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"token ids in 'prompt' must be in [0, {vocab})", param="prompt")
        ids = list(prompt)
    else:
        raise APIError(400, "'prompt' must be a string, a list of one string or a list of "
                       "token ids (one prompt per request)", param="prompt")
    if not ids:
        raise APIError(400, "'prompt' is empty", param="prompt")
    return _common(body, engine, ids, default_max=16), _stream_flag(body)  # 16: OpenAI's default


def _messages(body) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                            "assistant"):
            raise APIError(400, f"messages[{i}] must have a role: system, user or assistant",
                           param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string",
                           param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def parse_chat(body, engine) -> tuple[Request, bool]:
    """POST /v1/chat/completions: (request, stream), the prompt built by the chat template."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_model(body, engine.name)
    messages = _messages(body)
    if not engine.has_chat_template:
        raise APIError(400, f"the model '{engine.name}' has no chat template; use "
                       "/v1/completions", code="no_chat_template")
    try:
        ids = engine.encode_chat(messages)
    except Exception as e:  # the template's own checks (e.g. roles must alternate)
        raise APIError(400, f"the chat template refused the messages: {e}",
                       param="messages") from None
    return _common(body, engine, ids, default_max=None), _stream_flag(body)


# -- responses ----------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion(rid: str, model: str, result: Result) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def completion_chunk(rid: str, model: str, text: str, finish_reason=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}


def chat(rid: str, model: str, result: Result) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]}


def models(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "endor"}]}
