"""A Thinking model behind the OpenAI routes (tiny checkpoint in the Thinking-2506 layout, its
replies forced through the sampler by thinking_support): reasoning comes apart from the answer,
a reply cut while thinking is still well formed, and reasoning never reaches a later prompt."""

import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")  # installed with the app's gradio

import kimivl_local
from app_support import import_app, running_server
from kimivl_local.synthetic.checkpoint import write_checkpoint
from thinking_support import LONG_REASONING, scripted_replies, thinking_reply

openai = pytest.importorskip("openai")
server = import_app("server")

REASONING = "The picture is red all over."


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-thinking",
                            preset="tiny-thinking")
    return kimivl_local.load(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def base_url(thinking_model):
    with running_server(server.build_app(thinking_model)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def prompts(thinking_model, monkeypatch):
    """The text of every prompt the engine is given (decoded, special tokens included)."""
    seen = []
    real = thinking_model.engine.generate

    def generate(prompt, **kwargs):
        ids = prompt.ids if hasattr(prompt, "ids") else prompt
        seen.append(thinking_model.tokenizer.decode(list(ids)))
        return real(prompt, **kwargs)

    monkeypatch.setattr(thinking_model.engine, "generate", generate)
    return seen


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="any", messages=messages, temperature=0, **kwargs)


def streamed(client, messages, **kwargs) -> tuple[str, str, str]:
    """(reasoning, answer, finish_reason) of a streamed completion."""
    reasoning = answer = finish = ""
    for chunk in ask(client, messages, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        answer += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return reasoning, answer, finish


def test_reasoning_is_returned_apart(client, thinking_model, monkeypatch):
    reply = thinking_reply(REASONING, "It is red.")
    scripted_replies(monkeypatch, thinking_model, reply, reply)
    user = [{"role": "user", "content": "What colour?"}]
    out = ask(client, user, max_tokens=200)
    message = out.choices[0].message
    assert message.content == "It is red." and out.choices[0].finish_reason == "stop"
    assert message.reasoning_content == REASONING
    assert streamed(client, user, max_tokens=200) == (REASONING, "It is red.", "stop")


def test_reasoning_cut_by_max_tokens(client, thinking_model, monkeypatch):
    scripted_replies(monkeypatch, thinking_model, *[thinking_reply(LONG_REASONING, None)] * 2)
    user = [{"role": "user", "content": "Think."}]
    out = ask(client, user, max_tokens=20)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 20
    assert message.content == "" and message.reasoning_content.startswith("step 0 checks")
    reasoning, answer, finish = streamed(client, user, max_tokens=20)
    assert (answer, finish) == ("", "length") and reasoning == message.reasoning_content


def test_stop_strings_apply_to_the_answer_only(client, thinking_model, monkeypatch):
    scripted_replies(monkeypatch, thinking_model,
                     thinking_reply("red? red. RED!", "It is red. Really red."))
    out = ask(client, [{"role": "user", "content": "Colour?"}], max_tokens=200, stop=["red"])
    message = out.choices[0].message
    assert message.reasoning_content == "red? red. RED!" and message.content == "It is "


def test_reasoning_is_never_sent_back(client, thinking_model, monkeypatch, prompts):
    """However a client returns an earlier reply (content only, with reasoning_content, the raw
    text with its think block, or a block cut short), the model's prompt has no reasoning."""
    scripted_replies(monkeypatch, thinking_model, *["Fine."] * 4)
    user = {"role": "user", "content": "What colour?"}
    again = {"role": "user", "content": "Sure?"}
    for earlier in [{"content": "It is red."},
                    {"content": "It is red.", "reasoning_content": REASONING},
                    {"content": thinking_reply(REASONING, "It is red.")},
                    {"content": thinking_reply(REASONING, None)}]:
        out = ask(client, [user, {"role": "assistant", **earlier}, again], max_tokens=20)
        assert out.choices[0].message.content == "Fine."
    assert len(prompts) == 4
    for prompt in prompts:
        assert "◁" not in prompt and "red all over" not in prompt
    assert prompts[0] == prompts[1] == prompts[2]
    assert "It is red." in prompts[0] and "It is red." not in prompts[3]


def test_closing_a_stream_while_thinking_stops_it_and_the_next_reply_is_whole(
        base_url, client, thinking_model, monkeypatch):
    scripted_replies(monkeypatch, thinking_model, thinking_reply(LONG_REASONING, None),
                     thinking_reply(REASONING, "It is red."))
    real, pieces, closed = thinking_model.generate, [], threading.Event()

    def slow(messages, **options):
        try:
            for piece in real(messages, **options):
                pieces.append(piece)
                yield piece
                time.sleep(0.02)
        finally:
            closed.set()

    monkeypatch.setattr(thinking_model, "generate", slow)
    body = {"messages": [{"role": "user", "content": "Think."}], "stream": True,
            "max_tokens": 2000}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if "reasoning_content" in line:
                break  # the client goes away while the model is thinking
    assert closed.wait(10) and len(pieces) < 200
    assert thinking_model.last_stats.finish_reason != "stop"
    out = ask(client, [{"role": "user", "content": "Colour?"}], max_tokens=200)
    assert out.choices[0].message.content == "It is red."
    assert out.choices[0].message.reasoning_content == REASONING
