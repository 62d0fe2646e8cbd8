"""The OpenAI-compatible routes, spoken to by the official `openai` client over real HTTP."""

import base64
import io
import json
import socket
import threading
import time

import pytest
from PIL import Image

from app_support import import_app, running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
server = import_app("server")
openai_api = import_app("openai_api")

UPLOAD_MB = 1


def data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 80, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE_MESSAGE = {"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": data_url()}},
    {"type": "text", "text": "What is in the picture?"}]}


@pytest.fixture(scope="module")
def app(tiny_model_fp32):
    return server.build_app(tiny_model_fp32, max_upload_mb=UPLOAD_MB)


@pytest.fixture(scope="module")
def base_url(app):
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model, messages, max_new_tokens) -> str:
    """The library's own greedy answer, for comparison."""
    return "".join(model.generate(messages, max_new_tokens=max_new_tokens, temperature=0.0))


def test_models_lists_the_loaded_checkpoint(client, tiny_checkpoint):
    (model,) = client.models.list().data
    assert model.id == tiny_checkpoint.name and model.owned_by == "kimivl-local"


def test_completion_with_an_image(client, tiny_model_fp32):
    out = client.chat.completions.create(model="any", messages=[IMAGE_MESSAGE], max_tokens=12,
                                         temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == "tiny"
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    stats = tiny_model_fp32.last_stats
    assert out.usage.prompt_tokens == stats.prompt_tokens > 10  # the image's placeholders count
    assert out.usage.completion_tokens == stats.generated_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.message.content == reference(tiny_model_fp32, [IMAGE_MESSAGE], 12)


def test_streaming_with_an_image(client, tiny_model_fp32):
    stream = client.chat.completions.create(model="any", messages=[IMAGE_MESSAGE], max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed
    finals = [c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 12
    assert text == reference(tiny_model_fp32, [IMAGE_MESSAGE], 12)


def test_stop_strings_cut_the_answer(client, tiny_model_fp32):
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = reference(tiny_model_fp32, messages, 24)
    stop = full[4:7]
    assert stop.strip(), f"need a visible stop string, answer was {full!r}"
    for stream in (False, True):
        out = client.chat.completions.create(model="any", messages=messages, max_tokens=24,
                                             temperature=0, stop=[stop], stream=stream)
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert text == full[:full.index(stop)] and finish == "stop"


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(temperature=5), "temperature", "'temperature' must be a number >= 0 and <= 2"),
    (dict(n=2), "n", "only n=1 is supported"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "'stop' must be"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role",
     "'tool' is not supported"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]),
     "messages[0].content[0]", "images must be base64 data: URLs"),
])
def test_bad_requests_get_the_openai_error_shape(client, kwargs, param, message):
    kwargs = {"messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", **kwargs)
    err = info.value
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert err.param == param and message in err.message


def test_errors_found_while_generating(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "image 1: not an image" in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", stream=True,
                                       messages=[{"role": "user", "content": "hello " * 9000}])
    assert info.value.code == "context_length_exceeded"


def test_body_size_limit_and_content_type(base_url):
    big = {"messages": [{"role": "user", "content": "x" * (UPLOAD_MB * 2**20 + 1)}]}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and "over 1 MiB" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/chat/completions", content=json.dumps(big)[:100], timeout=30,
                   headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_api_requests_share_the_chat_queue(app, client, tiny_model_fp32, monkeypatch):
    gate = threading.Event()
    real = tiny_model_fp32.generate

    def gated(messages, **options):
        if messages[-1]["content"] == "hold":
            gate.wait(30)
            yield "held"
        else:
            yield from real(messages, **options)

    monkeypatch.setattr(tiny_model_fp32, "generate", gated)
    queue = app.state.generation_queue
    holder = queue.submit([{"role": "user", "content": "hold"}], {})
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4)))
    thread.start()
    deadline = time.monotonic() + 30
    while queue.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.waiting == 1 and "out" not in result  # behind the chat's generation
    gate.set()
    thread.join(30)
    assert list(holder.events())[-2].text == "held"
    assert result["out"].usage.completion_tokens >= 1


def test_closing_a_stream_stops_the_model(base_url, tiny_model_fp32, monkeypatch):
    closed = threading.Event()

    def endless(messages, **options):
        try:
            while True:
                yield "la "
                time.sleep(0.005)
        finally:
            closed.set()

    monkeypatch.setattr(tiny_model_fp32, "generate", endless)
    body = {"messages": [{"role": "user", "content": "go"}], "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert closed.wait(10)


def test_serve_refuses_a_port_in_use_before_loading(tiny_checkpoint, capsys):
    from kimivl_local.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "loaded" not in err


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hello wor", "ld. Bye"], ["world"], ("Hello ", True)),
    (["ab", "c", "d"], ["cx"], ("abcd", False)),
    (["one", " END", "ING"], ["END", "ENDING"], ("one ", True)),
])
def test_stop_matcher_across_pieces(pieces, stops, expected):
    matcher = openai_api.StopMatcher(stops)
    text, hit = "", False
    for piece in pieces:
        out, hit = matcher.feed(piece)
        text += out
        if hit:
            break
    assert (text + ("" if hit else matcher.pending), hit) == expected
