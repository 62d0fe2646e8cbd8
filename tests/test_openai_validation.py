"""The OpenAI API against bad input and bad clients, over real HTTP (raw JSON and raw sockets).

Every bad field is a 400 in OpenAI's error shape naming the field; unknown routes and methods
are OpenAI-shaped 404/405; an unexpected failure is a logged 500 after which the server still
answers; slow clients are disconnected; each request is one access-log line.
"""

import logging
import socket
import time

import pytest

from app_support import drop_mid_request, import_app, running_server

httpx = pytest.importorskip("httpx")
server = import_app("server")
CLIENT_TIMEOUT = 1.0
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def app(tiny_model_fp32):
    return server.build_app(tiny_model_fp32, max_upload_mb=1)


@pytest.fixture(scope="module")
def base_url(app):
    with running_server(app, client_timeout=CLIENT_TIMEOUT) as url:
        yield url


def post(base_url, body=None, raw: bytes | None = None) -> httpx.Response:
    kwargs = {"json": body} if raw is None else {
        "content": raw, "headers": {"content-type": "application/json"}}
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=60, **kwargs)


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, param, message", [
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", "is not supported"),
    ({"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role", "is not supported"),
    ({"messages": HI, "seed": 2**64}, "seed", "'seed' must be an integer"),
    ({"messages": HI, "seed": -2**63 - 1}, "seed", "'seed' must be an integer"),
    ({"messages": HI, "seed": 1e300}, "seed", "'seed' must be an integer"),
    ({"messages": HI, "max_tokens": 1.5}, "max_tokens", "must be an integer"),
    ({"messages": HI, "temperature": 10**400}, "temperature", "must be a number"),
    ({"messages": HI, "n": True}, "n", "must be an integer"),
    ({"messages": HI, "stream": 0}, "stream", "must be true or false"),
    ({"messages": HI, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", "must be true or false"),
    ({"messages": HI, "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"messages": HI, "model": 3}, "model", "must be a string"),
    ({"messages": HI, "stop": "x" * 1001}, "stop", "1 to 1000 characters"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     "messages[0].content[0]", "not a base64 data: URL"),
])
def test_bad_fields_are_400_naming_the_field(base_url, body, param, message):
    r = post(base_url, body)
    err = error_of(r)
    assert r.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and message in err["message"]


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"messages": [], "temperature": NaN}', "NaN is not valid JSON"),
    (b'{"messages": "\xff\xfe"}', "not valid JSON"),
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_unreadable_bodies_are_400(base_url, raw, message):
    r = post(base_url, raw=raw)
    assert r.status_code == 400 and message in error_of(r)["message"]


def greedy(model, max_new_tokens=6) -> str:
    return "".join(model.generate(HI, max_new_tokens=max_new_tokens, temperature=0.0))


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 1e-5},
                                      {"temperature": 1.0, "top_p": 1e-320},
                                      {"temperature": 1.0, "top_p": 0}])
def test_vanishing_temperature_or_top_p_samples_greedily(base_url, tiny_model_fp32, sampling):
    r = post(base_url, {"messages": HI, "max_tokens": 6, **sampling})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy(tiny_model_fp32)


def test_n_null_and_a_64_bit_seed_are_accepted(base_url):
    for extra in ({"n": None}, {"seed": 2**64 - 1}, {"seed": -2**63}):
        r = post(base_url, {"messages": HI, "max_tokens": 2, "temperature": 1, **extra})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nope", 404), ("POST", "/v1/completions", 404),
    ("GET", "/v1/chat/completions", 405), ("POST", "/v1/models", 405), ("DELETE", "/v1/models", 405),
])
def test_unknown_routes_and_methods_in_openai_shape(base_url, method, path, status):
    r = httpx.request(method, base_url + path, timeout=30)
    assert r.status_code == status and error_of(r)["message"]
    if status == 405:
        assert r.headers["allow"] in ("GET", "POST")


def test_unexpected_failure_is_a_logged_500_and_the_server_goes_on(base_url, tiny_model_fp32,
                                                                   monkeypatch, caplog):
    def broken(messages, **options):
        raise OSError("image file is truncated")  # what PIL raises for a cut PNG
        yield

    with monkeypatch.context() as m:
        m.setattr(tiny_model_fp32, "generate", broken)
        r = post(base_url, {"messages": HI})
    err = error_of(r)
    assert r.status_code == 500 and err["type"] == "server_error"
    assert any(rec.message.startswith("generation failed") and rec.exc_info for rec in caplog.records)
    assert post(base_url, {"messages": HI, "max_tokens": 2}).status_code == 200


