"""`endor serve` in a subprocess on 127.0.0.1, spoken to with the official `openai` client: the
same greedy text as `endor generate`, streamed or not, for completions and chat; concurrent
streams; malformed requests get OpenAI-style 4xx JSON errors and the server keeps serving."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from endor.cli import main
from tests.runtime.checkpoints import pruned_model, save_char_tokenizer, write_checkpoint

openai = pytest.importorskip("openai")

NAME = "tiny-endor"
PROMPT = "Hello, Endor"
NEW_TOKENS = 12
# The character tokenizer has no newline: a one-line ChatML-like template.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of one plain HTTP request (urllib: raw bytes, any method)."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    path = write_checkpoint(pruned_model("llama", torch.bfloat16),
                            tmp_path_factory.mktemp("serve"), weights="endor")
    save_char_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """(base URL, log file) of a running `endor serve`, layers streamed from disk."""
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "endor.cli", "serve", str(checkpoint), "--host", "127.0.0.1",
             "--port", str(port), "--name", NAME, "--max-memory", "0"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if _http("GET", url + "/health")[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            assert time.monotonic() < deadline, "endor serve did not start: " + log.read_text()
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _generate(checkpoint, prompt: str, capsys) -> str:
    """`endor generate` greedy text (the reference), layers streamed from disk as served."""
    assert main(["generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens",
                 str(NEW_TOKENS), "--max-memory", "0", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["text"]


def _chat_prompt(checkpoint) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    status, body = _http("GET", server[0] + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_completion_equals_endor_generate(checkpoint, client, capsys):
    want = _generate(checkpoint, PROMPT, capsys)
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                    temperature=0)
    assert got.choices[0].text == want and want
    assert got.usage.completion_tokens <= NEW_TOKENS
    assert got.usage.prompt_tokens == len(PROMPT)  # one token per character
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_equals_endor_generate_on_the_templated_prompt(checkpoint, client, capsys):
    want = _generate(checkpoint, _chat_prompt(checkpoint), capsys)
    got = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=NEW_TOKENS,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want and want
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES,
                                                 max_tokens=NEW_TOKENS, temperature=0,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_four_concurrent_streams_all_finish(checkpoint, client, capsys):
    want = _generate(checkpoint, PROMPT, capsys)

    def one(_):
        stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4), timeout=300)) == [want] * 4


def test_stop_seed_and_sampling(client):
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                     temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]
    sampled = [client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                         temperature=1.5, top_p=0.9, seed=seed).choices[0].text
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]


MALFORMED = [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", json.dumps([1, 2]).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"prompt": "x"}).encode(), 400),  # no model
    ("POST", "/v1/completions", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404),
    ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "x" * 100}).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "x",
                                             "max_tokens": -3}).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "x",
                                             "temperature": "hot"}).encode(), 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": NAME, "messages": []}).encode(), 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": NAME, "messages": [
        {"role": "wizard", "content": "x"}]}).encode(), 400),
    ("GET", "/v1/completions", b"", 405),
    ("POST", "/v1/embeddings", b"{}", 404),
]


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url, _ = server
    for method, path, body, status in MALFORMED:
        got, reply = _http(method, url + path, body if method == "POST" else None)
        assert got == status, (path, body, reply)
        error = json.loads(reply)["error"]
        assert isinstance(error["message"], str) and error["message"], reply
        assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=PROMPT, max_tokens=2)
    ok = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_each_request_logs_its_tokens_per_second(server, client):
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    _, log = server
    deadline = time.monotonic() + 10
    while "tokens/s decode" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "completion: 12 prompt + " in log.read_text()