def test_input_errors_are_400_and_keep_the_cache(base_url, tiny_model_fp32, monkeypatch):
    from kimivl_local.errors import InputError

    resets = []
    monkeypatch.setattr(tiny_model_fp32.engine.cache, "reset", lambda: resets.append(1))

    def refused(messages, **options):
        raise InputError("image 1: the PNG data is truncated")
        yield

    monkeypatch.setattr(tiny_model_fp32, "generate", refused)
    r = post(base_url, {"messages": HI})
    assert r.status_code == 400 and "image 1" in error_of(r)["message"] and resets == []


def test_each_request_is_one_access_log_line(base_url, caplog):
    caplog.set_level(logging.INFO, "kimivl_local")
    time.sleep(0.5)  # the server is shared: let the previous test's last access line land first
    caplog.clear()
    post(base_url, {"messages": HI, "max_tokens": 3, "temperature": 0})
    httpx.get(f"{base_url}/v1/nope%0A12:00:00 GET /forged 200", timeout=30)
    post(base_url, {"messages": HI, "max_tokens": 3, "stream": True})
    deadline = time.monotonic() + 5
    while len([r for r in caplog.records if r.message.startswith(("POST /v1", "GET /v1"))]) < 3 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [r.message for r in caplog.records if r.message.startswith(("POST /v1", "GET /v1"))]
    assert len(lines) == 3, lines
    assert lines[1].startswith("GET /v1/nope\\n12:00:00 GET /forged 200 404 - ")
    for line in lines[0], lines[2]:  # a complete answer, then a streamed one
        method, path, status, tokens, _, seconds, unit = line.split()
        assert (method, path, status, unit) == ("POST", "/v1/chat/completions", "200", "s")
        prompt, completion = tokens.split("+")
        assert int(prompt) > 0 and 1 <= int(completion) <= 3 and float(seconds) > 0


def recv_until_closed(sock: socket.socket, budget: float) -> float:
    """Seconds until the server closed the connection; fails after budget seconds."""
    sock.settimeout(budget)
    start = time.monotonic()
    while sock.recv(4096):
        pass
    return time.monotonic() - start


@pytest.mark.parametrize("sent", [
    b"",  # connects and says nothing
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",  # a head that never ends
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{\"messages\": ",  # a body that stops
])
def test_stalled_clients_are_disconnected(base_url, sent, caplog, capfd):
    caplog.set_level(logging.INFO, "kimivl_local")
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        assert recv_until_closed(sock, budget=10 * CLIENT_TIMEOUT) < 5 * CLIENT_TIMEOUT
    time.sleep(0.2)
    assert any("no request data" in r.message for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_a_flood_of_connections_gets_503_and_the_server_recovers(base_url):
    transport = import_app("transport")
    port = int(base_url.rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port))
             for _ in range(transport.MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)  # every connection accepted (they time out after CLIENT_TIMEOUT)
        assert httpx.get(f"{base_url}/v1/models", timeout=10).status_code == 503
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{base_url}/v1/models", timeout=10).status_code == 200


def test_a_client_that_drops_mid_upload_is_one_log_line(base_url, caplog, capfd):
    caplog.set_level(logging.INFO, "kimivl_local")
    line = drop_mid_request(
        base_url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: 100000\r\n\r\n" + b"{" * 1000, caplog, pause=0.2)
    assert line.startswith("POST /v1/chat/completions 499 ")
    assert "Traceback" not in capfd.readouterr().err and not any(r.exc_info for r in caplog.records)


def test_a_long_answer_is_not_cut_by_the_client_timeout(base_url, tiny_model_fp32, monkeypatch):
    def slow(messages, **options):
        for word in ("slow ", "but ", "sure"):
            time.sleep(CLIENT_TIMEOUT)
            yield word

    monkeypatch.setattr(tiny_model_fp32, "generate", slow)
    r = post(base_url, {"messages": HI})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "slow but sure"


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "0", "--port must be from 1 to 65535"),
    ("--port", "70000", "--port must be from 1 to 65535"),
    ("--max-upload-mb", "0", "--max-upload-mb must be a whole number"),
    ("--max-upload-mb", "-5", "--max-upload-mb must be a whole number"),
    ("--host", "x" * 300, "cannot listen on"),
])
def test_serve_checks_its_arguments_before_loading(tiny_checkpoint, capsys, flag, value, message):
    from kimivl_local.cli.main import main

    assert main(["serve", str(tiny_checkpoint), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "loaded" not in err
